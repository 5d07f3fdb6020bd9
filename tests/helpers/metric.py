"""Building label, submission, clot truth and clot candidate tables for the metric tests."""

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


# ------------------------------------------------------------- clot truth and candidates (FROC)
def clot(study, embolus, slice_index, box, pixels=12, side="left") -> dict:
    """One truth row: embolus ``embolus`` of ``study`` on slice ``slice_index``, box (row_min, row_max, col_min, col_max)."""
    row_min, row_max, col_min, col_max = box
    return {
        STUDY: study,
        SERIES: f"{study}.s",
        "embolus": embolus,
        "SOPInstanceUID": f"{study}.{slice_index}",
        "slice_index": slice_index,
        "row_min": row_min,
        "row_max": row_max,
        "col_min": col_min,
        "col_max": col_max,
        "pixels": pixels,
        "side": side,
        "level": "segmental",
        "kind": "acute",
        "artery": "test",
    }


def cand(study, number, score, slice_index, row, col) -> dict:
    """One candidate row (with a column the scoring ignores)."""
    return {
        STUDY: study,
        SERIES: f"{study}.s",
        "candidate": number,
        "score": score,
        "side": "left",
        "SOPInstanceUID": f"{study}.{slice_index}",
        "slice_index": slice_index,
        "row": row,
        "col": col,
        "z_mm": 0.0,
    }


def frames(truth_rows, candidate_rows) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth = pd.DataFrame(truth_rows, columns=list(clot("A", 1, 0, (0, 0, 0, 0))))
    candidates = pd.DataFrame(candidate_rows, columns=list(cand("A", 1, 0.5, 0, 0.0, 0.0)))
    return truth, candidates


def six_candidates_over_three_scans():
    """Scans A, B, C (C negative); emboli A#1 (central, 5 then 8 px), A#2 (left, 9 px), B#1 (right,
    25 then 20 px), B#2 (left, 26 then 3 px). Candidates by score: 0.95 hits A#1, 0.9 FP (in C), 0.8
    hits B#1, 0.7 FP, 0.6 FP, 0.5 hits A#2; B#2 is never hit."""
    truth_rows = [
        clot("A", 1, 10, (10, 12, 10, 12), pixels=5, side="central"),
        clot("A", 1, 11, (10, 12, 10, 12), pixels=8, side="central"),
        clot("A", 2, 30, (50, 53, 60, 63), pixels=9, side="left"),
        clot("B", 1, 5, (100, 105, 100, 105), pixels=25, side="right"),
        clot("B", 1, 6, (100, 104, 100, 104), pixels=20, side="right"),
        clot("B", 2, 20, (200, 206, 200, 206), pixels=26, side="left"),
        clot("B", 2, 21, (200, 201, 200, 201), pixels=3, side="left"),
    ]
    candidate_rows = [
        cand("A", 1, 0.95, 11, 11.0, 11.0),
        cand("C", 1, 0.9, 40, 50.0, 50.0),
        cand("B", 1, 0.8, 5, 102.0, 102.0),
        cand("A", 2, 0.7, 70, 10.0, 10.0),
        cand("B", 2, 0.6, 5, 150.0, 150.0),
        cand("A", 3, 0.5, 31, 51.0, 61.0),
    ]
    return frames(truth_rows, candidate_rows)
