"""A whole synthetic dataset in the RSNA-STR layout: DICOM folders plus the label CSVs."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pandas as pd

from pedetect.io import write_csv_atomic
from pedetect.labels import EXAM_LABELS, SOP, STUDY, SUBMISSION_COLUMNS, TRAIN_COLUMNS, UID_COLUMNS, exam_id
from pedetect.synth.dicom import TRANSFER_SYNTAXES, enhanced_slice_ids, write_enhanced_series, write_series
from pedetect.synth.phantom import INDETERMINATE_FRACTION, POSITIVE_FRACTION, SPLITS, plan_study
from pedetect.synth.render import render_plan


def sample_submission(labels: pd.DataFrame, value: float = 0.5) -> pd.DataFrame:
    """``id,label``: nine exam rows per study (``<Study>_<label>``), then one row per slice."""
    studies = labels[STUDY].drop_duplicates().tolist()
    ids = [exam_id(s, label) for s in studies for label in EXAM_LABELS] + labels[SOP].tolist()
    return pd.DataFrame({SUBMISSION_COLUMNS[0]: ids, SUBMISSION_COLUMNS[1]: value})


def _write_study(
    index: int,
    *,
    root: Path,
    seed: int,
    split: str,
    slices: int | None,
    size: int,
    positive_fraction: float,
    indeterminate_fraction: float,
    min_embolus_pixels: int,
    transfer_syntax: str,
    enhanced: bool,
) -> pd.DataFrame:
    """Render and write study ``index``; its labels (train.csv columns)."""
    plan = plan_study(
        index,
        seed=seed,
        split=split,
        slices=slices,
        size=size,
        positive_fraction=positive_fraction,
        indeterminate_fraction=indeterminate_fraction,
        min_embolus_pixels=min_embolus_pixels,
    )
    rendered = render_plan(plan)
    study_labels = plan.labels_frame()
    if enhanced:
        write_enhanced_series(plan, rendered.stored, root, transfer_syntax)
        study_labels[SOP] = enhanced_slice_ids(plan)
    else:
        write_series(plan, rendered.stored, root, transfer_syntax)
    return study_labels


def write_dataset(
    out: Path,
    n_studies: int,
    *,
    slices: int | None = None,
    size: int = 256,
    seed: int = 0,
    split: str = "train",
    transfer_syntax: str = "explicit",
    positive_fraction: float = POSITIVE_FRACTION,
    indeterminate_fraction: float = INDETERMINATE_FRACTION,
    min_embolus_pixels: int = 0,
    progress: bool = True,
    enhanced: bool = False,
    workers: int = 1,
) -> pd.DataFrame:
    """Write ``n_studies`` synthetic CTPA studies under ``out/<split>/<Study>/<Series>/<SOP>.dcm``.

    train: ``out/train.csv``. test: ``out/test.csv`` (UIDs only), ``out/test_labels.csv`` (the truth,
    train.csv columns) and ``out/sample_submission.csv``. Returns the labels (train.csv columns, one
    row per slice, studies in index order, slices in position order). Study k is the same whatever
    ``n_studies`` (it depends on seed, split, k and the options only). ``min_embolus_pixels``: every
    embolus shows at least that many pixels on each slice it marks (:func:`plan_study`).
    ``enhanced``: each study is one Enhanced CT file ``<Study>/<Series>/<SOP>.dcm`` instead, and the
    labels name its slices as the reader does, ``<SOPInstanceUID>#<frame>``. ``workers`` > 1: studies
    are rendered in that many processes (the files and labels are the same).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if n_studies < 0:
        raise ValueError("n_studies must be >= 0")
    if slices is not None and slices < 1:
        raise ValueError("slices must be >= 1")
    if size < 32:
        raise ValueError("size must be >= 32")
    out = Path(out)
    root = out / split
    root.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise ValueError("workers must be >= 1")
    write = partial(
        _write_study,
        root=root,
        seed=seed,
        split=split,
        slices=slices,
        size=size,
        positive_fraction=positive_fraction,
        indeterminate_fraction=indeterminate_fraction,
        min_embolus_pixels=min_embolus_pixels,
        transfer_syntax=transfer_syntax,
        enhanced=enhanced,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_studies, desc=f"synth {split}", unit="study", file=sys.stderr)
    frames = []
    with ExitStack() as stack:
        if workers > 1 and n_studies > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Every study depends on (seed, split, index) alone, so the processes write the same files.
            context = multiprocessing.get_context("spawn")  # no fork of a caller that holds torch's threads
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, n_studies), mp_context=context))
            studies = pool.map(write, range(n_studies), chunksize=4)
        else:
            studies = map(write, range(n_studies))
        for study_labels in studies:  # in index order
            frames.append(study_labels)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    labels = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TRAIN_COLUMNS))
    if split == "train":
        write_csv_atomic(labels, out / "train.csv")
    else:
        write_csv_atomic(labels[list(UID_COLUMNS)], out / "test.csv")
        write_csv_atomic(labels, out / "test_labels.csv")
        write_csv_atomic(sample_submission(labels), out / "sample_submission.csv")
    return labels


__all__ = ["write_dataset", "sample_submission"]
