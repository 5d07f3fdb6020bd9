"""Reading and validating submissions and label files, and aligning them exam by exam.

Every problem with the input is one clear :class:`InputError` naming the file and the field, found
before any number is computed: a score computed over silently dropped rows would be a wrong score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY, SUBMISSION_COLUMNS, UID_COLUMNS, exam_id

MAX_SHOWN = 5  # ids shown in an error message


class InputError(ValueError):
    """A user-supplied file is unusable; the message says which file and what is wrong."""


def _examples(values) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:MAX_SHOWN])
    more = f" and {len(values) - MAX_SHOWN} more" if len(values) > MAX_SHOWN else ""
    return shown + more


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{what} file {path} is not a readable CSV: {error}") from None


def _require_columns(frame: pd.DataFrame, columns, path: Path, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{what} file {path} lacks column(s) {', '.join(missing)}; it has: {', '.join(frame.columns)}")


def _parse_probabilities(text: pd.Series, path: Path, column: str, ids: pd.Series) -> np.ndarray:
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) | (values < 0) | (values > 1)
    if bad.any():
        examples = [f"{i}={t!r}" for i, t in zip(ids[bad][:MAX_SHOWN], text[bad][:MAX_SHOWN])]
        raise InputError(
            f"{path}: column '{column}' has {int(bad.sum())} value(s) that are empty, not numbers, NaN "
            f"or outside [0, 1], e.g. {', '.join(examples)}"
        )
    return values


def read_submission(path: str | Path) -> pd.DataFrame:
    """A submission as columns ``id``, ``label`` (float) and ``label_text`` (as written in the file)."""
    path = Path(path)
    frame = _read_csv(path, "submission")
    _require_columns(frame, SUBMISSION_COLUMNS, path, "submission")
    frame = frame[list(SUBMISSION_COLUMNS)].rename(columns={"label": "label_text"})
    duplicated = frame["id"][frame["id"].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{path}: {len(duplicated)} id(s) appear more than once: {_examples(duplicated)}")
    frame["label"] = _parse_probabilities(frame["label_text"], path, "label", frame["id"])
    return frame


def read_studies(path: str | Path) -> pd.DataFrame:
    """The three UID columns of any CSV that has them (test.csv, train.csv, ...), one row per slice."""
    path = Path(path)
    frame = _read_csv(path, "studies")
    _require_columns(frame, UID_COLUMNS, path, "studies")
    frame = frame[list(UID_COLUMNS)]
    duplicated = frame[SOP][frame[SOP].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{path}: {len(duplicated)} {SOP}(s) appear more than once: {_examples(duplicated)}")
    return frame


def read_labels(path: str | Path) -> pd.DataFrame:
    """Ground truth in train.csv columns; labels parsed as 0/1 floats, checked constant per exam."""
    path = Path(path)
    frame = _read_csv(path, "labels")
    _require_columns(frame, UID_COLUMNS + (IMAGE_LABEL,) + EXAM_LABELS, path, "labels")
    frame = frame.copy()
    for column in (IMAGE_LABEL,) + EXAM_LABELS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            raise InputError(
                f"{path}: column '{column}' must hold 0 or 1; {int(bad.sum())} row(s) do not, "
                f"e.g. {_examples(frame.loc[bad, column].head(MAX_SHOWN))}"
            )
        frame[column] = values.astype(np.float64)
    duplicated = frame[SOP][frame[SOP].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{path}: {len(duplicated)} {SOP}(s) appear more than once: {_examples(duplicated)}")
    varying = frame.groupby(STUDY, sort=False)[list(EXAM_LABELS)].nunique().gt(1).any(axis=1)
    if varying.any():
        raise InputError(
            f"{path}: exam labels differ between slices of {int(varying.sum())} study(ies): "
            f"{_examples(varying[varying].index)}"
        )
    return frame


@dataclass(frozen=True)
class AlignedSubmission:
    """A submission's values arranged exam by exam, in the order of the studies file."""

    study_uids: np.ndarray  # (J,)
    sop_uids: np.ndarray  # (N,) slices grouped by exam
    exam_index: np.ndarray  # (N,) exam of each slice, in [0, J)
    image_prediction: np.ndarray  # (N,)
    exam_prediction: np.ndarray  # (J, 9), EXAM_LABELS order
    image_row: np.ndarray  # (N,) row of each slice value in the submission frame
    exam_row: np.ndarray  # (J, 9) row of each exam value in the submission frame


def expected_ids(studies: pd.DataFrame) -> pd.Index:
    """Every id a complete submission for these studies has: one per slice, nine per study."""
    study_uids = studies[STUDY].unique()
    exam_ids = [exam_id(study, label) for study in study_uids for label in EXAM_LABELS]
    return pd.Index(exam_ids + studies[SOP].tolist())


def align(
    submission: pd.DataFrame, studies: pd.DataFrame, submission_path: str | Path = "submission"
) -> AlignedSubmission:
    """Match every expected id to its submission row; missing or unknown ids are an error."""
    expected = expected_ids(studies)
    row_of = pd.Series(np.arange(len(submission)), index=pd.Index(submission["id"]))
    missing = expected.difference(row_of.index, sort=False)
    unknown = row_of.index.difference(expected, sort=False)
    problems = []
    if len(missing):
        problems.append(f"{len(missing)} expected id(s) are missing: {_examples(missing)}")
    if len(unknown):
        problems.append(f"{len(unknown)} id(s) belong to no study of the labels: {_examples(unknown)}")
    if problems:
        raise InputError(f"{submission_path}: " + "; ".join(problems))

    study_codes, study_uids = pd.factorize(studies[STUDY], sort=False)
    order = np.argsort(study_codes, kind="stable")
    sop_uids = studies[SOP].to_numpy()[order]
    image_row = row_of.loc[sop_uids].to_numpy()
    exam_keys = [exam_id(study, label) for study in study_uids for label in EXAM_LABELS]
    exam_row = row_of.loc[exam_keys].to_numpy().reshape(len(study_uids), len(EXAM_LABELS))
    values = submission["label"].to_numpy(dtype=np.float64)
    return AlignedSubmission(
        study_uids=np.asarray(study_uids),
        sop_uids=sop_uids,
        exam_index=study_codes[order].astype(np.int64),
        image_prediction=values[image_row],
        exam_prediction=values[exam_row],
        image_row=image_row,
        exam_row=exam_row,
    )
