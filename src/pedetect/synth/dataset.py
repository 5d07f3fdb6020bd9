"""A whole synthetic dataset in the RSNA-STR layout: DICOM folders plus the label CSVs.

Beside the labels, the phantom's own clot truth: ``clots.csv`` (``test_clots.csv`` for the test
split), one row per embolus and slice its mask crosses, with whether a reader sees it there
(``visible``, docs/synthetic_visibility.md: the labels are the visible rows), and optionally a DICOM
Segmentation of each study's emboli, visible or not, in ``OUT/<split>_seg/<StudyInstanceUID>.dcm``
(outside ``OUT/<split>``, which prepare and predict read whole).
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
from pydicom.sr.codedict import codes
from tqdm.auto import tqdm

from pedetect import __version__
from pedetect.io import atomic_path, write_csv_atomic
from pedetect.labels import EXAM_LABELS, SERIES, SOP, STUDY, SUBMISSION_COLUMNS, TRAIN_COLUMNS, UID_COLUMNS, exam_id
from pedetect.synth.dicom import (
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    TRANSFER_SYNTAXES,
    enhanced_frame_numbers,
    enhanced_slice_ids,
    write_enhanced_series,
    write_series,
)
from pedetect.synth.phantom import INDETERMINATE_FRACTION, POSITIVE_FRACTION, SPLITS, StudyPlan, plan_study, uid
from pedetect.synth.render import render_plan

# The clot truth: one row per embolus and slice its mask crosses (clots.csv / test_clots.csv).
EMBOLUS = "embolus"
SLICE_INDEX = "slice_index"
VISIBLE = "visible"
CLOT_COLUMNS = (
    STUDY,
    SERIES,
    EMBOLUS,  # 1-based, in the order of StudyPlan.emboli (the values of RenderedStudy.emboli)
    SOP,  # the slice's name as the labels give it (Enhanced CT: <SOPInstanceUID>#<frame>)
    SLICE_INDEX,  # position order from 0, as the labels' rows
    "row_min",  # inclusive bounding box on the slice, in the stored image's own pixel grid
    "row_max",
    "col_min",
    "col_max",
    "pixels",  # embolus pixels on the slice
    "side",  # central (pulmonary trunk), right, left
    "level",  # main (trunk and main pulmonary arteries), lobar, segmental, subsegmental
    "kind",  # acute, chronic
    "artery",  # the phantom's vessel name
    VISIBLE,  # 1: a reader sees it on this slice (the slice is labelled positive), 0: drawn but not visible
)
CLOT_FILES = {"train": "clots.csv", "test": "test_clots.csv"}
SEG_MANUFACTURER = "pedetect synthetic phantom"


def clots_path(out: Path, split: str) -> Path:
    """Where :func:`write_dataset` puts the clot truth of ``split``: ``OUT/clots.csv``, ``OUT/test_clots.csv``."""
    return Path(out) / CLOT_FILES[split]


def clot_seg_folder(out: Path, split: str) -> Path:
    """Where :func:`write_dataset` puts the emboli's DICOM Segmentations: ``OUT/<split>_seg``."""
    return Path(out) / f"{split}_seg"


def sample_submission(labels: pd.DataFrame, value: float = 0.5) -> pd.DataFrame:
    """``id,label``: nine exam rows per study (``<Study>_<label>``), then one row per slice."""
    studies = labels[STUDY].drop_duplicates().tolist()
    ids = [exam_id(s, label) for s in studies for label in EXAM_LABELS] + labels[SOP].tolist()
    return pd.DataFrame({SUBMISSION_COLUMNS[0]: ids, SUBMISSION_COLUMNS[1]: value})


# ------------------------------------------------------------------------------------ clot truth


def embolus_masks(plan: StudyPlan) -> list[tuple[tuple[int, int, int], np.ndarray]]:
    """Each embolus of ``plan.emboli`` as ``((slice, row, col) of its box's first voxel, bool mask over
    the box)``: the union of its chunks, on the slice grid (= the stored images' pixel grid)."""
    masks = []
    for e in plan.emboli:
        lo = [min(box[ax].start for box, _ in e.chunks) for ax in range(3)]
        hi = [max(box[ax].stop for box, _ in e.chunks) for ax in range(3)]
        mask = np.zeros([h - low for low, h in zip(lo, hi)], dtype=bool)
        for box, m in e.chunks:
            mask[tuple(slice(s.start - low, s.stop - low) for s, low in zip(box, lo))] |= m
        masks.append(((lo[0], lo[1], lo[2]), mask))
    return masks


