"""Reference predictors every model is compared against."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY, exam_id


def label_prior(labels: pd.DataFrame) -> dict[str, float]:
    """Training frequency of each label: slices for the image label, exams for the exam labels."""
    exams = labels.drop_duplicates(STUDY)
    prior = {IMAGE_LABEL: float(labels[IMAGE_LABEL].astype(float).mean())}
    prior.update({label: float(exams[label].astype(float).mean()) for label in EXAM_LABELS})
    return prior


def prior_submission(prior: dict[str, float], studies: pd.DataFrame) -> pd.DataFrame:
    """A submission predicting ``prior`` everywhere (``studies``: the UID columns, one row per slice)."""
    study_uids = studies[STUDY].unique()
    ids = [exam_id(s, label) for s in study_uids for label in EXAM_LABELS] + studies[SOP].tolist()
    values = np.concatenate(
        [np.tile([prior[label] for label in EXAM_LABELS], len(study_uids)), np.full(len(studies), prior[IMAGE_LABEL])]
    )
    return pd.DataFrame({"id": ids, "label": values})


def positive_exam_prior(labels: pd.DataFrame) -> dict[str, float]:
    """Frequency of each exam label among PE-positive training exams (some slice positive)."""
    exams = labels.groupby(STUDY, sort=False).agg({IMAGE_LABEL: "max", **dict.fromkeys(EXAM_LABELS, "first")})
    positive = exams[exams[IMAGE_LABEL].astype(float) > 0]
    if positive.empty:
        return dict.fromkeys(EXAM_LABELS, 0.0)
    return {label: float(positive[label].astype(float).mean()) for label in EXAM_LABELS}


def exam_from_slices(
    slice_probabilities: np.ndarray, prior: dict[str, float], positive_prior: dict[str, float]
) -> dict[str, float]:
    """Exam labels from slice probabilities alone (the "stage 1 alone" baseline).

    P(PE) is the highest slice probability. A PE-type label is P(PE) times its frequency among
    positive exams; negative_exam_for_pe and indeterminate share 1 − P(PE) in their prior ratio.
    """
    p_pe = float(np.max(slice_probabilities)) if len(slice_probabilities) else 0.0
    negative, indeterminate = prior["negative_exam_for_pe"], prior["indeterminate"]
    share = negative / (negative + indeterminate) if negative + indeterminate > 0 else 1.0
    exam = {label: p_pe * positive_prior[label] for label in EXAM_LABELS}
    exam["negative_exam_for_pe"] = (1 - p_pe) * share
    exam["indeterminate"] = (1 - p_pe) * (1 - share)
    return exam
