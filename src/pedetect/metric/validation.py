"""The validation report of ``pedetect evaluate --report DIR``: every number with its uncertainty.

What a hospital signs off and a paper cites (docs/evaluation.md):

- AUROC per exam label, for slices, and for the exam-level PE decision, each with a 95% interval
  from a bootstrap over studies (:func:`resample_counts`; slices: a study's slices go with it);
- sensitivity, specificity, PPV and NPV with Wilson 95% intervals (:func:`wilson_interval`) at the
  challenge's 0.5 and at the operating points ``pedetect calibrate`` recorded;
- calibration: a reliability diagram of :data:`CALIBRATION_BINS` equal-width bins and the expected
  calibration error (:func:`calibration`);
- the competition metric and its parts, from :func:`pedetect.metric.evaluate.evaluate_frames` (the
  one implementation of the metric);
- subgroups of the studies by their own DICOM headers (:mod:`pedetect.metric.subgroups`).

The exam-level PE decision is the challenge's: an exam is positive when any of its slices is above
the threshold; its score (for the ROC) is the highest slice probability of the study, and its truth
is "some slice is labelled positive" (``pe_present_on_image``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, NEGATIVE_LABELS, SOP, STUDY
from pedetect.metric.evaluate import evaluate_frames, roc_auc
from pedetect.metric.rules import THRESHOLD
from pedetect.metric.submission import align

REPORT_VERSION = 1
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 2020
CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the normal quantile at 0.975 (scipy.stats.norm.ppf(0.975))
CALIBRATION_BINS = 10
SMALL_GROUP = 10  # a subgroup of fewer studies (or without positives or negatives) is "small"
EXAM_PE = "exam_pe"  # the exam-level PE decision's key in the report
CHALLENGE_POINT = "challenge_0.5"
# Rows of the resample-count matrix handled at once: bounds the memory of the bootstrap (B x J floats).
CHUNK_ELEMENTS = 4_000_000

EXAM_PE_DEFINITION = (
    "exam positive when any slice's pe_present_on_image probability is > threshold (the challenge's rule); "
    "score for the ROC: the study's highest slice probability; truth: some slice of the study is labelled positive"
)


# ------------------------------------------------------------------------------------ proportions


def wilson_interval(k: int, n: int, z: float = Z_95) -> list[float] | None:
    """The Wilson score interval of ``k`` successes in ``n`` trials (``None`` when ``n`` is 0):
    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)``, clipped to [0, 1]."""
    if n <= 0:
        return None
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (rounding would leave 1e-17)
    high = 1.0 if k == n else min(1.0, centre + half)
    return [float(low), float(high)]


def _rate(k: int, n: int) -> float | None:
    return None if n == 0 else k / n


def confusion(truth: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Decisions ``score > threshold`` against ``truth``: the counts, and sensitivity, specificity,
    PPV and NPV with their Wilson intervals (``None`` where the denominator is 0)."""
    truth = np.asarray(truth, dtype=bool)
    called = np.asarray(score) > threshold
    tp, fn = int((called & truth).sum()), int((~called & truth).sum())
    fp, tn = int((called & ~truth).sum()), int((~called & ~truth).sum())
    out: dict[str, Any] = {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
    ):
        out[name] = _rate(k, n)
        out[f"{name}_ci95"] = wilson_interval(k, n)
    return out