def embolus_volume(plan: StudyPlan) -> np.ndarray:
    """uint8 (S, H, W) in position order: 0, or the 1-based index of the embolus at each voxel (what
    :func:`pedetect.synth.render_plan` draws as ``RenderedStudy.emboli``, without drawing the rest)."""
    volume = np.zeros(plan.grid.shape, dtype=np.uint8)
    for i, ((k, r, c), mask) in enumerate(embolus_masks(plan), start=1):
        view = volume[k : k + mask.shape[0], r : r + mask.shape[1], c : c + mask.shape[2]]
        view[mask] = i
    return volume


def clot_side_and_level(plan: StudyPlan, embolus_index: int) -> tuple[str, str]:
    """(side, level) of an embolus (0-based index): the pulmonary trunk is central, any other artery
    has its own side; the trunk and the main pulmonary arteries are level main, the rest their level."""
    e = plan.emboli[embolus_index]
    side = {v.name: v.side for v in plan.vessels}[e.vessel]
    if e.level == "trunk":
        return "central", "main"
    return side, e.level


def clot_rows(plan: StudyPlan, slice_ids: list[str] | None = None) -> pd.DataFrame:
    """The clot truth of one study (:data:`CLOT_COLUMNS`): one row per embolus and slice its mask
    crosses, emboli in plan order, slices in position order; ``visible`` says whether a reader sees
    it there (``Embolus.visible``: the rows with 1 are the slices labelled positive, and an embolus
    with no such row made no label). ``slice_ids``: the slices' names in position order (default the
    single-frame SOPInstanceUIDs)."""
    ids = list(plan.sop_uids) if slice_ids is None else list(slice_ids)
    rows = []
    for i, ((k0, r0, c0), mask) in enumerate(embolus_masks(plan)):
        e = plan.emboli[i]
        side, level = clot_side_and_level(plan, i)
        for dk in range(mask.shape[0]):
            on = mask[dk]
            pixels = int(on.sum())
            if not pixels:
                continue
            rr, cc = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
            k = k0 + dk
            rows.append(
                (plan.study_uid, plan.series_uid, i + 1, ids[k], k)
                + (r0 + int(rr[0]), r0 + int(rr[-1]), c0 + int(cc[0]), c0 + int(cc[-1]), pixels)
                + (side, level, e.kind, e.vessel, int(e.visible[k]))
            )
    return pd.DataFrame(rows, columns=list(CLOT_COLUMNS))


def clot_segmentation(plan: StudyPlan, sources: list, volume: np.ndarray, *, enhanced: bool = False):
    """The emboli of a study as a BINARY DICOM Segmentation (highdicom), one segment per embolus:
    every embolus drawn, visible to a reader or not (clots.csv's ``visible`` says which slices are).

    ``sources``: the study's CT datasets as written (pydicom, headers suffice), single-frame slices in
    position order, or the one Enhanced CT dataset (``enhanced``: the segment frames then reference
    its frames). ``volume``: :func:`embolus_volume`. Same plan, same bytes: the UIDs come from the
    study's own, dates and times are the CT's, and nothing is drawn from the clock or at random.
    """
    if enhanced:
        volume = volume[np.argsort(enhanced_frame_numbers(plan))]  # frame order
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SEG_MANUFACTURER, family=codes.DCM.Phantom, version=__version__, source="pedetect"
    )
    segments = []
    for i, e in enumerate(plan.emboli):
        side, level = clot_side_and_level(plan, i)
        description = hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"embolus {i + 1}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Embolus,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"embolus {i + 1}",
            tracking_uid=uid("clot-seg tracking", plan.series_uid, i + 1),
        )
        description.SegmentDescription = f"{e.kind} embolus, {side} {level} artery {e.vessel}"[:64]
        segments.append(description)
    kind = "enhanced" if enhanced else "single-frame"
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=uid("clot-seg series", kind, plan.series_uid),
        series_number=100 + int(plan.scanner.series_number),
        sop_instance_uid=uid("clot-seg instance", kind, plan.series_uid),
        instance_number=1,
        manufacturer=SEG_MANUFACTURER,
        manufacturer_model_name="pedetect synth",
        software_versions=__version__,
        device_serial_number="SYNTHETIC",
        content_description="ground truth: the emboli the pedetect synthetic phantom drew",
        content_label="EMBOLI",
        content_date=str(first.ContentDate),
        content_time=str(first.ContentTime),
    )
    seg.SeriesDescription = "EMBOLI (SYNTHETIC PHANTOM TRUTH)"
    seg.SeriesDate, seg.SeriesTime = first.SeriesDate, first.SeriesTime
    seg.InstanceCreationDate, seg.InstanceCreationTime = first.ContentDate, first.ContentTime
    for item in seg.get("ContributingEquipmentSequence", []):  # highdicom's own entry says when, by the clock
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{first.ContentDate}{first.ContentTime}"
    # highdicom draws the dimension organisation UID at random: one derived from the study instead.
    dimension_uid = uid("clot-seg dimension", kind, plan.series_uid)
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dimension_uid
    seg.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
    seg.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return seg


