"""The prediction report: per-study JSON, PNG and viewer page, the index, the background writer."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from pedetect.infer.report import ReportWriter, StudyResult, write_index, write_study_report
from pedetect.labels import EXAM_LABELS
from pedetect.metric.consistency import LOWERED, RAISED


def make_result(uid: str, peak: float, n: int = 40) -> StudyResult:
    """A study whose model values obey the rules already (written = model's)."""
    x = np.arange(n)
    probabilities = (peak * np.exp(-0.5 * ((x - n / 2) / 3) ** 2)).tolist()
    exam = dict.fromkeys(EXAM_LABELS, 0.1) | (
        {"central_pe": 0.8, "rv_lv_ratio_lt_1": 0.7} if peak > 0.5 else {"negative_exam_for_pe": 0.9}
    )
    return StudyResult(
        uid,
        exam,
        [f"{uid}.{i}" for i in range(n)],
        [1.25 * i for i in range(n)],
        probabilities,
        dict(exam),
        list(probabilities),
        skipped_files=[{"path": "x/bad.dcm", "reason": "truncated"}] if peak < 0.5 else [],
    )


def repaired_to_negative(uid: str) -> StudyResult:
    """The demo's complaint: one slice at 0.52 and no location label above 0.5; the repair lowered
    the slice to just below 0.5 and raised negative_exam_for_pe to just above it."""
    result = make_result(uid, 0.52)
    result.model_exam_probabilities = dict.fromkeys(EXAM_LABELS, 0.2) | {"negative_exam_for_pe": 0.45}
    result.exam_probabilities = dict(result.model_exam_probabilities) | {"negative_exam_for_pe": RAISED}
    result.slice_probabilities = [min(p, LOWERED) for p in result.model_slice_probabilities]
    return result


def test_study_report_and_index(tmp_path):
    positive, negative = make_result("1.2.840.1", 0.9), make_result("1.2.840.2", 0.2)
    images = np.random.default_rng(0).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)
    files = write_study_report(tmp_path, positive, images)
    write_study_report(tmp_path, negative, images)
    data = json.loads(files.json.read_text())
    above = [s["slice_index"] for s in data["slices_above_threshold"]]
    assert (
        above == [i for i, p in enumerate(positive.slice_probabilities) if p > 0.5]
        and 17 <= min(above) <= max(above) <= 23
    )
    assert data["pe_probability"] == max(positive.model_slice_probabilities) and data["pe_positive"] is True
    assert data["exam_probabilities"]["central_pe"] == 0.8 and data["model_exam_probabilities"]["central_pe"] == 0.8
    assert files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The viewer: one JPEG per slice, the page carrying the same record.
    viewer = data["viewer"]
    assert len(viewer["slices"]) == 40 and all((tmp_path / f).read_bytes()[:2] == b"\xff\xd8" for f in viewer["slices"])
    assert viewer["suspicious"] == [int(np.argmax(positive.model_slice_probabilities))]
    assert [w["name"] for w in viewer["windows"]] == ["pe", "lung", "mediastinal"] and viewer["windows"][0][
        "channel"
    ] == 1
    assert viewer["location"] is None  # no grid given
    assert files.page.name == "1.2.840.1.html" and '"study_uid":"1.2.840.1"' in files.page.read_text()

    index = write_index(tmp_path, [negative, positive]).read_text()
    assert index.index("1.2.840.1") < index.index("1.2.840.2")  # most suspicious first
    assert "1 file(s) skipped" in index and 'href="1.2.840.1.png"' in index and 'href="1.2.840.1.html"' in index
    assert (tmp_path / "viewer" / "viewer.js").is_file() and (tmp_path / "viewer" / "viewer.css").is_file()


def test_the_model_probability_is_shown_and_the_repair_named(tmp_path):
    result = repaired_to_negative("1.2.840.3")
    assert result.pe_probability == pytest.approx(0.52) and not result.pe_positive
    repair = result.repair()
    assert repair["pe_positive_changed"] and repair["slices_changed"] == 1
    rows = {row["label"]: row for row in repair["labels"]}
    assert rows["negative_exam_for_pe"]["changed_by_repair"] and rows["negative_exam_for_pe"]["decision"]
    assert rows["negative_exam_for_pe"]["model_probability"] == 0.45
    assert not rows["central_pe"]["changed_by_repair"]

    data = json.loads(write_study_report(tmp_path, result, None).json.read_text())
    assert data["pe_probability"] == pytest.approx(0.52)  # not the written 0.4999
    assert max(data["slice_probabilities"]) == LOWERED and max(data["model_slice_probabilities"]) == pytest.approx(0.52)
    index = write_index(tmp_path, [result]).read_text()
    assert '<td class="number">0.520</td>' in index and "negative</span>" in index and "changed by the repair" in index


def test_location_grid_is_placed_on_the_crop(tmp_path):
    result = make_result("1.2.840.4", 0.9, n=6)
    images = np.zeros((6, 80, 100, 3), dtype=np.uint8)
    location = np.random.default_rng(1).random((6, 3, 3)).astype(np.float32)
    data = json.loads(write_study_report(tmp_path, result, images, location=location, crop=0.5).json.read_text())
    grid = data["viewer"]["location"]
    assert grid["grid"] == 3 and np.allclose(grid["cells"], location.reshape(6, 9), atol=1e-3)
    # The central square of half the shorter side (40 px of 80 x 100): left 30, top 20.
    assert grid["crop_box"] == [0.3, 0.25, 0.4, 0.5]


def test_the_writer_works_in_the_background_and_raises_its_errors(tmp_path, monkeypatch):
    import pedetect.infer.report as report

    started, release = threading.Event(), threading.Event()
    written = []

    def slow_write(out_dir, result, pictures, **options):
        started.set()
        release.wait(5)
        written.append(result.study_uid)
        return report.StudyFiles(out_dir / "x.json", out_dir / "x.html", None, 10)

    monkeypatch.setattr(report, "write_study_report", slow_write)
    with ReportWriter(tmp_path, backlog=2) as writer:
        writer.submit(make_result("a", 0.9), None)
        assert started.wait(5) and written == []  # the caller goes on while the study is written
        writer.submit(make_result("b", 0.9), None)
        release.set()
        writer.finish()
    assert written == ["a", "b"] and writer.viewer_bytes == 20

    def failing_write(*args, **options):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_study_report", failing_write)
    with pytest.raises(OSError, match="disk full"), ReportWriter(tmp_path) as writer:
        writer.submit(make_result("c", 0.9), None)
        writer.finish()


def test_a_uid_is_its_own_file_name_and_two_other_texts_never_share_one():
    from pedetect.infer.report import safe_name

    assert safe_name("1.2.840.113619.2.55.3") == "1.2.840.113619.2.55.3"
    assert safe_name("6897fa9de148") == "6897fa9de148"  # the challenge's ids
    # Texts that replacement alone would map to one name ("a_b"), and what truncation would have merged.
    names = {safe_name(t) for t in ("a/b", "a\\b", "a b", "a_b", "x" * 200, "x" * 201, "..", "")}
    assert len(names) == 8
    assert all(len(n) <= 128 and "/" not in n and n not in (".", "..", "") for n in names)
