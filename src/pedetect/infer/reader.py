"""The input of ``pedetect predict``: every study of a folder or zip, read one study at a time.

Files are scanned and ordered exactly as ``pedetect prepare`` does it (:func:`pedetect.store.job.scan_chunk`,
:func:`pedetect.dicom.group_headers`, :func:`pedetect.dicom.order.plan_series`), and each slice is
decoded and windowed by prepare's own function (:func:`pedetect.store.job._slice_image`), so a model
sees the pixels it was trained on (before the store's JPEG encoding). No store is written: a study's
slices go straight into one preallocated ``(N, H, W, 3)`` array, so memory is one study.

A file whose header cannot be read is still accounted for: in the RSNA layout
(``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``) its path names its study and slice,
so it still gets a row (:func:`guess_uids`). Files that are not DICOM and do not look like slices
(CSVs, notes) are ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Callable, Optional, Sequence

import numpy as np

from pedetect.dicom.header import SliceHeader, describe_error
from pedetect.dicom.series import Failure, group_headers
from pedetect.dicom.source import Source, discover

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
SCAN_CHUNK = 256


def guess_uids(label: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(study, series, sop) from an RSNA-layout path ``…/<study>/<series>/<sop>.dcm``; None where a
    part is not a UID."""
    path = PurePath(label.split("::", 1)[-1])
    parts = [path.stem, *(p.name for p in path.parents if p.name)][:3]
    uids = [part if _UID.match(part) else None for part in parts]
    uids += [None] * (3 - len(uids))
    sop, series, study = uids
    return study, series, sop


def looks_like_slice(label: str) -> bool:
    """A file that was meant to be a DICOM slice: a DICOM suffix or a UID as its name."""
    name = PurePath(label.split("::", 1)[-1])
    return name.suffix.lower() in DICOM_SUFFIXES or bool(_UID.match(name.stem))


@dataclass
class StudyPlan:
    """One study of the input: its series' headers (unordered) and the files lost at the scan."""

    study: str
    series: dict[str, list[SliceHeader]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return sum(len(h) for h in self.series.values()) + len(self.failures)


@dataclass
class InputScan:
    studies: list[StudyPlan]  # sorted by StudyInstanceUID
    unplaced: list[Failure]  # slice-like files that could not be read nor placed in a study
    ignored: list[Failure]  # files that are not DICOM and do not look like slices
    n_files: int


def scan_input(input_path, *, progress: Callable[[int], None] = lambda n: None) -> InputScan:
    """Headers of every file of a folder or zip (pixels not decoded), grouped by study and series."""
    from pedetect.store.job import scan_chunk

    sources = discover(input_path)
    headers: list[SliceHeader] = []
    unreadable: list[dict] = []
    for start in range(0, len(sources), SCAN_CHUNK):
        found, failed = scan_chunk(sources[start : start + SCAN_CHUNK])
        headers.extend(found)
        unreadable.extend(failed)
        progress(len(found) + len(failed))
    groups, duplicates = group_headers(headers)
    studies: dict[str, StudyPlan] = {}
    for series_uid, group in groups.items():
        by_study: dict[str, list[SliceHeader]] = {}
        for header in group:  # a series is filed under each study its slices name (normally one)
            by_study.setdefault(header.study or "", []).append(header)
        for study_uid, members in by_study.items():
            studies.setdefault(study_uid, StudyPlan(study_uid)).series[series_uid] = members
    for failure in duplicates:
        studies[failure.study or ""].failures.append(failure)
    unplaced, ignored = [], []
    for record in unreadable:
        path, reason = record["path"], record["reason"]
        if not looks_like_slice(path) and reason.startswith("not DICOM"):
            ignored.append(Failure(path, reason))
            continue
        study, series, sop = guess_uids(path)
        failure = Failure(path, reason, study, series, sop)
        if study is None or sop is None:
            unplaced.append(failure)
        else:
            studies.setdefault(study, StudyPlan(study)).failures.append(failure)
    ordered = [studies[k] for k in sorted(studies)]
    return InputScan(ordered, unplaced, ignored, len(sources))


@dataclass
class SeriesRead:
    """One series of a study in position order, as prepare would have stored it."""

    series: str
    images: np.ndarray  # (N, H, W, 3) uint8, decoded slices only
    z: np.ndarray  # (N,) mm (NaN where unknown)
    sop_uids: list[str]
    position: np.ndarray  # (N,) place of each decoded slice in the series' full position order
    lost: list[tuple[Failure, float]]  # slices that could not be decoded, with their place (NaN: unknown)
    n_planned: int  # slices in the series' position order (decoded or not)

    def __len__(self) -> int:
        return len(self.sop_uids)


def read_series_planned(headers: Sequence[SliceHeader], windows, image_size: Optional[int]) -> SeriesRead:
    """Order, decode and window one series into a preallocated array (prepare's reading code)."""
    from pedetect.dicom.order import plan_series
    from pedetect.store.job import _slice_image

    plan = plan_series(headers)
    windows = tuple(tuple(float(v) for v in w) for w in windows)
    height, width = (image_size, image_size) if image_size else (plan.rows, plan.cols)
    images = np.empty((len(plan.slices), height, width, 3), dtype=np.uint8)
    lost: list[tuple[Failure, float]] = [(Failure.of(h, reason), math.nan) for h, reason in plan.rejected]
    kept: list[int] = []
    for i, header in enumerate(plan.slices):
        try:
            image = _slice_image(header, windows, image_size)  # B,G,R for prepare's JPEG encoder
            if image.shape[:2] != (height, width):
                raise ValueError(f"decoded size {image.shape[1]}x{image.shape[0]} is not the series' {width}x{height}")
            images[len(kept)] = image[:, :, ::-1]
        except Exception as error:  # this slice only
            reason = getattr(error, "reason", None) or f"pixel data unreadable ({describe_error(error)})"
            lost.append((Failure.of(header, reason), float(i)))
            continue
        kept.append(i)
    n = len(kept)
    return SeriesRead(
        series=plan.slices[0].series if plan.slices else headers[0].series,
        images=images[:n],
        z=np.asarray(plan.z, dtype=float)[kept] if len(plan.z) else np.zeros(0),
        sop_uids=[plan.slices[i].sop for i in kept],
        position=np.asarray(kept, dtype=float),
        lost=lost,
        n_planned=len(plan.slices),
    )
