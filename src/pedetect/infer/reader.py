"""The input of ``pedetect predict``: every study of a folder or zip, read one study at a time.

Files are scanned, grouped, ordered, decoded and windowed by the read path ``pedetect prepare`` uses
(:mod:`pedetect.dicom.read`: :func:`~pedetect.dicom.read.scan_files`, :func:`~pedetect.dicom.group_headers`,
:func:`~pedetect.dicom.read.read_series`), so a model sees the pixels it was trained on (before the
store's JPEG encoding). No store is written: a series' slices go straight into one preallocated
``(N, H, W, 3)`` array, so memory is one study. This module adds what predict alone needs: the
input grouped by study, and files whose header cannot be read placed by their path.

A file whose header cannot be read is still accounted for: in the RSNA layout
(``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``) its path names its study and slice,
so it still gets a row (:func:`guess_uids`). Files that are not DICOM and do not look like slices
(CSVs, notes) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np

from pedetect.dicom.guard import DEFAULT_DECODE_TIMEOUT_S, DecodeGuard
from pedetect.dicom.header import SliceHeader
from pedetect.dicom.read import SCAN_CHUNK, SeriesRead, read_series, scan_files
from pedetect.dicom.series import Failure, group_headers
from pedetect.dicom.source import discover

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def guess_uids(label: str) -> tuple[str | None, str | None, str | None]:
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
    sources = discover(input_path)
    headers: list[SliceHeader] = []
    unreadable: list[Failure] = []
    for start in range(0, len(sources), SCAN_CHUNK):
        found, failed = scan_files(sources[start : start + SCAN_CHUNK])
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
    for unread in unreadable:
        path, reason = unread.path, unread.reason
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


def read_series_planned(
    headers: Sequence[SliceHeader],
    windows,
    image_size: int | None,
    decode: Callable[..., np.ndarray] | None = None,
) -> SeriesRead:
    """Order, decode and window one series (prepare's read path) into a preallocated array, R,G,B;
    ``decode``: what decodes a slice (:func:`slice_decoder`'s), None: in this process."""
    return read_series(headers, windows, image_size, reader=decode)


@contextmanager
def slice_decoder(limit_s: float = DEFAULT_DECODE_TIMEOUT_S) -> Iterator[Callable[..., np.ndarray] | None]:
    """What decodes predict's slices: a :class:`~pedetect.dicom.guard.DecodeGuard`'s ``read`` with a
    limit of ``limit_s`` seconds per slice (its decoding process ended on exit), or None (decode in
    this process, no limit) when ``limit_s`` is 0. A slice past the limit fails with the guard's
    reason, so predict counts it lost and interpolates its row like any slice that cannot be read.
    The guard serves one caller at a time: predict decodes in a single reading thread."""
    if limit_s < 0:
        raise ValueError(f"--decode-timeout must be 0 (no limit) or positive, got {limit_s:g}")
    if not limit_s:
        yield None
        return
    with DecodeGuard(limit_s) as guard:
        yield guard.read
