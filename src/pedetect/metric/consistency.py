"""Checking a submission against the label rules, and fixing it by the 1st place's method.

For each broken exam two repairs are built: the cheapest edit that makes it a consistent positive
exam and the cheapest that makes it a consistent negative one. An edit moves values just across 0.5
(to 0.5 ± :data:`FIX_MARGIN`); its cost is the weighted log loss it adds when the submission's own
values are taken as the truth: ``w · (BCE(p, p') − BCE(p, p))``, the metric's own BCE and weights.
The cheaper repair wins. Rules touch disjoint groups of labels, so the cheapest edit is the sum of
the cheapest repair of each group, each found exactly.

Slices weigh ``IMAGE_WEIGHT × q̂`` with q̂ the exam's mean slice probability: the expected fraction of
positive slices under the submission's own beliefs (the metric's q_j needs the truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pedetect.io import write_csv_atomic
from pedetect.labels import (
    CHRONICITY_LABELS,
    EXAM_LABELS,
    EXAM_WEIGHTS,
    IMAGE_WEIGHT,
    LOCATION_LABELS,
    NEGATIVE_LABELS,
    RV_LV_LABELS,
)
from pedetect.metric.loss import binary_cross_entropy
from pedetect.metric.rules import POSITIVE_ONLY_LABELS, THRESHOLD, exam_violations
from pedetect.metric.submission import AlignedSubmission

FIX_MARGIN = 1e-4
RAISED = THRESHOLD + FIX_MARGIN
LOWERED = THRESHOLD - FIX_MARGIN

_LABEL_POSITION = {label: k for k, label in enumerate(EXAM_LABELS)}


def edit_cost(own: np.ndarray | float, new: np.ndarray | float, weight: np.ndarray | float) -> np.ndarray:
    """Weighted log loss added by replacing ``own`` with ``new``, ``own`` taken as the truth."""
    own = np.asarray(own, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    return weight * (binary_cross_entropy(own, new) - binary_cross_entropy(own, own))


@dataclass
class ExamEdit:
    """A set of value changes to one exam and what they cost."""

    image: dict[int, float] = field(default_factory=dict)  # slice position -> new value
    exam: dict[str, float] = field(default_factory=dict)  # exam label -> new value
    cost: float = 0.0


class _EditBuilder:
    """Builds the cheapest edit for one exam, group of labels by group of labels."""

    def __init__(self, image: np.ndarray, exam: dict[str, float]):
        self.image = image
        self.exam = exam
        slice_weight = IMAGE_WEIGHT * float(image.mean()) if len(image) else 0.0
        self.slice_weight = slice_weight
        self.edit = ExamEdit()

    def _label_cost(self, label: str, new: float) -> float:
        return float(edit_cost(self.exam[label], new, EXAM_WEIGHTS[label]))

    def _set_label(self, label: str, new: float) -> None:
        self.edit.exam[label] = new
        self.edit.cost += self._label_cost(label, new)

    def all_at_most_half(self, labels) -> None:
        for label in labels:
            if self.exam[label] > THRESHOLD:
                self._set_label(label, LOWERED)

    def at_least_one_above(self, labels) -> None:
        if not any(self.exam[label] > THRESHOLD for label in labels):
            self._set_label(min(labels, key=lambda label: self._label_cost(label, RAISED)), RAISED)

    def not_all_above(self, labels) -> None:
        if all(self.exam[label] > THRESHOLD for label in labels):
            self._set_label(min(labels, key=lambda label: self._label_cost(label, LOWERED)), LOWERED)

    def exactly_one_above(self, labels) -> None:
        above = [label for label in labels if self.exam[label] > THRESHOLD]
        if not above:
            self.at_least_one_above(labels)
            return
        # Keep the one whose lowering would cost most; lower the others.
        keep = max(above, key=lambda label: self._label_cost(label, LOWERED))
        for label in above:
            if label != keep:
                self._set_label(label, LOWERED)

    def some_slice_above(self) -> None:
        if len(self.image) and not np.any(self.image > THRESHOLD):
            costs = edit_cost(self.image, RAISED, self.slice_weight)
            i = int(np.argmin(costs))
            self.edit.image[i] = RAISED
            self.edit.cost += float(costs[i])

    def no_slice_above(self) -> None:
        above = np.flatnonzero(self.image > THRESHOLD)
        if len(above):
            self.edit.image.update({int(i): LOWERED for i in above})
            self.edit.cost += float(edit_cost(self.image[above], LOWERED, self.slice_weight).sum())


def cheapest_positive_edit(image: np.ndarray, exam: dict[str, float]) -> ExamEdit:
    """The cheapest edit after which the exam is a consistent positive exam."""
    builder = _EditBuilder(image, exam)
    builder.some_slice_above()
    builder.exactly_one_above(RV_LV_LABELS)
    builder.at_least_one_above(LOCATION_LABELS)
    builder.not_all_above(CHRONICITY_LABELS)
    builder.all_at_most_half(NEGATIVE_LABELS)
    return builder.edit


def cheapest_negative_edit(image: np.ndarray, exam: dict[str, float]) -> ExamEdit:
    """The cheapest edit after which the exam is a consistent negative exam."""
    builder = _EditBuilder(image, exam)
    builder.no_slice_above()
    builder.exactly_one_above(NEGATIVE_LABELS)
    builder.all_at_most_half(POSITIVE_ONLY_LABELS)
    return builder.edit


@dataclass(frozen=True)
class Violation:
    study_uid: str
    rule: str


@dataclass(frozen=True)
class FixedExam:
    study_uid: str
    direction: str  # "positive" or "negative": which consistent form the exam was given
    cost: float  # weighted log loss the chosen edit adds
    other_cost: float  # what the other direction would have cost
    n_changed: int


def _exam_values(aligned: AlignedSubmission, j: int) -> dict[str, float]:
    return {label: float(aligned.exam_prediction[j, k]) for k, label in enumerate(EXAM_LABELS)}


def _slices_of_each_exam(aligned: AlignedSubmission) -> list[np.ndarray]:
    bounds = np.searchsorted(aligned.exam_index, np.arange(len(aligned.study_uids) + 1))
    return [np.arange(bounds[j], bounds[j + 1]) for j in range(len(aligned.study_uids))]


def find_violations(aligned: AlignedSubmission) -> list[Violation]:
    """Every broken rule of every exam, in study order."""
    violations = []
    for j, rows in enumerate(_slices_of_each_exam(aligned)):
        for rule in exam_violations(aligned.image_prediction[rows], _exam_values(aligned, j)):
            violations.append(Violation(str(aligned.study_uids[j]), rule))
    return violations


def fix_submission(submission: pd.DataFrame, aligned: AlignedSubmission) -> tuple[pd.DataFrame, list[FixedExam]]:
    """A consistent copy of ``submission``; rows of consistent exams keep their exact text."""
    fixed = submission.copy()
    label_text = fixed["label_text"].to_numpy(dtype=object).copy()
    values = fixed["label"].to_numpy(dtype=np.float64).copy()
    report = []
    for j, rows in enumerate(_slices_of_each_exam(aligned)):
        image = aligned.image_prediction[rows]
        exam = _exam_values(aligned, j)
        if not exam_violations(image, exam):
            continue
        positive = cheapest_positive_edit(image, exam)
        negative = cheapest_negative_edit(image, exam)
        chosen, other, direction = (
            (positive, negative, "positive") if positive.cost <= negative.cost else (negative, positive, "negative")
        )
        for position, new in chosen.image.items():
            row = aligned.image_row[rows[position]]
            values[row], label_text[row] = new, repr(new)
        for label, new in chosen.exam.items():
            row = aligned.exam_row[j, _LABEL_POSITION[label]]
            values[row], label_text[row] = new, repr(new)
        report.append(
            FixedExam(
                str(aligned.study_uids[j]),
                direction,
                chosen.cost,
                other.cost,
                len(chosen.image) + len(chosen.exam),
            )
        )
    fixed["label"] = values
    fixed["label_text"] = label_text
    return fixed, report


def write_submission(submission: pd.DataFrame, path) -> None:
    """Write ``id,label`` atomically, each value as its ``label_text``."""
    out = submission[["id", "label_text"]].rename(columns={"label_text": "label"})
    write_csv_atomic(out, path)
