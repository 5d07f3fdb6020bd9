"""Scoring a submission against ground truth: the metric, its parts, per-label log loss and AUC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY
from pedetect.metric.loss import weighted_log_loss_parts
from pedetect.metric.submission import align, read_labels, read_submission


def roc_auc(target: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC; NaN when the truth has a single class (AUC undefined). The one AUC of the package:
    evaluation, and the validation of both training stages."""
    if len(np.unique(target)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score  # sklearn is slow to import; most importers of this module compute no AUC

    return float(roc_auc_score(target, score))


def _reported_auc(target: np.ndarray, prediction: np.ndarray) -> float | None:
    """:func:`roc_auc` as the JSON report gives it: null where undefined."""
    auc = roc_auc(target, prediction)
    return None if np.isnan(auc) else auc


def evaluate_frames(
    labels: pd.DataFrame, submission: pd.DataFrame, submission_path: str | Path = "submission"
) -> dict[str, Any]:
    """The full report for parsed labels (:func:`read_labels`) and a submission (:func:`read_submission`)."""
    aligned = align(submission, labels, submission_path)
    truth_by_sop = labels.set_index(SOP)
    image_target = truth_by_sop.loc[aligned.sop_uids, IMAGE_LABEL].to_numpy(dtype=np.float64)
    exams = labels.drop_duplicates(STUDY).set_index(STUDY)
    exam_target = exams.loc[aligned.study_uids, list(EXAM_LABELS)].to_numpy(dtype=np.float64)

    parts = weighted_log_loss_parts(
        image_target, aligned.image_prediction, aligned.exam_index, exam_target, aligned.exam_prediction
    )
    n_exams = len(aligned.study_uids)
    per_label = {
        IMAGE_LABEL: {
            "log_loss": float(parts.image_score) if parts.image_weight > 0 else None,
            "auc": _reported_auc(image_target, aligned.image_prediction),
            "positives": int(image_target.sum()),
        }
    }
    for k, label in enumerate(EXAM_LABELS):
        per_label[label] = {
            "log_loss": float(parts.exam_loss_per_label[k] / n_exams),
            "auc": _reported_auc(exam_target[:, k], aligned.exam_prediction[:, k]),
            "positives": int(exam_target[:, k].sum()),
        }
    return {
        "score": float(parts.score),
        "image_part": float(parts.image_score) if parts.image_weight > 0 else None,
        "exam_part": float(parts.exam_score),
        "slice_auc": per_label[IMAGE_LABEL]["auc"],
        "n_studies": n_exams,
        "n_slices": int(len(aligned.sop_uids)),
        "labels": per_label,
    }


def evaluate_files(labels_path: str | Path, submission_path: str | Path) -> dict[str, Any]:
    """:func:`evaluate_frames` on two CSV files."""
    return evaluate_frames(read_labels(labels_path), read_submission(submission_path), submission_path)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_frames`' report."""

    def number(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:.4f}"

    lines = [
        f"studies {report['n_studies']}, slices {report['n_slices']}",
        f"score (weighted log loss) {report['score']:.5f}",
        f"  image part {number(report['image_part'])}   exam part {number(report['exam_part'])}",
        "",
        f"{'label':<24} {'log loss':>8} {'AUC':>8} {'positives':>10}",
    ]
    for label, row in report["labels"].items():
        lines.append(f"{label:<24} {number(row['log_loss']):>8} {number(row['auc']):>8} {row['positives']:>10}")
    return "\n".join(lines)