# -------------------------------------------------------------------------------------- bootstrap


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, n)`` int32: how often each of ``n`` units (studies) is drawn in each resample of
    ``n`` draws with replacement (``rng.integers(0, n, (resamples, n))``, counted per row)."""
    if n == 0:
        return np.zeros((resamples, 0), dtype=np.int32)
    draws = rng.integers(0, n, size=(resamples, n))
    rows = (draws + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(rows, minlength=resamples * n).reshape(resamples, n).astype(np.int32)


def _chunks(rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def bootstrap_auc(target: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The AUC of each resample of units (one score per unit), all resamples at once.

    ``counts``: ``(B, n)`` draws of each unit per resample (:func:`resample_counts`). Each resample's
    AUC is the Mann-Whitney statistic with the drawn multiplicities as weights (ties count 1/2), which
    is what ``roc_auc_score`` gives on the resampled rows. NaN where a resample lacks a class."""
    target = np.asarray(target, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(score, kind="stable")
    sorted_score, positive = score[order], target[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    out = np.empty(counts.shape[0])
    for rows in _chunks(counts.shape[0], len(score)):
        weights = counts[rows][:, order].astype(np.float64)
        pos = np.add.reduceat(np.where(positive, weights, 0.0), starts, axis=1)
        neg = np.add.reduceat(np.where(positive, 0.0, weights), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negatives' weight strictly below each distinct score
        numerator = (pos * (below + 0.5 * neg)).sum(1)
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where((n_pos > 0) & (n_neg > 0), numerator / (n_pos * n_neg), np.nan)
    return out


def pair_matrix(target: np.ndarray, score: np.ndarray, cluster: np.ndarray, n_clusters: int) -> np.ndarray:
    """``K[a, c]``: over the positive items of cluster ``a`` and the negative items of cluster ``c``,
    the number of pairs the positive scores above (ties 1/2): the Mann-Whitney numerator by cluster."""
    target = np.asarray(target, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    cluster = np.asarray(cluster, dtype=np.int64)
    pos_score, pos_cluster = score[target], cluster[target]
    neg_score, neg_cluster = score[~target], cluster[~target]
    order = np.lexsort((neg_score, neg_cluster))
    neg_score, neg_cluster = neg_score[order], neg_cluster[order]
    bounds = np.searchsorted(neg_cluster, np.arange(n_clusters + 1))
    pairs = np.zeros((n_clusters, n_clusters))
    for c in np.flatnonzero(np.diff(bounds)):
        negatives = neg_score[bounds[c] : bounds[c + 1]]
        below = np.searchsorted(negatives, pos_score, side="left")
        tied = np.searchsorted(negatives, pos_score, side="right") - below
        pairs[:, c] = np.bincount(pos_cluster, weights=below + 0.5 * tied, minlength=n_clusters)
    return pairs


def bootstrap_clustered_auc(
    target: np.ndarray, score: np.ndarray, cluster: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """The AUC over items (slices) of each resample of clusters (studies): a cluster drawn k times
    brings all its items k times. ``counts``: ``(B, J)`` per cluster (:func:`resample_counts`).

    With ``K`` = :func:`pair_matrix` and ``w`` a resample's counts, the AUC is ``wᵀKw / (w·p)(w·n)``
    (p, n: positive and negative items per cluster): exact, as ``roc_auc_score`` on the resampled rows."""
    n_clusters = counts.shape[1]
    target = np.asarray(target, dtype=bool)
    cluster = np.asarray(cluster, dtype=np.int64)
    pairs = pair_matrix(target, score, cluster, n_clusters)
    positives = np.bincount(cluster[target], minlength=n_clusters).astype(np.float64)
    negatives = np.bincount(cluster[~target], minlength=n_clusters).astype(np.float64)
    out = np.empty(counts.shape[0])
    for rows in _chunks(counts.shape[0], n_clusters):
        weights = counts[rows].astype(np.float64)
        numerator = ((weights @ pairs) * weights).sum(1)
        n_pos, n_neg = weights @ positives, weights @ negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where((n_pos > 0) & (n_neg > 0), numerator / (n_pos * n_neg), np.nan)
    return out


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float] | None:
    """The percentile interval of the defined (non-NaN) resample values (numpy's linear percentile);
    ``None`` with fewer than two."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


# ------------------------------------------------------------------------------------ calibration


def calibration(truth: np.ndarray, probability: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability diagram and expected calibration error of probabilities against 0/1 truth.

    Bins are equal-width on [0, 1] (bin k holds k/bins ≤ p < (k+1)/bins; the last holds 1.0 too);
    ECE = Σ_k (n_k / N) · |observed_k − mean predicted_k| over the non-empty bins."""
    truth = np.asarray(truth, dtype=np.float64)
    probability = np.asarray(probability, dtype=np.float64)
    index = np.minimum((probability * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=probability, minlength=bins)
    observed = np.bincount(index, weights=truth, minlength=bins)
    total = len(probability)
    rows, ece = [], 0.0
    for k in range(bins):
        n = int(count[k])
        mean_p = float(predicted[k] / n) if n else None
        frac = float(observed[k] / n) if n else None
        if n:
            assert frac is not None and mean_p is not None  # both set for a non-empty bin
            ece += n / total * abs(frac - mean_p)
        rows.append(
            {
                "low": k / bins,
                "high": (k + 1) / bins,
                "count": n,
                "mean_predicted": mean_p,
                "observed": frac,
                "observed_ci95": wilson_interval(int(round(observed[k])), n),
            }
        )
    return {"bins": rows, "ece": float(ece) if total else None, "n": total}


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class StudyScores:
    """The arrays every figure of the report is computed from, studies in the labels' order."""

    study_uids: np.ndarray  # (J,)
    exam_index: np.ndarray  # (N,) study of each slice
    image_target: np.ndarray  # (N,) 0/1
    image_prediction: np.ndarray  # (N,)
    exam_target: np.ndarray  # (J, 9) EXAM_LABELS order
    exam_prediction: np.ndarray  # (J, 9)
    pe_truth: np.ndarray  # (J,) bool: some slice labelled positive
    pe_score: np.ndarray  # (J,) the highest slice probability
    slices: np.ndarray  # (J,) slices per study


def study_scores(
    labels: pd.DataFrame, submission: pd.DataFrame, submission_path: str | Path = "submission"
) -> StudyScores:
    """Align a submission (:func:`~pedetect.metric.submission.read_submission`) to parsed labels
    (:func:`~pedetect.metric.submission.read_labels`) and derive the exam-level PE score and truth."""
    aligned = align(submission, labels, submission_path)
    image_target = labels.set_index(SOP).loc[aligned.sop_uids, IMAGE_LABEL].to_numpy(dtype=np.float64)
    exams = labels.drop_duplicates(STUDY).set_index(STUDY)
    exam_target = exams.loc[aligned.study_uids, list(EXAM_LABELS)].to_numpy(dtype=np.float64)
    n_studies = len(aligned.study_uids)
    return StudyScores(
        study_uids=aligned.study_uids,
        exam_index=aligned.exam_index,
        image_target=image_target,
        image_prediction=aligned.image_prediction,
        exam_target=exam_target,
        exam_prediction=aligned.exam_prediction,
        **study_level(aligned.exam_index, image_target, aligned.image_prediction, n_studies),
    )


def study_level(exam_index: np.ndarray, image_target: np.ndarray, image_prediction: np.ndarray, n_studies: int):
    """``pe_truth`` (some slice positive), ``pe_score`` (highest slice probability) and ``slices`` per study."""
    score = np.full(n_studies, -np.inf)
    np.maximum.at(score, exam_index, image_prediction)
    slices = np.bincount(exam_index, minlength=n_studies)
    positives = np.bincount(exam_index, weights=image_target, minlength=n_studies)
    return {"pe_truth": positives > 0, "pe_score": score, "slices": slices}


# ------------------------------------------------------------------------------------ the report


@dataclass
class OperatingPoint:
    """A threshold the report states the exam-level decision at."""

    name: str
    threshold: float
    source: str
    calibrated: dict[str, Any] = field(default_factory=dict)  # what calibrate measured when it chose it


@dataclass
class ValidationResult:
    """The report (JSON-serialisable) and the curves its figures draw (not in the JSON)."""

    report: dict[str, Any]
    roc: dict[str, dict[str, np.ndarray] | None]  # per label: fpr, tpr (None: one class only, no curve)


def operating_points_from_record(record: Mapping[str, Any] | None, source: str) -> list[OperatingPoint]:
    """The challenge's 0.5, then every point of an operating-points record (``pedetect calibrate``)."""
    points = [
        OperatingPoint(CHALLENGE_POINT, THRESHOLD, "the challenge's rule: an exam is positive when a slice is > 0.5")
    ]
    for point in (record or {}).get("points", []):
        calibrated = {k: v for k, v in point.items() if k not in ("name", "threshold")}
        name = str(point["name"])
        name = f"{name} (recorded)" if name == CHALLENGE_POINT else name  # names stay unique
        points.append(OperatingPoint(name, float(point["threshold"]), source, calibrated))
    return points


def _roc_points(truth: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray] | None:
    if len(np.unique(truth)) < 2:
        return None
    from sklearn.metrics import roc_curve  # sklearn is slow to import: only the report's ROC curves need it

    fpr, tpr, thresholds = roc_curve(truth, score)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def _auc_entry(auc: float | None, resampled: np.ndarray) -> dict[str, Any]:
    return {
        "auc": auc,
        "auc_ci95": percentile_interval(resampled) if auc is not None else None,
        "auc_resamples_defined": int(np.count_nonzero(~np.isnan(resampled))),
    }


def _json_floats(values: np.ndarray) -> list[float | None]:
    """Floats for JSON: null for what is not finite (roc_curve's first threshold is +inf: no study called)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _reported(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def subgroup_table(
    scores: StudyScores,
    attributes: Mapping[str, Mapping[str, str]],
    points: Sequence[OperatingPoint],
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Per field and value: the studies' count, positives, negatives, AUROC of the exam-level PE
    decision with its bootstrap interval (resampling the group's studies; seeded per group) and
    sensitivity and specificity at each point with Wilson intervals; ``small`` when the group has
    fewer than :data:`SMALL_GROUP` studies or lacks positives or negatives (shown all the same)."""
    fields: dict[str, Any] = {}
    for field_number, (name, by_study) in enumerate(attributes.items()):
        values = np.array([by_study.get(uid, "unknown") for uid in scores.study_uids], dtype=object)
        groups = []
        for group_number, value in enumerate(sorted(set(values), key=_group_order)):
            members = np.flatnonzero(values == value)
            truth, score = scores.pe_truth[members], scores.pe_score[members]
            positives = int(truth.sum())
            negatives = len(members) - positives
            reasons = []
            if len(members) < SMALL_GROUP:
                reasons.append(f"fewer than {SMALL_GROUP} studies")
            if positives == 0:
                reasons.append("no positive study")
            if negatives == 0:
                reasons.append("no negative study")
            rng = np.random.default_rng([seed, 1 + field_number, group_number])
            resampled = bootstrap_auc(truth, score, resample_counts(len(members), resamples, rng))
            entry = {
                "value": value,
                "studies": len(members),
                "positives": positives,
                "negatives": negatives,
                **_auc_entry(_reported(roc_auc(truth, score)), resampled),
                "small": bool(reasons),
                "small_reason": "; ".join(reasons),
                "operating_points": {},
            }
            for point in points:
                c = confusion(truth, score, point.threshold)
                entry["operating_points"][point.name] = {
                    key: c[key]
                    for key in ("threshold", "tp", "fp", "tn", "fn")
                    + ("sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95")
                }
            groups.append(entry)
        fields[name] = {"groups": groups}
    return fields


def _group_order(value: str):
    """Groups of numbers in their order ("<=1 mm", "(1, 2] mm", ..., ">3 mm"; "<100", "100-199", ...,
    ">=400"), then names alphabetically, "unknown..." last."""
    if value.startswith("unknown"):
        return (2, 0.0, value)
    match = re.search(r"\d+(\.\d+)?", value)
    if match and value[:1] in "<>(0123456789":
        offset = -0.5 if value.startswith("<") else 0.5 if value.startswith(">") else 0.0
        return (0, float(match.group()) + offset, value)
    return (1, 0.0, value)


def validation_report(
    labels: pd.DataFrame,
    submission: pd.DataFrame,
    *,
    submission_path: str | Path = "submission",
    labels_path: str | Path = "labels",
    operating_points: Sequence[OperatingPoint] | None = None,
    attributes: Mapping[str, Mapping[str, str]] | None = None,
    subgroup_info: Mapping[str, Any] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> ValidationResult:
    """Every number of the report for parsed labels and a submission (see the module's docstring).

    ``operating_points``: the thresholds of the exam-level decision (default: the challenge's 0.5
    only); ``attributes``: per subgroup field, each study's value (:mod:`pedetect.metric.subgroups`).
    One set of ``resamples`` study resamples (``numpy.random.default_rng(seed)``) serves every label,
    the slices and the exam-level decision, so their intervals come from the same resampled studies."""
    if resamples < 1:
        raise ValueError("the bootstrap needs at least one resample")
    report = evaluate_frames(labels, submission, submission_path)
    scores = study_scores(labels, submission, submission_path)
    points = list(operating_points) if operating_points else operating_points_from_record(None, "")
    n_studies = len(scores.study_uids)
    counts = resample_counts(n_studies, resamples, np.random.default_rng(seed))
    roc: dict[str, dict[str, np.ndarray] | None] = {}

    # Slices: resample studies, take all their slices.
    image = report["labels"][IMAGE_LABEL]
    resampled = bootstrap_clustered_auc(scores.image_target, scores.image_prediction, scores.exam_index, counts)
    image.update(_auc_entry(image["auc"], resampled))
    image.update(
        n=len(scores.image_target),
        negatives=int(len(scores.image_target) - scores.image_target.sum()),
        at_threshold=confusion(scores.image_target, scores.image_prediction, THRESHOLD),
        calibration=calibration(scores.image_target, scores.image_prediction),
    )
    roc[IMAGE_LABEL] = _roc_points(scores.image_target, scores.image_prediction)
    for k, label in enumerate(EXAM_LABELS):
        truth, prediction = scores.exam_target[:, k], scores.exam_prediction[:, k]
        entry = report["labels"][label]
        entry.update(_auc_entry(entry["auc"], bootstrap_auc(truth, prediction, counts)))
        entry.update(
            n=n_studies,
            negatives=int(n_studies - truth.sum()),
            at_threshold=confusion(truth, prediction, THRESHOLD),
            calibration=calibration(truth, prediction),
        )
        roc[label] = _roc_points(truth, prediction)

    pe_auc = _reported(roc_auc(scores.pe_truth, scores.pe_score))
    pe_roc = _roc_points(scores.pe_truth, scores.pe_score)
    roc[EXAM_PE] = pe_roc
    negative_label = report["labels"]["negative_exam_for_pe"]
    exam_pe = {
        "definition": EXAM_PE_DEFINITION,
        "score": "max slice probability",
        "n": n_studies,
        "positives": int(scores.pe_truth.sum()),
        "negatives": int(n_studies - scores.pe_truth.sum()),
        **_auc_entry(pe_auc, bootstrap_auc(scores.pe_truth, scores.pe_score, counts)),
        "negative_exam_for_pe_auc": negative_label["auc"],
        "negative_exam_for_pe_auc_ci95": negative_label["auc_ci95"],
        "operating_points": [
            {"name": p.name, "source": p.source, **confusion(scores.pe_truth, scores.pe_score, p.threshold)}
            | ({"calibrated": p.calibrated} if p.calibrated else {})
            for p in points
        ],
        "roc": None if pe_roc is None else {key: _json_floats(values) for key, values in pe_roc.items()},
    }
    notes = []
    exam_negative = scores.exam_target[:, [EXAM_LABELS.index(label) for label in NEGATIVE_LABELS]].max(1) > 0
    disagree = int(
        (exam_negative == scores.pe_truth).sum()
    )  # a negative/indeterminate exam with a positive slice, or neither without one
    if disagree:
        notes.append(
            f"{disagree} study(ies) whose exam labels disagree with their slices (negative or indeterminate "
            "with a positive slice, or neither without one): the exam-level truth here is the slices'"
        )
    same = [p.name for p in points if p.calibrated.get("same_submission")]
    if same:
        notes.append(
            f"operating point(s) {', '.join(same)} were chosen on this same submission (pedetect calibrate): "
            "the figures at them are optimistic; validate them on other studies"
        )
    report.update(
        report_version=REPORT_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        inputs={"labels": str(labels_path), "submission": str(submission_path)},
        methods={
            "bootstrap": {
                "resamples": int(resamples),
                "seed": int(seed),
                "generator": "numpy.random.default_rng(seed).integers(0, studies, (resamples, studies))",
                "unit": "study: resample the studies with replacement; for slices, all slices of each drawn study",
                "interval": "percentile, 2.5th and 97.5th (numpy linear), over the resamples where the AUC is defined",
                "shared": "one set of resamples serves every label, the slices and the exam-level decision",
                "subgroups": "each subgroup resamples its own studies, seed [seed, field number, group number]",
            },
            "proportions": "Wilson score interval, z = 1.959964 (95%)",
            "calibration": f"{CALIBRATION_BINS} equal-width bins on [0, 1]; ECE = sum of bin share x |observed - mean predicted|",
            "auc": "sklearn.metrics.roc_auc_score (ties count 1/2)",
            "threshold_rule": "decision positive when the probability is > the threshold (strictly, as the challenge)",
        },
        exam_pe=exam_pe,
        operating_points=[
            {"name": p.name, "threshold": p.threshold, "source": p.source}
            | ({"calibrated": p.calibrated} if p.calibrated else {})
            for p in points
        ],
        notes=notes,
    )
    if attributes is not None:
        report["subgroups"] = dict(subgroup_info or {})
        report["subgroups"]["small_below"] = SMALL_GROUP
        report["subgroups"]["fields"] = subgroup_table(scores, attributes, points, resamples=resamples, seed=seed)
    return ValidationResult(report=report, roc=roc)


def format_validation(report: dict[str, Any]) -> str:
    """The report's headline numbers as plain text (the tables of ``pedetect evaluate`` come first)."""

    def interval(ci) -> str:
        return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"

    def number(value, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    boot = report["methods"]["bootstrap"]
    pe = report["exam_pe"]
    lines = [
        f"95% intervals: bootstrap over studies ({boot['resamples']} resamples, seed {boot['seed']}, percentile); "
        "Wilson for proportions",
        f"{'label':<24} {'AUC':>6} {'95% CI':>16} {'ECE':>6}",
    ]
    for label, row in report["labels"].items():
        lines.append(
            f"{label:<24} {number(row['auc']):>6} {interval(row['auc_ci95']):>16} {number(row['calibration']['ece']):>6}"
        )
    lines.append(
        f"{'exam PE (max slice)':<24} {number(pe['auc']):>6} {interval(pe['auc_ci95']):>16}"
        f"   ({pe['positives']} positive, {pe['negatives']} negative studies)"
    )
    lines.append("")
    lines.append(f"{'operating point':<22} {'threshold':>9} {'sensitivity':>24} {'specificity':>24}")
    for p in pe["operating_points"]:
        lines.append(
            f"{p['name']:<22} {p['threshold']:>9.4f} {number(p['sensitivity']):>7} {interval(p['sensitivity_ci95']):>16} "
            f"{number(p['specificity']):>7} {interval(p['specificity_ci95']):>16}"
        )
    for field_name, table in report.get("subgroups", {}).get("fields", {}).items():
        small = sum(g["small"] for g in table["groups"])
        lines.append(f"subgroups by {field_name}: {len(table['groups'])} groups ({small} small)")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)
