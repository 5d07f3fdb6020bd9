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
