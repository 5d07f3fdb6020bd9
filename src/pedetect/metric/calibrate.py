"""Operating points of the exam-level PE decision, chosen on labelled studies (``pedetect calibrate``).

The decision is the challenge's: an exam is positive when its highest slice probability is above
the threshold (strictly). The candidate thresholds are the studies' own scores (and 0): with the
decision ``score > t`` each gives a distinct split of the studies. Two points are chosen:

- ``sensitivity_<target>``: the highest candidate whose sensitivity is ≥ the target;
- ``youden``: the candidate with the largest Youden's J = sensitivity + specificity − 1 (the highest
  such threshold on ties).

They are recorded in the model folder as ``operating_points.json`` (:data:`OPERATING_POINTS_FILE`,
versioned, written atomically); :func:`read_operating_points` reads and checks it.
``pedetect.models.layout`` takes the file's name from here.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pedetect.io import file_sha256, write_json_atomic
from pedetect.metric.submission import InputError, read_labels, read_submission
from pedetect.metric.validation import confusion, study_scores

OPERATING_POINTS_FILE = "operating_points.json"
OPERATING_POINTS_VERSION = 1
DEFAULT_TARGET_SENSITIVITY = 0.95
DECISION = "exam positive when its highest slice probability (pe_present_on_image) is > threshold"
_POINT_NUMBERS = ("sensitivity", "specificity")


class OperatingPointsError(ValueError):
    """An operating-points file that cannot be used; the message names the file and the problem."""


def operating_points_file(model_dir: str | Path) -> Path:
    """``MODEL_DIR/operating_points.json``."""
    return Path(model_dir) / OPERATING_POINTS_FILE


def point_name(target_sensitivity: float) -> str:
    """``sensitivity_0.95`` for a target of 0.95."""
    return f"sensitivity_{target_sensitivity:g}"


def candidate_thresholds(score) -> Any:
    """The thresholds that give distinct decisions ``score > t``: 0 and the distinct scores, highest first."""
    return np.unique(np.r_[0.0, np.asarray(score, dtype=np.float64)])[::-1]


def _counts(truth, score, thresholds):
    """True positives and true negatives of ``score > t`` at each threshold, and the numbers of
    positive and negative studies."""
    truth = np.asarray(truth, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    positives, negatives = np.sort(score[truth]), np.sort(score[~truth])
    tp = len(positives) - np.searchsorted(positives, thresholds, side="right")
    tn = np.searchsorted(negatives, thresholds, side="right")
    return tp, tn, len(positives), len(negatives)


def threshold_for_sensitivity(truth, score, target: float) -> tuple[float, bool]:
    """The highest candidate threshold whose sensitivity is ≥ ``target``, and whether the target is
    reached (when no candidate reaches it, the lowest candidate, 0, and False)."""
    thresholds = candidate_thresholds(score)
    tp, _, n_pos, _ = _counts(truth, score, thresholds)
    reached = np.flatnonzero(tp >= target * n_pos - 1e-9)  # sensitivity >= target, without rounding
    if len(reached) == 0:
        return float(thresholds[-1]), False
    return float(thresholds[reached[0]]), True  # highest first


def youden_threshold(truth, score) -> float:
    """The candidate threshold with the largest sensitivity + specificity − 1 (the highest on ties)."""
    thresholds = candidate_thresholds(score)
    tp, tn, n_pos, n_neg = _counts(truth, score, thresholds)
    j = tp * n_neg + tn * n_pos  # J x n_pos x n_neg + n_pos x n_neg: integers, so ties are exact
    return float(thresholds[int(np.argmax(j))])  # the first maximum: the highest threshold


def _point(name: str, truth, score, threshold: float, **extra: Any) -> dict[str, Any]:
    c = confusion(truth, score, threshold)
    point = {"name": name, "threshold": threshold}
    for key in ("sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "ppv", "ppv_ci95"):
        point[key] = c[key]
    point.update({key: c[key] for key in ("npv", "npv_ci95", "tp", "fp", "tn", "fn")})
    point.update(extra)
    return point


def choose_operating_points(truth, score, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> list[dict]:
    """The two points (see the module's docstring) with their sensitivity, specificity, PPV and NPV
    and Wilson 95% intervals on these studies."""
    truth = np.asarray(truth, dtype=bool)
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"the target sensitivity must be in (0, 1], got {target_sensitivity}")
    if truth.all() or not truth.any():
        raise ValueError(
            f"the labels have {int(truth.sum())} positive and {int((~truth).sum())} negative studies: "
            "choosing a threshold needs both"
        )
    threshold, reached = threshold_for_sensitivity(truth, score, target_sensitivity)
    return [
        _point(
            point_name(target_sensitivity),
            truth,
            score,
            threshold,
            rule=f"the highest threshold whose sensitivity is >= {target_sensitivity:g}",
            target_sensitivity=target_sensitivity,
            target_reached=reached,
        ),
        _point(
            "youden",
            truth,
            score,
            youden_threshold(truth, score),
            rule="the threshold of the largest Youden's J = sensitivity + specificity - 1 (the highest on ties)",
        ),
    ]


def calibrate_files(
    labels_path: str | Path, submission_path: str | Path, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
) -> dict[str, Any]:
    """The operating-points record (:func:`validate_operating_points`' format) of a submission scored
    against labels (train.csv columns); raises :class:`~pedetect.metric.submission.InputError`."""
    scores = study_scores(read_labels(labels_path), read_submission(submission_path), submission_path)
    try:
        points = choose_operating_points(scores.pe_truth, scores.pe_score, target_sensitivity)
    except ValueError as error:
        raise InputError(f"{labels_path}: {error}") from None
    return {
        "version": OPERATING_POINTS_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "decision": DECISION,
        "studies": len(scores.pe_truth),
        "positives": int(scores.pe_truth.sum()),
        "points": points,
        "source": {
            "labels": str(Path(labels_path).resolve()),
            "submission": str(Path(submission_path).resolve()),
            "labels_sha256": file_sha256(labels_path),
            "submission_sha256": file_sha256(submission_path),
        },
    }


def _fail(source: str, message: str) -> OperatingPointsError:
    return OperatingPointsError(f"{source}: {message}")


def _probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def validate_operating_points(record: Any, source: str = "operating points") -> dict[str, Any]:
    """``record`` when it is a usable operating-points record, else :class:`OperatingPointsError`
    naming ``source`` and what is wrong. Checked: version 1; ``studies`` and ``positives`` counts;
    ``points`` a non-empty list of objects with a unique ``name`` and a ``threshold`` in [0, 1]
    (``sensitivity``/``specificity`` in [0, 1] or null, their ``_ci95`` a [low, high] pair or null)."""
    if not isinstance(record, Mapping):
        raise _fail(source, f"expected a JSON object, found {type(record).__name__}")
    version = record.get("version")
    if version != OPERATING_POINTS_VERSION:
        raise _fail(
            source,
            f"version {version!r} is not {OPERATING_POINTS_VERSION}, the version this pedetect reads "
            "(run pedetect calibrate again)",
        )
    for key in ("studies", "positives"):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _fail(source, f"'{key}' must be a count (a non-negative integer), found {value!r}")
    if record["positives"] > record["studies"]:
        raise _fail(source, f"'positives' ({record['positives']}) exceeds 'studies' ({record['studies']})")
    points = record.get("points")
    if not isinstance(points, list) or not points:
        raise _fail(source, "'points' must be a non-empty list of operating points")
    names = set()
    for k, point in enumerate(points):
        where = f"point {k + 1}"
        if not isinstance(point, Mapping):
            raise _fail(source, f"{where} is not an object")
        name = point.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(source, f"{where} has no 'name'")
        if name in names:
            raise _fail(source, f"two points are named {name!r}")
        names.add(name)
        if not _probability(point.get("threshold")):
            raise _fail(
                source, f"point {name!r}: 'threshold' must be a number in [0, 1], found {point.get('threshold')!r}"
            )
        for key in _POINT_NUMBERS:
            value = point.get(key)
            if value is not None and not _probability(value):
                raise _fail(source, f"point {name!r}: '{key}' must be a number in [0, 1] or null, found {value!r}")
            interval = point.get(f"{key}_ci95")
            if interval is not None and not (
                isinstance(interval, list)
                and len(interval) == 2
                and all(_probability(v) for v in interval)
                and interval[0] <= interval[1]
            ):
                raise _fail(
                    source, f"point {name!r}: '{key}_ci95' must be [low, high] in [0, 1] or null, found {interval!r}"
                )
    return dict(record)


def read_operating_points_file(path: str | Path) -> dict[str, Any]:
    """An operating-points file, checked (:func:`validate_operating_points`); :class:`OperatingPointsError`
    when it is missing, not JSON or not usable."""
    path = Path(path)
    if not path.is_file():
        raise OperatingPointsError(f"operating points file not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OperatingPointsError(f"{path}: not JSON ({error})") from None
    except OSError as error:
        raise OperatingPointsError(f"{path}: unreadable ({error})") from None
    return validate_operating_points(record, str(path))


def read_operating_points(model_dir: str | Path) -> dict[str, Any] | None:
    """A model folder's operating points (``MODEL_DIR/operating_points.json``), checked; ``None`` when
    the folder has none (``pedetect calibrate`` was not run); :class:`OperatingPointsError` when the
    file is there but unusable."""
    path = operating_points_file(model_dir)
    if not path.exists():
        return None
    return read_operating_points_file(path)


def first_operating_points(model_dirs) -> dict[str, Any] | None:
    """The operating points of the first of ``model_dirs`` that has them (an ensemble decides at its
    first bundle's points); ``None`` when none has."""
    return next((points for points in map(read_operating_points, model_dirs) if points is not None), None)


def resolve_operating_points(path: str | Path) -> Path:
    """The file of ``--operating-points``: the path itself, or a model folder's operating_points.json."""
    path = Path(path)
    return operating_points_file(path) if path.is_dir() else path


def write_operating_points(record: Mapping[str, Any], path: str | Path) -> Path:
    """Write a record (checked first) atomically: a reader sees the old file or the new one."""
    validate_operating_points(record, str(path))
    write_json_atomic(path, dict(record))
    return Path(path)


def format_operating_points(record: Mapping[str, Any]) -> str:
    """A plain-text table of a record's points."""

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def interval(ci) -> str:
        return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = [
        f"{record['studies']} studies, {record['positives']} positive; decision: {record.get('decision', DECISION)}",
        f"{'point':<20} {'threshold':>10} {'sensitivity':>24} {'specificity':>24}",
    ]
    for p in record["points"]:
        lines.append(
            f"{p['name']:<20} {p['threshold']:>10.4g} {number(p.get('sensitivity')):>7} "
            f"{interval(p.get('sensitivity_ci95')):>16} {number(p.get('specificity')):>7} {interval(p.get('specificity_ci95')):>16}"
        )
        if p.get("target_reached") is False:
            lines.append(f"  note: no threshold reaches sensitivity {p.get('target_sensitivity')}: the lowest is kept")
    return "\n".join(lines)
