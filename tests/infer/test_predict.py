"""``pedetect predict`` on real (synthetic) DICOM: every id written, the rules kept, bad files and
studies accounted for, the report written.

The fast tests use a bundle with random weights (pedetect.testing): what they check —
reading, ordering, ids, consistency, the bookkeeping of losses, the report — does not depend on what
a model learnt. The trained model's score is checked by tests/test_demo.py.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.train import tiny_config
from pedetect.infer.predict import predict
from pedetect.infer.reader import guess_uids
from pedetect.labels import EXAM_LABELS, SERIES, SOP, STUDY, exam_id
from pedetect.metric.consistency import find_violations
from pedetect.metric.submission import align, read_studies, read_submission
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle

N_STUDIES, SLICES, SIZE = 5, 14, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    labels = write_dataset(
        root / "data",
        N_STUDIES,
        slices=SLICES,
        size=SIZE,
        seed=7,
        split="test",
        transfer_syntax="jpeg2000",
        progress=False,
    )
    model = write_random_bundle(tiny_config(), root / "model", folds=2)
    return root, labels, model


def consistent_and_complete(submission: Path, studies_csv: Path) -> pd.DataFrame:
    frame = read_submission(submission)
    aligned = align(frame, read_studies(studies_csv), submission)  # raises on a missing or unknown id
    assert find_violations(aligned) == []
    return frame


def test_predict_writes_every_id_in_sample_order_and_a_report(dataset, tmp_path, cli):
    root, labels, model = dataset
    data = root / "data"
    summary = predict(
        data / "test",
        [model],
        tmp_path / "sub.csv",
        report_dir=tmp_path / "report",
        sample=data / "sample_submission.csv",
        device="cpu",
        progress=False,
        echo=lambda m: None,
    )
    assert summary.ok and summary.n_studies == N_STUDIES and summary.n_slices_read == N_STUDIES * SLICES
    frame = consistent_and_complete(tmp_path / "sub.csv", data / "test.csv")
    assert frame["id"].tolist() == pd.read_csv(data / "sample_submission.csv")["id"].tolist()
    # pedetect check agrees.
    result = cli("check", tmp_path / "sub.csv", "--studies", data / "test.csv")
    assert result.exit_code == 0, result.output

    values = dict(zip(frame["id"], frame["label"]))
    for study, rows in labels.groupby(STUDY, sort=False):
        report = json.loads((tmp_path / "report" / f"{study}.json").read_text())
        # Slices in position order: the labels list them so (synth writes InstanceNumber out of order).
        assert report["sop_uids"] == rows[SOP].tolist()
        assert report["z"] == sorted(report["z"])
        assert report["slice_probabilities"] == pytest.approx([values[s] for s in rows[SOP]], abs=1e-6)
        assert report["exam_probabilities"] == pytest.approx(
            {label: values[exam_id(study, label)] for label in EXAM_LABELS}, abs=1e-6
        )
        assert [s["SOPInstanceUID"] for s in report["slices_above_threshold"]] == [
            s for s in rows[SOP] if values[s] > 0.5
        ]
        assert set(report["timings"]) == {"read", "model", "localise", "fix"}  # seconds of this study
        assert (tmp_path / "report" / f"{study}.png").read_bytes()[:4] == b"\x89PNG"
    index = (tmp_path / "report" / "index.html").read_text()
    assert all(study in index for study in labels[STUDY].unique()) and "lost: nothing" in index


def test_the_decision_at_the_bundles_operating_points_sits_beside_the_rules(dataset, tmp_path, cli):
    """Operating points recorded in the bundle (as pedetect calibrate writes them): predict's report
    gives each study's decision at each of them (highest slice probability above the threshold), and
    the submission does not change."""
    import shutil

    import numpy as np

    from pedetect.metric.calibrate import (
        DECISION,
        OPERATING_POINTS_VERSION,
        choose_operating_points,
        operating_points_file,
        write_operating_points,
    )

    root, _, model = dataset
    data = root / "data"
    bundle = shutil.copytree(model, tmp_path / "model")
    before = cli("predict", data / "test", "--model", bundle, "--out", tmp_path / "before.csv", "--no-progress")
    assert before.exit_code in (0, 1), before.output
    truth, score = np.array([0, 0, 1, 1, 0, 1]), np.array([0.1, 0.45, 0.5, 0.55, 0.52, 0.9])
    points = choose_operating_points(truth, score, 0.95)
    record = {"version": OPERATING_POINTS_VERSION, "created": "2026-12-06T00:00:00+00:00", "decision": DECISION}
    record |= {"studies": 6, "positives": 3, "points": points, "source": {"labels": "l.csv", "submission": "s.csv"}}
    write_operating_points(record, operating_points_file(bundle))
    after = cli(
        "predict", data / "test", "--model", bundle, "--out", tmp_path / "after.csv",
        "--report", tmp_path / "report", "--no-progress",
    )  # fmt: skip
    assert after.exit_code in (0, 1), after.output
    assert (tmp_path / "after.csv").read_bytes() == (tmp_path / "before.csv").read_bytes()
    for path in (tmp_path / "report").glob("*.json"):
        record = json.loads(path.read_text())
        expected = [
            {"name": p["name"], "threshold": p["threshold"], "decision": record["pe_probability"] > p["threshold"]}
            for p in points
        ]
        assert record["operating_points"] == expected
    assert "at the operating points" in (tmp_path / "report" / "index.html").read_text()


def test_zip_input_and_two_bundles_give_the_same_rows(dataset, tmp_path):
    root, labels, model = dataset
    archive = tmp_path / "test.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((root / "data" / "test").rglob("*.dcm")):
            zf.write(path, path.relative_to(root / "data"))
    quiet = dict(device="cpu", progress=False, echo=lambda m: None)
    predict(root / "data" / "test", [model], tmp_path / "folder.csv", **quiet)
    predict(archive, [model, model], tmp_path / "zip.csv", **quiet)  # one bundle twice: the same average
    folder, zipped = pd.read_csv(tmp_path / "folder.csv"), pd.read_csv(tmp_path / "zip.csv")
    assert len(folder) == N_STUDIES * (SLICES + 9)
    pd.testing.assert_frame_equal(folder, zipped)
    # Without --sample: the nine exam rows of every study, then every slice in position order.
    assert folder["id"].tolist()[: 9 * N_STUDIES] == [
        exam_id(s, label) for s in sorted(labels[STUDY].unique()) for label in EXAM_LABELS
    ]


def test_flip_tta_averages_a_second_pass(dataset, tmp_path):
    root, _, model = dataset
    quiet = dict(device="cpu", progress=False, echo=lambda m: None)
    plain = predict(root / "data" / "test", [model], tmp_path / "plain.csv", report_dir=tmp_path / "r1", **quiet)
    flipped = predict(
        root / "data" / "test", [model], tmp_path / "tta.csv", report_dir=tmp_path / "r2", tta=True, **quiet
    )
    assert plain.ok and flipped.ok
    a, b = pd.read_csv(tmp_path / "plain.csv"), pd.read_csv(tmp_path / "tta.csv")
    assert a["id"].tolist() == b["id"].tolist() and not np.allclose(a["label"], b["label"])
    consistent_and_complete(tmp_path / "tta.csv", root / "data" / "test.csv")


def test_corrupt_files_and_a_corrupt_study_are_named_and_still_get_rows(dataset, tmp_path, cli):
    root, labels, model = dataset
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    studies = sorted(labels[STUDY].unique())
    damaged, dead = studies[0], studies[1]
    rows = labels[labels[STUDY] == damaged]
    series = rows[SERIES].iloc[0]
    garbage_sop, truncated_sop = rows[SOP].iloc[5], rows[SOP].iloc[8]
    # One file overwritten (header unreadable: only its RSNA path says what it was), one truncated
    # inside its pixel data (header fine, pixels not).
    (data / "test" / damaged / series / f"{garbage_sop}.dcm").write_bytes(b"this is no DICOM file" * 50)
    truncated = data / "test" / damaged / series / f"{truncated_sop}.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-600])
    for path in (data / "test" / dead).rglob("*.dcm"):  # a whole study lost
        path.write_bytes(b"\0" * 64)
    (data / "test" / "notes.txt").write_text("not a slice: ignored")

    result = cli(
        "predict",
        data / "test",
        "--model",
        model,
        "--out",
        tmp_path / "sub.csv",
        "--report",
        tmp_path / "report",
        "--sample",
        data / "sample_submission.csv",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 1, result.output  # something was lost
    output = result.output
    assert f"study {dead}: no readable slice in {SLICES} file(s)" in output
    assert f"{garbage_sop}.dcm: not DICOM" in output and f"{truncated_sop}.dcm: " in output
    assert "notes.txt" not in output and "ignored 1 file(s) that are not DICOM" in output

    frame = consistent_and_complete(tmp_path / "sub.csv", data / "test.csv")  # every id, the rules kept
    values = dict(zip(frame["id"], frame["label"]))
    prior = json.loads((model / "prior.json").read_text())
    assert values[exam_id(dead, "negative_exam_for_pe")] == pytest.approx(prior["negative_exam_for_pe"], abs=1e-6)
    assert all(
        values[s] == pytest.approx(prior["pe_present_on_image"], abs=1e-6)
        for s in labels.loc[labels[STUDY] == dead, SOP]
    )

    report = json.loads((tmp_path / "report" / f"{damaged}.json").read_text())
    skipped = {entry["SOPInstanceUID"]: entry for entry in report["skipped_files"]}
    assert set(skipped) == {garbage_sop, truncated_sop}
    assert len(report["sop_uids"]) == SLICES - 2
    # The truncated slice's position is known: its value lies between its neighbours'.
    order = rows[SOP].tolist()
    neighbours = [values[order[7]], values[order[9]]]
    assert min(neighbours) - 1e-6 <= skipped[truncated_sop]["written_probability"] <= max(neighbours) + 1e-6
    assert values[truncated_sop] == pytest.approx(skipped[truncated_sop]["written_probability"], abs=1e-6)
    dead_report = json.loads((tmp_path / "report" / f"{dead}.json").read_text())
    assert dead_report["error"].startswith("no readable slice") and len(dead_report["skipped_files"]) == SLICES
    index = (tmp_path / "report" / "index.html").read_text()
    assert dead in index and garbage_sop in index and "no readable slice" in index
    # The other studies are predicted as without the damage.
    clean = predict(
        root / "data" / "test", [model], tmp_path / "clean.csv", device="cpu", progress=False, echo=lambda m: None
    )
    assert clean.ok
    reference = dict(pd.read_csv(tmp_path / "clean.csv", dtype={"label": float}).values)
    for study in studies[2:]:
        for sop in labels.loc[labels[STUDY] == study, SOP]:
            assert values[sop] == pytest.approx(reference[sop], abs=1e-6)


def test_unusable_arguments_exit_2_naming_them(dataset, tmp_path, cli):
    root, _, model = dataset
    result = cli("predict", root / "data" / "test", "--model", tmp_path / "nope", "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "model folder not found" in result.output and "nope" in result.output
    result = cli("predict", tmp_path / "missing", "--model", model, "--out", tmp_path / "s.csv")
    assert result.exit_code == 2 and "input not found" in result.output
    assert not (tmp_path / "s.csv").exists()


def test_guess_uids_from_rsna_paths():
    assert guess_uids("/x/test/1.2.3/1.2.3.4/1.2.3.4.5.dcm") == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert guess_uids("a.zip::test/1.2/1.3/1.4.dcm") == ("1.2", "1.3", "1.4")
    assert guess_uids("/x/scan/IMG0001.dcm") == (None, None, None)


def test_flip_tta_swaps_the_flipped_views_sides_back(dataset):
    """With --tta each fold's exam outputs are the mean of the series and its mirror image with left
    and right exchanged: a left-sided embolus stays left-sided (issue: averaged unswapped, the
    leftsided_pe AUC fell from 0.966 to 0.887 with --tta)."""
    from pedetect.infer.ensemble import Ensemble, preprocessing_key
    from pedetect.models.bundle import read_preprocessing

    _, _, model = dataset
    key = preprocessing_key(read_preprocessing(model))
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 255, size=(9, SIZE, SIZE, 3), dtype=np.uint8)
    volume[:, :, : SIZE // 3] = 0  # not symmetric: the mirror image is another input
    plain = Ensemble([model], device="cpu", runtime="torch")
    tta = Ensemble([model], device="cpu", runtime="torch", tta=True)
    original = plain.predict_series({key: volume}).exams
    mirrored = plain.predict_series({key: np.ascontiguousarray(volume[:, :, ::-1])}).exams
    left, right = EXAM_LABELS.index("leftsided_pe"), EXAM_LABELS.index("rightsided_pe")
    assert abs(mirrored[left] - mirrored[right]) > 1e-4  # the random heads tell the sides apart ...
    swapped = mirrored.copy()
    swapped[[left, right]] = mirrored[[right, left]]
    np.testing.assert_allclose(tta.predict_series({key: volume}).exams, (original + swapped) / 2, rtol=0, atol=1e-6)
