"""Cross-validation folds: grouped by study, stratified on the exam labels.

Every slice of a study lands in the same fold (a CNN must never see a study it later embeds
out-of-fold). Studies are spread over the folds by iterative stratification (Sechidis, Tsoumakas &
Vlahavas, 2011) on the nine exam labels plus "PE on any slice", so every fold gets its share of rare
labels such as chronic or central PE, and an equal number of studies.

The folds file is a CSV with two columns, ``StudyInstanceUID`` and ``fold`` (0 … K−1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY

FOLD = "fold"
PE_POSITIVE = "pe_positive"  # derived stratification label: some slice of the study is positive


class FoldsError(ValueError):
    """A folds file or a fold request that does not fit the labels."""


def study_table(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per study: the exam labels, ``pe_positive`` and the number of (positive) slices."""
    missing = [c for c in (STUDY, IMAGE_LABEL, *EXAM_LABELS) if c not in labels.columns]
    if missing:
        raise FoldsError(f"the labels lack column(s) {', '.join(missing)}")
    grouped = labels.groupby(STUDY, sort=True)
    table = grouped[list(EXAM_LABELS)].first().astype(int)
    table[PE_POSITIVE] = (grouped[IMAGE_LABEL].max() > 0).astype(int)
    table["slices"] = grouped.size()
    table["positive_slices"] = grouped[IMAGE_LABEL].sum().astype(int)
    return table


def iterative_stratification(targets: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row of a binary (rows × labels) matrix, with equal fold sizes (±1).

    The rarest label still to place goes first; each of its rows goes to the fold that wants that
    label most (ties: the fold that wants rows most, then at random). Rows with no label fill the
    folds that want rows most.
    """
    targets = np.asarray(targets, dtype=bool)
    n_rows, n_labels = targets.shape
    if n_rows < n_folds:
        raise FoldsError(f"{n_rows} studies cannot make {n_folds} folds")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_rows)
    targets = targets[order]
    wanted_rows = np.full(n_folds, n_rows / n_folds)
    wanted_labels = np.outer(np.ones(n_folds), targets.sum(0) / n_folds)  # (folds, labels)
    fold = np.full(n_rows, -1)
    remaining = targets.copy()
    unassigned = np.ones(n_rows, dtype=bool)

    def place(row: int | np.integer, preference: np.ndarray) -> None:
        candidates = np.flatnonzero(preference == preference.max())
        if len(candidates) > 1:
            by_rows = wanted_rows[candidates]
            candidates = candidates[by_rows == by_rows.max()]
        chosen = candidates[rng.integers(len(candidates))] if len(candidates) > 1 else candidates[0]
        fold[row] = chosen
        unassigned[row] = False
        wanted_rows[chosen] -= 1
        wanted_labels[chosen] -= targets[row]
        remaining[row] = False

    while remaining.any():
        counts = remaining.sum(0)
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for row in np.flatnonzero(remaining[:, label]):
            place(row, wanted_labels[:, label])
    for row in np.flatnonzero(unassigned):
        place(row, wanted_rows)
    out = np.empty(n_rows, dtype=int)
    out[order] = fold
    return out


def make_folds(labels: pd.DataFrame, n_folds: int, seed: int = 42) -> pd.DataFrame:
    """Study-grouped, exam-label-stratified folds: a frame of ``StudyInstanceUID, fold``."""
    if n_folds < 2:
        raise FoldsError(f"need at least 2 folds, got {n_folds}")
    table = study_table(labels)
    fold = iterative_stratification(table[[*EXAM_LABELS, PE_POSITIVE]].to_numpy(), n_folds, seed)
    return pd.DataFrame({STUDY: table.index.to_numpy(), FOLD: fold})


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read and check a folds CSV (one row per study, folds numbered 0 … K−1 with none empty)."""
    path = Path(path)
    if not path.is_file():
        raise FoldsError(f"folds file not found: {path}")
    folds = pd.read_csv(path, dtype={STUDY: str})
    missing = [c for c in (STUDY, FOLD) if c not in folds.columns]
    if missing:
        raise FoldsError(f"{path}: missing column(s) {', '.join(missing)} (expected {STUDY},{FOLD})")
    if folds[STUDY].duplicated().any():
        dup = folds.loc[folds[STUDY].duplicated(), STUDY].iloc[0]
        raise FoldsError(f"{path}: study {dup} is in more than one row")
    if not pd.api.types.is_integer_dtype(folds[FOLD]) or (folds[FOLD] < 0).any():
        raise FoldsError(f"{path}: '{FOLD}' must hold integers from 0")
    present = set(folds[FOLD].unique())
    if present != set(range(len(present))):
        raise FoldsError(f"{path}: folds must be numbered 0 … K−1 without gaps, found {sorted(present)}")
    return folds[[STUDY, FOLD]]


def n_folds_of(folds: pd.DataFrame) -> int:
    return int(folds[FOLD].max()) + 1


def attach_folds(labels: pd.DataFrame, folds: pd.DataFrame, *, source: str = "the folds") -> pd.DataFrame:
    """``labels`` with a ``fold`` column; every labelled study must have a fold."""
    merged = labels.merge(folds[[STUDY, FOLD]], on=STUDY, how="left")
    lacking = merged.loc[merged[FOLD].isna(), STUDY].unique()
    if len(lacking):
        raise FoldsError(
            f"{len(lacking)} labelled studies have no fold in {source} (first: {lacking[0]}); "
            "make the folds from the same labels (pedetect split)"
        )
    merged[FOLD] = merged[FOLD].astype(int)
    return merged


def check_fold_index(fold: int, n_folds: int) -> None:
    if not 0 <= fold < n_folds:
        raise FoldsError(f"fold {fold} is out of range: there are {n_folds} folds (0 … {n_folds - 1})")


def fold_summary(labels: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: studies, slices, positive-slice share, and each exam label's prevalence (rows: folds + all)."""
    table = study_table(labels).join(folds.set_index(STUDY)[FOLD], how="left")
    rows = []
    groups = [(str(k), g) for k, g in table.groupby(FOLD)] + [("all", table)]
    for name, group in groups:
        row = {
            FOLD: name,
            "studies": len(group),
            "slices": int(group["slices"].sum()),
            "pos_slices": round(float(group["positive_slices"].sum() / max(group["slices"].sum(), 1)), 4),
            PE_POSITIVE: round(float(group[PE_POSITIVE].mean()), 3),
        }
        row.update({label: round(float(group[label].mean()), 3) for label in EXAM_LABELS})
        rows.append(row)
    return pd.DataFrame(rows).set_index(FOLD)


def read_labels(path: str | Path) -> pd.DataFrame:
    """The RSNA train.csv (UIDs as strings); the columns this package needs are checked."""
    path = Path(path)
    if not path.is_file():
        raise FoldsError(f"labels file not found: {path}")
    labels = pd.read_csv(path, dtype={STUDY: str, "SeriesInstanceUID": str, SOP: str})
    missing = [c for c in (STUDY, "SeriesInstanceUID", SOP, IMAGE_LABEL, *EXAM_LABELS) if c not in labels.columns]
    if missing:
        raise FoldsError(f"{path}: missing label column(s) {', '.join(missing)}")
    return labels