def write_clot_seg(plan: StudyPlan, study_files: list[Path], folder: Path, *, enhanced: bool = False) -> Path | None:
    """The study's :func:`clot_segmentation` as ``folder/<StudyInstanceUID>.dcm`` (atomic), from its
    CT files as written (position order; Enhanced CT: the one file). None when it has no embolus (a
    study whose emboli no reader sees, so labelled negative, still has one)."""
    if not plan.emboli:
        return None
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study_files]
    seg = clot_segmentation(plan, sources, embolus_volume(plan), enhanced=enhanced)
    path = Path(folder) / f"{plan.study_uid}.dcm"
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------- the dataset


def _write_study(
    index: int,
    *,
    root: Path,
    transfer_syntax: str,
    enhanced: bool,
    seg_folder: Path | None,
    **dataset: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render and write study ``index`` of ``dataset`` (:func:`plan_study`'s keyword arguments) and its
    SEG into ``seg_folder``; its labels (train.csv columns) and its clot truth (:data:`CLOT_COLUMNS`)."""
    plan = plan_study(index, **dataset)
    rendered = render_plan(plan)
    study_labels = plan.labels_frame()
    if enhanced:
        files = [write_enhanced_series(plan, rendered.stored, root, transfer_syntax)]
        study_labels[SOP] = enhanced_slice_ids(plan)
    else:
        files = write_series(plan, rendered.stored, root, transfer_syntax)
    if seg_folder is not None:
        write_clot_seg(plan, files, seg_folder, enhanced=enhanced)
    return study_labels, clot_rows(plan, study_labels[SOP].tolist())


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
    clot_seg: bool = False,
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

    The clot truth, always: ``out/clots.csv`` (train) or ``out/test_clots.csv`` (test), one row per
    embolus and slice its mask crosses, ``visible`` 1 where a reader sees it (the labelled slices)
    and 0 where not (:data:`CLOT_COLUMNS`; header only when no study has an embolus).
    ``clot_seg``: also a DICOM Segmentation of each study's emboli, visible or not (one BINARY
    segment per embolus, referencing its CT slices, or its Enhanced CT file's frames) as
    ``out/<split>_seg/<StudyInstanceUID>.dcm``, beside ``out/<split>`` rather than in it (prepare and
    predict read every file there). About 50 ms a positive study of 40 slices at 256 px; off by
    default, so that library callers (the demo, the tests) keep their folders as they were.
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
        transfer_syntax=transfer_syntax,
        enhanced=enhanced,
        seg_folder=clot_seg_folder(out, split) if clot_seg else None,
        seed=seed,
        split=split,
        slices=slices,
        size=size,
        positive_fraction=positive_fraction,
        indeterminate_fraction=indeterminate_fraction,
        min_embolus_pixels=min_embolus_pixels,
    )
    bar = None
    if progress:
        bar = tqdm(total=n_studies, desc=f"synth {split}", unit="study", file=sys.stderr)
    frames, clot_frames = [], []
    with ExitStack() as stack:
        if workers > 1 and n_studies > 1:
            # Every study depends on (seed, split, index) alone, so the processes write the same files.
            context = multiprocessing.get_context("spawn")  # no fork of a caller that holds torch's threads
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, n_studies), mp_context=context))
            studies = pool.map(write, range(n_studies), chunksize=4)
        else:
            studies = map(write, range(n_studies))
        for study_labels, study_clots in studies:  # in index order
            frames.append(study_labels)
            if len(study_clots):
                clot_frames.append(study_clots)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    labels = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TRAIN_COLUMNS))
    clots = pd.concat(clot_frames, ignore_index=True) if clot_frames else pd.DataFrame(columns=list(CLOT_COLUMNS))
    if split == "train":
        write_csv_atomic(labels, out / "train.csv")
    else:
        write_csv_atomic(labels[list(UID_COLUMNS)], out / "test.csv")
        write_csv_atomic(labels, out / "test_labels.csv")
        write_csv_atomic(sample_submission(labels), out / "sample_submission.csv")
    write_csv_atomic(clots, clots_path(out, split))
    return labels


__all__ = [
    "CLOT_COLUMNS",
    "CLOT_FILES",
    "VISIBLE",
    "clot_rows",
    "clot_seg_folder",
    "clot_segmentation",
    "clots_path",
    "embolus_masks",
    "embolus_volume",
    "sample_submission",
    "write_clot_seg",
    "write_dataset",
]
