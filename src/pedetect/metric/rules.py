"""The challenge's label-consistency rules, as plain functions of one exam (the rules are :data:`RULES`).

An exam is positive when any of its slices has probability > 0.5. Each rule has a short name that
`pedetect check` prints; the fixer in :mod:`pedetect.metric.consistency` repairs exactly these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pedetect.labels import CHRONICITY_LABELS, LOCATION_LABELS, NEGATIVE_LABELS, RV_LV_LABELS

THRESHOLD = 0.5

# Labels that must all be <= 0.5 in a negative exam.
POSITIVE_ONLY_LABELS: tuple[str, ...] = RV_LV_LABELS + LOCATION_LABELS + CHRONICITY_LABELS

RULES: dict[str, str] = {
    "positive_rv_lv": "positive exam: exactly one of rv_lv_ratio_gte_1 / rv_lv_ratio_lt_1 must be > 0.5",
    "positive_location": "positive exam: at least one of central_pe / rightsided_pe / leftsided_pe must be > 0.5",
    "positive_chronicity": "positive exam: chronic_pe and acute_and_chronic_pe must not both be > 0.5",
    "positive_not_negative": "positive exam: negative_exam_for_pe and indeterminate must both be <= 0.5",
    "negative_one_of": "negative exam: exactly one of negative_exam_for_pe / indeterminate must be > 0.5",
    "negative_no_pe_labels": "negative exam: rv_lv, central, right, left, chronic, acute_and_chronic must be <= 0.5",
}


def exam_is_positive(image_probs: np.ndarray) -> bool:
    """An exam is positive when any slice is predicted above the threshold."""
    return bool(np.any(np.asarray(image_probs) > THRESHOLD))


def exam_violations(image_probs: np.ndarray, exam: Mapping[str, float]) -> list[str]:
    """Names of the rules (keys of :data:`RULES`) that one exam breaks; empty when consistent."""
    above = {label: exam[label] > THRESHOLD for label in POSITIVE_ONLY_LABELS + NEGATIVE_LABELS}
    broken: list[str] = []
    if exam_is_positive(image_probs):
        if sum(above[label] for label in RV_LV_LABELS) != 1:
            broken.append("positive_rv_lv")
        if not any(above[label] for label in LOCATION_LABELS):
            broken.append("positive_location")
        if all(above[label] for label in CHRONICITY_LABELS):
            broken.append("positive_chronicity")
        if any(above[label] for label in NEGATIVE_LABELS):
            broken.append("positive_not_negative")
    else:
        if sum(above[label] for label in NEGATIVE_LABELS) != 1:
            broken.append("negative_one_of")
        if any(above[label] for label in POSITIVE_ONLY_LABELS):
            broken.append("negative_no_pe_labels")
    return broken
