"""Building label and submission files for the metric tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, INFO_LABELS, SERIES, SOP, STUDY, TRAIN_COLUMNS, exam_id


def make_labels(image_truth: dict[str, list[int]], exam_truth: dict[str, dict[str, int]]) -> pd.DataFrame:
    """train.csv rows: ``image_truth[study]`` lists each slice's label; missing exam labels are 0."""
    rows = []
    for study, slices in image_truth.items():
        for i, value in enumerate(slices):
            row = {STUDY: study, SERIES: f"{study}.s", SOP: f"{study}.{i}", IMAGE_LABEL: value}
            row.update({label: exam_truth.get(study, {}).get(label, 0) for label in EXAM_LABELS})
            row.update(dict.fromkeys(INFO_LABELS, 0))
            rows.append(row)
    return pd.DataFrame(rows)[list(TRAIN_COLUMNS)]


def make_submission(labels: pd.DataFrame, image_pred, exam_pred) -> pd.DataFrame:
    """Submission for ``labels``: image_pred(sop) and exam_pred(study, label) give each value."""
    rows = []
    for study in labels[STUDY].unique():
        rows += [(exam_id(study, label), exam_pred(study, label)) for label in EXAM_LABELS]
    rows += [(sop, image_pred(sop)) for sop in labels[SOP]]
    return pd.DataFrame(rows, columns=["id", "label"])


def random_labels(rng: np.random.Generator, n_studies: int, max_slices: int = 12) -> pd.DataFrame:
    """Consistent random truth: a third of exams positive, each with some positive slices."""
    image, exam = {}, {}
    for s in range(n_studies):
        study = f"1.2.3.{s}"
        n = int(rng.integers(3, max_slices + 1))
        positive = rng.random() < 0.35
        slices = (rng.random(n) < 0.3).astype(int) if positive else np.zeros(n, dtype=int)
        if positive and slices.sum() == 0:
            slices[rng.integers(n)] = 1
        image[study] = slices.tolist()
        if slices.sum():
            truth = {"central_pe": 1, "rv_lv_ratio_gte_1": int(rng.random() < 0.5)}
            truth["rv_lv_ratio_lt_1"] = 1 - truth["rv_lv_ratio_gte_1"]
            truth["rightsided_pe"] = int(rng.random() < 0.7)
        else:
            truth = {"negative_exam_for_pe": 1}
        exam[study] = truth
    return make_labels(image, exam)


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path
