"""Operating points (``pedetect calibrate``, pedetect.metric.calibrate): the thresholds on hand-made
scores and against an exhaustive search, the bundle's operating_points.json (versioned, atomic,
checked when read) and its use by ``pedetect evaluate --report``."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
from scipy.stats import binomtest

from helpers.metric import make_labels, make_submission, write
from pedetect.io import TMP_MARK
from pedetect.metric.calibrate import (
    OPERATING_POINTS_FILE,
    OperatingPointsError,
    choose_operating_points,
    read_operating_points,
    threshold_for_sensitivity,
    write_operating_points,
    youden_threshold,
)
from pedetect.models.layout import operating_points_path

# Ten studies: four positive. Decisions are score > threshold.
TRUTH = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
SCORE = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0])


def test_thresholds_on_hand_made_scores():
    # Sensitivity 0.75 needs 3 of the 4 positives: above 0.6 takes 0.9, 0.8, 0.7 (and no negative).
    assert threshold_for_sensitivity(TRUTH, SCORE, 0.75) == (0.6, True)
    # All four: the positive at 0.3 must be above the threshold; the highest candidate below it is 0.2.
    assert threshold_for_sensitivity(TRUTH, SCORE, 0.95) == (0.2, True)
    assert threshold_for_sensitivity(TRUTH, SCORE, 1.0) == (0.2, True)
    # Youden: at 0.6 sensitivity 3/4 and specificity 6/6 (J 0.75); at 0.2, 4/4 and 4/6 (J 0.667).
    assert youden_threshold(TRUTH, SCORE) == 0.6
    sens95, youden = choose_operating_points(TRUTH, SCORE, 0.95)
    assert sens95["name"] == "sensitivity_0.95" and youden["name"] == "youden"
    assert (sens95["sensitivity"], sens95["specificity"]) == (1.0, pytest.approx(4 / 6))
    assert (youden["sensitivity"], youden["specificity"]) == (0.75, 1.0)
    ci = binomtest(4, 6).proportion_ci(method="wilson")
    assert sens95["specificity_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12)
    ci = binomtest(3, 4).proportion_ci(method="wilson")
    assert youden["sensitivity_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12)
    assert sens95["target_reached"] is True


def test_youden_ties_take_the_highest_threshold_and_an_unreachable_target_says_so():
    truth = np.array([1, 0, 1, 0], dtype=bool)
    score = np.array([0.8, 0.6, 0.4, 0.2])
    # J: above 0.6 → 1/2 + 2/2 − 1 = 0.5; above 0.2 → 2/2 + 1/2 − 1 = 0.5: a tie, the higher wins.
    assert youden_threshold(truth, score) == 0.6
    # A positive scored exactly 0 can never be above a threshold of at least 0.
    assert threshold_for_sensitivity(np.array([1, 1, 0], bool), np.array([0.0, 0.5, 0.3]), 1.0) == (0.0, False)
    with pytest.raises(ValueError, match="needs both"):
        choose_operating_points(np.ones(3, bool), np.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("seed", range(5))
def test_thresholds_equal_an_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    n = 60
    truth = rng.random(n) < 0.35
    truth[:2] = [True, False]
    score = np.round(np.clip(rng.normal(0.3 + 0.3 * truth, 0.2), 0, 1), 2)  # ties
    candidates = sorted(set(score.tolist()) | {0.0}, reverse=True)

    def rates(t):
        called = score > t
        return (called & truth).sum() / truth.sum(), (~called & ~truth).sum() / (~truth).sum()

    for target in (0.5, 0.8, 0.9, 0.95):
        best = next(t for t in candidates if rates(t)[0] >= target)
        assert threshold_for_sensitivity(truth, score, target) == (best, True)
    j = [sum(rates(t)) - 1 for t in candidates]
    top = max(j)
    assert youden_threshold(truth, score) == next(t for t, v in zip(candidates, j) if v > top - 1e-12)


@pytest.fixture
def files(tmp_path):
    """Labels of the ten hand-made studies (slices: the positive studies' second slice is positive)
    and a submission whose highest slice per study is SCORE."""
    image, exam = {}, {}
    for k, positive in enumerate(TRUTH):
        image[f"S{k}"] = [0, int(positive), 0]
        exam[f"S{k}"] = {"central_pe": 1, "rv_lv_ratio_lt_1": 1} if positive else {"negative_exam_for_pe": 1}
    labels = make_labels(image, exam)
    top = dict(zip([f"S{k}" for k in range(10)], SCORE))
    submission = make_submission(
        labels, lambda sop: top[sop.split(".")[0]] if sop.endswith(".1") else 0.0, lambda study, label: 0.5
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "bundle.json").write_text("{}")
    return {
        "labels": write(labels, tmp_path / "labels.csv"),
        "submission": write(submission, tmp_path / "sub.csv"),
        "model": model,
        "tmp": tmp_path,
    }


def test_calibrate_records_the_points_in_the_bundle(cli, files):
    result = cli(
        "calibrate",
        *("--labels", files["labels"], "--submission", files["submission"], "--model", files["model"]),
        "--target-sensitivity",
        "0.95",
    )
    assert result.exit_code == 0, result.output
    path = files["model"] / OPERATING_POINTS_FILE
    assert operating_points_path(files["model"]) == path and path.is_file()
    assert not [p for p in files["model"].iterdir() if TMP_MARK in p.name]
    record = json.loads(path.read_text())
    assert record["version"] == 1 and record["studies"] == 10 and record["positives"] == 4
    datetime.datetime.fromisoformat(record["created"])
    assert [p["name"] for p in record["points"]] == ["sensitivity_0.95", "youden"]
    assert [p["threshold"] for p in record["points"]] == [0.2, 0.6]
    for point in record["points"]:
        assert {"sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95"} <= set(point)
    assert record["source"]["labels"] == str(files["labels"].resolve())
    assert record["source"]["submission"] == str(files["submission"].resolve())
    assert read_operating_points(files["model"]) == record
    assert "sensitivity_0.95" in result.stdout and "youden" in result.stdout

    # --out writes elsewhere and leaves the bundle alone.
    other = files["tmp"] / "points.json"
    result = cli(
        "calibrate",
        *("--labels", files["labels"], "--submission", files["submission"], "--out", other),
        *("--target-sensitivity", "0.75", "--json"),
    )
    assert result.exit_code == 0, result.output
    assert json.loads(other.read_text())["points"][0] == {**json.loads(result.stdout)["points"][0]}
    assert json.loads(other.read_text())["points"][0]["threshold"] == 0.6


def test_evaluate_reports_the_decision_at_the_recorded_points(cli, files):
    assert (
        cli(
            "calibrate", "--labels", files["labels"], "--submission", files["submission"], "--model", files["model"]
        ).exit_code
        == 0
    )
    out = files["tmp"] / "report"
    result = cli(
        "evaluate",
        *("--labels", files["labels"], "--submission", files["submission"]),
        *("--report", out, "--operating-points", files["model"], "--bootstrap", 50),
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    points = {p["name"]: p for p in report["exam_pe"]["operating_points"]}
    assert list(points) == ["challenge_0.5", "sensitivity_0.95", "youden"]
    assert points["sensitivity_0.95"]["threshold"] == 0.2 and points["sensitivity_0.95"]["sensitivity"] == 1.0
    assert points["youden"]["specificity"] == 1.0 and points["youden"]["sensitivity"] == 0.75
    assert points["challenge_0.5"]["tp"] == 3 and points["challenge_0.5"]["fp"] == 1  # 0.6 is above 0.5
    assert any("chosen on this same submission" in note for note in report["notes"])
    assert "youden" in (out / "index.html").read_text()


def test_no_file_is_none_and_a_bad_file_is_a_clear_error(files):
    model = files["model"]
    assert read_operating_points(model) is None
    good = {
        "version": 1,
        "created": "2024-01-01T00:00:00+00:00",
        "studies": 10,
        "positives": 4,
        "points": [{"name": "youden", "threshold": 0.6, "sensitivity": 0.75, "sensitivity_ci95": [0.3, 0.95]}],
        "source": {"labels": "l.csv", "submission": "s.csv"},
    }
    path = model / OPERATING_POINTS_FILE
    for broken, message in [
        ("not json", "not JSON"),
        ([], "expected a JSON object"),
        ({**good, "version": 2}, "version 2 is not 1"),
        ({**good, "studies": -1}, "'studies' must be a count"),
        ({**good, "positives": 11}, "exceeds 'studies'"),
        ({**good, "points": []}, "non-empty list"),
        ({**good, "points": [{"threshold": 0.5}]}, "point 1 has no 'name'"),
        ({**good, "points": [{"name": "a", "threshold": 1.5}]}, "'threshold' must be a number in \\[0, 1\\]"),
        ({**good, "points": [{"name": "a", "threshold": 0.5}] * 2}, "two points are named 'a'"),
        ({**good, "points": [{"name": "a", "threshold": 0.5, "sensitivity_ci95": [0.9, 0.1]}]}, "sensitivity_ci95"),
    ]:
        path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
        with pytest.raises(OperatingPointsError, match=message) as raised:
            read_operating_points(model)
        assert str(path) in str(raised.value)
    # A record that does not pass is not written: the old file stays.
    write_operating_points(good, path)
    with pytest.raises(OperatingPointsError):
        write_operating_points({**good, "version": 0}, path)
    assert read_operating_points(model) == good
    assert not [p for p in model.iterdir() if TMP_MARK in p.name]


def test_command_errors(cli, files, tmp_path):
    base = ("calibrate", "--labels", files["labels"], "--submission", files["submission"])
    result = cli(*base)
    assert result.exit_code == 2 and "--model" in result.output
    result = cli(*base, "--model", tmp_path / "missing")
    assert result.exit_code == 2 and "not a folder" in result.output
    one_class = make_labels(
        {"A": [0, 0], "B": [0]}, {"A": {"negative_exam_for_pe": 1}, "B": {"negative_exam_for_pe": 1}}
    )
    result = cli(
        "calibrate",
        *("--labels", write(one_class, tmp_path / "one.csv"), "--model", files["model"]),
        *(
            "--submission",
            write(make_submission(one_class, lambda s: 0.1, lambda s, label: 0.5), tmp_path / "one_sub.csv"),
        ),
    )
    assert result.exit_code == 2 and "needs both" in result.output
    assert not (files["model"] / OPERATING_POINTS_FILE).exists()
