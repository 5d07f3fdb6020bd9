"""Choosing the CTPA series of a study (docs/dicom_results.md, "Series selection").

A study from a PACS is not one series: scouts, lung-kernel and thick reconstructions, MPRs, dose
reports. The rules, in order: a series is usable when it is a CT image series (the node keeps no
other object), not a localizer (ImageType), axial (the slice normal within 30° of the patient's
head-foot axis), with at least ``min_slices`` slices. Of the usable ones the chosen series is the
first by: contrast known present (ContrastBolusAgent not empty) before unknown, soft-tissue kernel
before a lung or sharp kernel (ConvolutionKernel), thinnest SliceThickness, most slices, then
SeriesInstanceUID. A multi-frame (Enhanced CT) file counts its frames as slices, its orientation
and thickness from its functional groups. Files whose header cannot be read go with the chosen
series: the read path names them as lost (the study is still answered). Every other series is
recorded with the reason.

Headers are read once, by the hardened scan of :mod:`pedetect.dicom` (:func:`~pedetect.dicom.read.scan_files`,
which also gives each file the fields selection needs): the chosen series' headers go straight to
the :class:`~pedetect.infer.predictor.Predictor` (``Selection.headers``), nothing is scanned again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pedetect.dicom.read import scan_files

MIN_SLICES = 20
AXIAL_COS = math.cos(math.radians(30))
# Kernels of lung or bone reconstructions (Siemens B/I/Br 50+, GE LUNG/BONE/EDGE, Philips YA-YC/L/D, Toshiba FC5x-FC8x).
_SHARP = re.compile(r"LUNG|BONE|EDGE|SHARP|DETAIL|^[BI]r?[5-9]\d|^FC[5-8]\d|^Y[A-C]$|^[LD]$", re.IGNORECASE)


@dataclass
class SeriesInfo:
    uid: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)  # pedetect.dicom SliceHeader of each slice (a frame each)
    slices: int = 0  # the files' frames (one per single-frame file)
    description: str = ""
    image_type: tuple[str, ...] = ()
    normal_z: float | None = None  # |z component| of the slice normal (1: axial)
    thickness: float | None = None
    kernel: str = ""
    contrast: bool = False
    reason: str | None = None  # why not usable

    def summary(self) -> str:
        parts = [f"{self.slices} slices"]
        parts += [f"{self.thickness:g} mm"] if self.thickness else []
        parts += [f"kernel {self.kernel}"] if self.kernel else []
        parts += ["contrast"] if self.contrast else []
        return ", ".join(parts)


@dataclass
class Selection:
    chosen: SeriesInfo | None
    rejected: list[SeriesInfo]  # each with its reason
    unreadable: list[Path]  # files whose header could not be read (passed on with the chosen series)

    failures: list = field(default_factory=list)  # pedetect.dicom Failure of each unreadable file

    @property
    def files(self) -> list[Path]:
        return (self.chosen.files if self.chosen else []) + self.unreadable

    @property
    def headers(self) -> list:
        """The chosen series' slice headers, as the scan read them (empty when none was chosen)."""
        return list(self.chosen.headers) if self.chosen else []

    def notes(self) -> list[str]:
        lines = (
            [f"series used: {self.chosen.uid} ({self.chosen.summary()})"] if self.chosen else ["no usable CT series"]
        )
        lines += [f"series not used: {s.uid} ({s.reason})" for s in self.rejected]
        return lines

    def record(self) -> dict:
        return {
            "used": self.chosen.uid if self.chosen else None,
            "why": self.chosen.summary() if self.chosen else None,
            "not_used": {s.uid: s.reason for s in self.rejected},
            "unreadable_files": [p.name for p in self.unreadable],
        }


def _info(header, series: dict[str, SeriesInfo]) -> None:
    info = series.get(header.series)
    if info is None:
        info = series[header.series] = SeriesInfo(header.series)
        fields = header.extra.get("series", {})
        info.image_type = tuple(fields.get("image_type", ()))
        info.kernel = str(fields.get("kernel", ""))
        info.contrast = bool(fields.get("contrast", False))
        info.thickness = header.slice_thickness
        orientation = header.orientation
        if orientation is not None and len(orientation) == 6:
            r, c = orientation[:3], orientation[3:]
            n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
            norm = math.sqrt(sum(v * v for v in n)) or 1.0
            info.normal_z = abs(n[2]) / norm
    path = Path(str(header.source))
    if path not in info.files:
        info.files.append(path)
    info.headers.append(header)
    info.slices += 1  # a frame of an Enhanced CT file is a slice of its own header


def select_series(files: list[Path], min_slices: int = MIN_SLICES, scan: Callable | None = None) -> Selection:
    """The CTPA series among ``files`` (one study's CT instances), by the rules above; each file's
    header read once (``scan``: :func:`pedetect.dicom.read.scan_files` or a
    :class:`~pedetect.dicom.read.ScanMemo`'s ``scan``)."""
    headers, failures = (scan or scan_files)(sorted(files))
    return select_headers(headers, failures, min_slices)


def select_headers(headers: list, failures: list, min_slices: int = MIN_SLICES) -> Selection:
    """The CTPA series among one study's scanned slice headers (``failures``: its files whose header
    could not be read, passed on with the chosen series), by the rules above."""
    series: dict[str, SeriesInfo] = {}
    for header in headers:
        _info(header, series)
    unreadable = [Path(str(failure.path)) for failure in failures]
    usable: list[SeriesInfo] = []
    rejected: list[SeriesInfo] = []
    for info in series.values():
        if "LOCALIZER" in info.image_type:
            info.reason = "localizer (scout)"
        elif info.normal_z is None:
            info.reason = "no usable ImageOrientationPatient"
        elif info.normal_z < AXIAL_COS:
            info.reason = "not axial (MPR or oblique reconstruction)"
        elif info.slices < min_slices:
            info.reason = f"{info.slices} slices, fewer than {min_slices}"
        (rejected if info.reason else usable).append(info)
    usable.sort(
        key=lambda s: (
            not s.contrast,
            bool(_SHARP.search(s.kernel)),
            s.thickness if s.thickness else math.inf,
            -s.slices,
            s.uid,
        )
    )
    chosen = usable[0] if usable else None
    for other in usable[1:]:  # only when there is a chosen one
        other.reason = f"another series preferred ({other.summary()} against {usable[0].summary()})"
        rejected.append(other)
    return Selection(chosen, rejected, unreadable, failures)
