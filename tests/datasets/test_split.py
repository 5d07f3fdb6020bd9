"""pedetect split: study-grouped, exam-label-stratified folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.train import fake_labels
from pedetect.data.folds import (
    FOLD,
    FoldsError,
    attach_folds,
    check_fold_index,
    fold_summary,
    iterative_stratification,
    make_folds,
    read_folds,
)
from pedetect.labels import EXAM_LABELS, STUDY


def skewed_labels(n_studies: int = 120, seed: int = 0) -> pd.DataFrame:
    """Labels with rare exam labels, varying slice counts."""
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(n_studies):
        frame = fake_labels(1, slices=int(rng.integers(4, 12)), seed=seed, prefix=f"x{s}_")
        for label in ("chronic_pe", "central_pe", "indeterminate"):
            frame[label] = int(rng.random() < 0.1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_folds_group_by_study_and_balance_sizes():
    labels = skewed_labels()
    folds = make_folds(labels, 5, seed=1)
    assert folds[STUDY].is_unique and set(folds[STUDY]) == set(labels[STUDY])
    sizes = folds[FOLD].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1
    # Every slice of a study is in the study's fold: the merge can give one fold per study only.
    merged = attach_folds(labels, folds)
    assert (merged.groupby(STUDY)[FOLD].nunique() == 1).all()


def test_folds_are_stratified_on_exam_labels():
    labels = skewed_labels(200, seed=3)
    folds = make_folds(labels, 4, seed=0)
    exams = labels.drop_duplicates(STUDY).merge(folds, on=STUDY)
    for label in EXAM_LABELS:
        per_fold = exams.groupby(FOLD)[label].sum()
        assert per_fold.max() - per_fold.min() <= 1, (label, per_fold.tolist())


def test_folds_are_deterministic_for_a_seed():
    labels = skewed_labels(60)
    a, b, c = make_folds(labels, 3, 7), make_folds(labels, 3, 7), make_folds(labels, 3, 8)
    assert a.equals(b)
    assert not a.equals(c)


def test_iterative_stratification_rare_label_spread():
    targets = np.zeros((30, 2), dtype=bool)
    targets[:3, 0] = True  # 3 rare rows over 3 folds: one each
    targets[3:18, 1] = True
    fold = iterative_stratification(targets, 3, seed=0)
    assert sorted(fold[:3]) == [0, 1, 2]
    assert np.bincount(fold[3:18], minlength=3).tolist() == [5, 5, 5]
    assert np.bincount(fold, minlength=3).tolist() == [10, 10, 10]


def test_too_few_studies_and_fold_range():
    with pytest.raises(FoldsError, match="cannot make"):
        make_folds(fake_labels(2), 3)
    with pytest.raises(FoldsError, match="out of range: there are 3 folds"):
        check_fold_index(3, 3)


def test_read_folds_checks_the_file(tmp_path):
    path = tmp_path / "folds.csv"
    pd.DataFrame({STUDY: ["a", "b", "c"], FOLD: [0, 2, 2]}).to_csv(path, index=False)
    with pytest.raises(FoldsError, match="without gaps"):
        read_folds(path)
    pd.DataFrame({STUDY: ["a", "a"], FOLD: [0, 1]}).to_csv(path, index=False)
    with pytest.raises(FoldsError, match="more than one row"):
        read_folds(path)
    with pytest.raises(FoldsError, match="not found"):
        read_folds(tmp_path / "missing.csv")


def test_attach_folds_names_studies_without_a_fold():
    labels = fake_labels(4)
    folds = make_folds(labels, 2).iloc[:-1]
    with pytest.raises(FoldsError, match="1 labelled studies have no fold"):
        attach_folds(labels, folds)


def test_split_command_writes_folds_and_prints_distribution(tmp_path, cli):
    labels = skewed_labels(30)
    labels_path, out = tmp_path / "train.csv", tmp_path / "folds.csv"
    labels.to_csv(labels_path, index=False)
    result = cli("split", labels_path, "--folds", 3, "--out", out, "--seed", 5)
    assert result.exit_code == 0, result.output
    folds = read_folds(out)
    assert len(folds) == 30 and folds[FOLD].nunique() == 3
    assert (
        folds.sort_values(STUDY)
        .reset_index(drop=True)
        .equals(make_folds(labels, 3, 5).sort_values(STUDY).reset_index(drop=True))
    )
    for column in ("studies", "pos_slices", "central_pe", "all"):
        assert column in result.output
    summary = fold_summary(labels, folds)
    assert summary.loc["all", "studies"] == 30


def test_split_command_reports_bad_labels(tmp_path, cli):
    path = tmp_path / "bad.csv"
    pd.DataFrame({STUDY: ["a"]}).to_csv(path, index=False)
    result = cli("split", path, "--folds", 2, "--out", tmp_path / "f.csv")
    assert result.exit_code == 2
    assert "missing label column" in result.output
