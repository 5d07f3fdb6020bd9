"""The prediction report: per-study JSON and PNG, and the index."""

from __future__ import annotations

import json

import numpy as np

from pedetect.infer.report import StudyResult, write_index, write_study_report
from pedetect.labels import EXAM_LABELS


def make_result(uid: str, peak: float, n: int = 40) -> StudyResult:
    x = np.arange(n)
    probabilities = (peak * np.exp(-0.5 * ((x - n / 2) / 3) ** 2)).tolist()
    exam = dict.fromkeys(EXAM_LABELS, 0.1) | ({"central_pe": 0.8, "rv_lv_ratio_lt_1": 0.7} if peak > 0.5 else {"negative_exam_for_pe": 0.9})
    return StudyResult(uid, exam, [f"{uid}.{i}" for i in range(n)], [1.25 * i for i in range(n)], probabilities,
                       skipped_files=[{"path": "x/bad.dcm", "reason": "truncated"}] if peak < 0.5 else [])


def test_study_report_and_index(tmp_path):
    positive, negative = make_result("1.2.840.1", 0.9), make_result("1.2.840.2", 0.2)
    images = np.random.default_rng(0).integers(0, 255, (40, 64, 64), dtype=np.uint8)
    json_path, png_path = write_study_report(tmp_path, positive, images)
    write_study_report(tmp_path, negative, images)
    data = json.loads(json_path.read_text())
    above = [s["slice_index"] for s in data["slices_above_threshold"]]
    assert above == [i for i, p in enumerate(positive.slice_probabilities) if p > 0.5] and 17 <= min(above) <= max(above) <= 23
    assert data["pe_probability"] == max(positive.slice_probabilities)
    assert data["exam_probabilities"]["central_pe"] == 0.8
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    index = write_index(tmp_path, [negative, positive]).read_text()
    assert index.index("1.2.840.1") < index.index("1.2.840.2")  # most suspicious first
    assert "1 file(s) skipped" in index and 'href="1.2.840.1.png"' in index
