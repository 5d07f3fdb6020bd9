"""Label-consistency rules, `pedetect check` and its 1st-place fixer."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.metric import make_labels, make_submission, write
from pedetect.labels import EXAM_LABELS, EXAM_WEIGHTS, IMAGE_WEIGHT, SOP, STUDY, UID_COLUMNS
from pedetect.metric.consistency import (
    LOWERED,
    RAISED,
    cheapest_negative_edit,
    cheapest_positive_edit,
    edit_cost,
    find_violations,
    fix_submission,
)
from pedetect.metric.rules import exam_violations
from pedetect.metric.submission import align, read_studies, read_submission

CONSISTENT_POSITIVE = dict.fromkeys(EXAM_LABELS, 0.1) | {"rv_lv_ratio_lt_1": 0.8, "rightsided_pe": 0.7}
CONSISTENT_NEGATIVE = dict.fromkeys(EXAM_LABELS, 0.1) | {"negative_exam_for_pe": 0.9}


class TestRules:
    def test_consistent_exams(self):
        assert exam_violations(np.array([0.2, 0.9]), CONSISTENT_POSITIVE) == []
        assert exam_violations(np.array([0.2, 0.5]), CONSISTENT_NEGATIVE) == []  # 0.5 is not > 0.5

    @pytest.mark.parametrize(
        "change, rule",
        [
            ({"rv_lv_ratio_gte_1": 0.6}, "positive_rv_lv"),  # both rv_lv above
            ({"rv_lv_ratio_lt_1": 0.5}, "positive_rv_lv"),  # neither above
            ({"rightsided_pe": 0.4}, "positive_location"),
            ({"chronic_pe": 0.6, "acute_and_chronic_pe": 0.7}, "positive_chronicity"),
            ({"indeterminate": 0.51}, "positive_not_negative"),
            ({"negative_exam_for_pe": 0.9}, "positive_not_negative"),
        ],
    )
    def test_positive_exam_rules(self, change, rule):
        assert exam_violations(np.array([0.9]), CONSISTENT_POSITIVE | change) == [rule]

    @pytest.mark.parametrize(
        "change, rule",
        [
            ({"negative_exam_for_pe": 0.3}, "negative_one_of"),  # neither
            ({"indeterminate": 0.7}, "negative_one_of"),  # both
            ({"central_pe": 0.6}, "negative_no_pe_labels"),
            ({"rv_lv_ratio_lt_1": 0.6}, "negative_no_pe_labels"),
            ({"acute_and_chronic_pe": 0.6}, "negative_no_pe_labels"),
        ],
    )
    def test_negative_exam_rules(self, change, rule):
        assert exam_violations(np.array([0.1, 0.2]), CONSISTENT_NEGATIVE | change) == [rule]


def submission_files(tmp_path, exams: dict[str, tuple[list[float], dict[str, float]]]):
    labels = make_labels({s: [0] * len(image) for s, (image, _) in exams.items()}, {})
    image_values = {f"{s}.{i}": v for s, (image, _) in exams.items() for i, v in enumerate(image)}
    submission = make_submission(labels, image_values.get, lambda s, label: exams[s][1][label])
    return write(submission, tmp_path / "sub.csv"), write(labels[list(UID_COLUMNS)], tmp_path / "test.csv")


def test_check_lists_violations_and_exits_1(tmp_path, cli):
    sub, studies = submission_files(
        tmp_path,
        {
            "good": ([0.1, 0.9], CONSISTENT_POSITIVE),
            "bad": ([0.1, 0.9], CONSISTENT_POSITIVE | {"negative_exam_for_pe": 0.6, "rightsided_pe": 0.2}),
            "badneg": ([0.1], CONSISTENT_NEGATIVE | {"indeterminate": 0.8}),
        },
    )
    result = cli("check", sub, "--studies", studies)
    assert result.exit_code == 1
    lines = sorted(line.split("\t")[:2] for line in result.stdout.strip().splitlines())
    assert lines == [["bad", "positive_location"], ["bad", "positive_not_negative"], ["badneg", "negative_one_of"]]
    assert "2 of 3 studies break the rules" in result.stderr


def test_fix_writes_consistent_file_and_keeps_consistent_exams_identical(tmp_path, cli):
    good_image = [0.123456789012345, 0.87654321]
    sub, studies = submission_files(
        tmp_path,
        {
            "good": (good_image, CONSISTENT_POSITIVE | {"central_pe": 0.3333333333333333}),
            # One slice barely positive, exam labels confidently negative: cheaper to make it negative.
            "flip": ([0.1, 0.51, 0.2], CONSISTENT_NEGATIVE),
            # Strongly positive slices, exam labels missing a location: cheaper to raise a location.
            "pos": ([0.95, 0.97, 0.2], CONSISTENT_POSITIVE | {"rightsided_pe": 0.45}),
        },
    )
    # Write the consistent exam's values in an unusual but valid form: they must survive verbatim.
    text = sub.read_text().replace("good.0,0.123456789012345", "good.0,1.23456789012345e-01")
    sub.write_text(text)
    out = tmp_path / "fixed.csv"
    result = cli("check", sub, "--studies", studies, "--fix", out)
    assert result.exit_code == 1  # the input was broken
    assert "fixed 2 studies (1 made positive, 1 negative)" in result.stderr

    original_lines = text.splitlines()
    fixed_lines = out.read_text().splitlines()
    assert len(fixed_lines) == len(original_lines)
    assert [line for line in fixed_lines if line.startswith("good")] == [
        line for line in original_lines if line.startswith("good")
    ]
    fixed = read_submission(out).set_index("id")["label"]
    assert fixed["flip.1"] == LOWERED and fixed["flip_negative_exam_for_pe"] == 0.9
    assert fixed["pos_rightsided_pe"] == RAISED and fixed["pos.0"] == 0.95

    again = cli("check", out, "--studies", studies)
    assert again.exit_code == 0, again.output
    assert "all 3 studies are consistent" in again.stderr


probability = st.floats(min_value=0.001, max_value=0.999, allow_nan=False)
# Values close to the threshold make the choice between edits a close call.
near_half = st.floats(min_value=0.45, max_value=0.55, allow_nan=False)
value = st.one_of(probability, near_half)


@st.composite
def exams(draw, max_slices=4):
    n = draw(st.integers(min_value=1, max_value=max_slices))
    image = np.array(draw(st.lists(value, min_size=n, max_size=n)))
    exam = {label: draw(value) for label in EXAM_LABELS}
    return image, exam


def brute_force_cheapest(image: np.ndarray, exam: dict[str, float]) -> float:
    """Try every set of values to move across 0.5; the cheapest that leaves the exam consistent."""
    slice_weight = IMAGE_WEIGHT * image.mean()
    names = [("image", i) for i in range(len(image))] + [("exam", label) for label in EXAM_LABELS]
    best = np.inf
    for flips in itertools.product((False, True), repeat=len(names)):
        new_image, new_exam, cost = image.copy(), dict(exam), 0.0
        for (kind, key), flip in zip(names, flips):
            if not flip:
                continue
            old = image[key] if kind == "image" else exam[key]
            new = LOWERED if old > 0.5 else RAISED
            weight = slice_weight if kind == "image" else EXAM_WEIGHTS[key]
            cost += float(edit_cost(old, new, weight))
            if kind == "image":
                new_image[key] = new
            else:
                new_exam[key] = new
        if cost < best and not exam_violations(new_image, new_exam):
            best = cost
    return best


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exams(max_slices=3))
def test_each_edit_is_the_cheapest_of_its_direction(exam_values):
    image, exam = exam_values
    positive = cheapest_positive_edit(image, exam)
    negative = cheapest_negative_edit(image, exam)
    if exam_violations(image, exam):
        assert min(positive.cost, negative.cost) == pytest.approx(brute_force_cheapest(image, exam), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.lists(exams(), min_size=1, max_size=6))
def test_fixed_submission_always_passes(exam_list):
    exams_by_study = {f"s{k}": (list(image), exam) for k, (image, exam) in enumerate(exam_list)}
    labels = make_labels({s: [0] * len(image) for s, (image, _) in exams_by_study.items()}, {})
    image_values = {f"{s}.{i}": v for s, (image, _) in exams_by_study.items() for i, v in enumerate(image)}
    submission = make_submission(labels, image_values.get, lambda s, label: exams_by_study[s][1][label])
    submission = submission.assign(label_text=submission["label"].map(repr))
    studies = labels[list(UID_COLUMNS)]
    aligned = align(submission, studies)
    fixed, report = fix_submission(submission, aligned)

    assert find_violations(align(fixed, studies)) == []
    broken = {v.study_uid for v in find_violations(aligned)}
    assert {r.study_uid for r in report} == broken
    for r in report:
        assert r.cost <= r.other_cost  # the chosen edit never costs more than the other choice
        assert r.cost > 0  # a broken exam is never repaired for free: some value crosses 0.5
    # Exams that were consistent are untouched, value for value and text for text.
    untouched = ~fixed["id"].str.split(r"[._]", regex=True).str[0].isin(broken)
    assert (fixed.loc[untouched, "label_text"] == submission.loc[untouched, "label_text"]).all()
    assert (fixed.loc[untouched, "label"] == submission.loc[untouched, "label"]).all()


def test_check_rejects_incomplete_submission(tmp_path, cli):
    sub, studies = submission_files(tmp_path, {"a": ([0.1, 0.2], CONSISTENT_NEGATIVE)})
    frame = pd.read_csv(sub)
    write(frame[frame["id"] != "a.1"], sub)
    result = cli("check", sub, "--studies", studies)
    assert result.exit_code == 2
    assert "1 expected id(s) are missing: 'a.1'" in result.stderr


def test_read_studies_accepts_full_train_csv(tmp_path):
    labels = make_labels({"x": [1, 0]}, {"x": {"central_pe": 1}})
    studies = read_studies(write(labels, tmp_path / "train.csv"))
    assert list(studies.columns) == list(UID_COLUMNS)
    assert studies[SOP].tolist() == ["x.0", "x.1"] and studies[STUDY].tolist() == ["x", "x"]
