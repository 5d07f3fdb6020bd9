"""Read DICOM series into memory: ordered, windowed slices with their metadata and failures.

This is the reusable reader (no store involved): ``pedetect predict`` calls it per study, and the
prepare job uses the same pieces (:func:`group_headers`, :func:`~pedetect.dicom.order.plan_series`,
:func:`~pedetect.dicom.pixels.window_dataset`, :func:`series_metadata`) streaming to the store.

>>> volumes, failures = read_files(paths_of_one_study)          # doctest: +SKIP
>>> v = volumes[0]; v.images.shape, v.z[:3], v.sop_uids[0]      # doctest: +SKIP
((N, 512, 512, 3), array([...]), '1.2...')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from pedetect.dicom.header import DicomError, SliceHeader, dcmread_source, describe_error, header_from_dataset
from pedetect.dicom.order import SeriesPlan, plan_series, spacing_stats
from pedetect.dicom.pixels import as_windows, window_dataset
from pedetect.dicom.source import Source, read_bytes, source_label, source_stat
from pedetect.labels import SERIES, SOP, STUDY

FAILURE_COLUMNS = ("path", "reason", STUDY, SERIES, SOP)


@dataclass
class Failure:
    """A file (or one slice of it) that could not be used, and why."""

    path: str
    reason: str
    study: Optional[str] = None
    series: Optional[str] = None
    sop: Optional[str] = None

    def as_record(self) -> dict:
        return {"path": self.path, "reason": self.reason, STUDY: self.study, SERIES: self.series, SOP: self.sop}

    @classmethod
    def of(cls, header: SliceHeader, reason: str) -> "Failure":
        return cls(header.label, reason, header.study or None, header.series, header.sop)


@dataclass
class SeriesVolume:
    """One series in position order: ``images[i]`` is slice ``i`` (uint8, R,G,B = lung, PE, mediastinal)."""

    study: str
    series: str
    images: np.ndarray  # (N, H, W, 3) uint8
    z: np.ndarray  # (N,) mm along the slice normal
    sop_uids: list[str]
    instance_numbers: list[Optional[int]]
    sources: list[str]
    meta: dict  # series metadata, see series_metadata()
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sop_uids)


def group_headers(headers: Iterable[SliceHeader]) -> tuple[dict[str, list[SliceHeader]], list[Failure]]:
    """Headers grouped by SeriesInstanceUID (first-seen order). Of files sharing a SOPInstanceUID the
    largest is kept (a truncated copy is smaller; ties: the first) and the others are failures."""
    headers = list(headers)
    best: dict[str, SliceHeader] = {}
    for header in headers:
        current = best.get(header.sop)
        if current is None or header.size > current.size:
            best[header.sop] = header
    groups: dict[str, list[SliceHeader]] = {}
    failures: list[Failure] = []
    for header in headers:
        keep = best[header.sop]
        if keep is not header:
            failures.append(Failure.of(header, f"duplicate SOPInstanceUID (kept {keep.label})"))
            continue
        groups.setdefault(header.series, []).append(header)
    return groups, failures


def series_metadata(
    plan: SeriesPlan,
    kept: Sequence[SliceHeader],
    z: Sequence[float],
    *,
    height: int,
    width: int,
    n_failed: int = 0,
) -> dict:
    """Per-series metadata (JSON-ready): geometry, spacing, z positions and irregularities."""
    studies = sorted({h.study for h in kept if h.study})
    first = kept[0] if kept else (plan.slices[0] if plan.slices else None)
    stats = spacing_stats(z)
    irregular = list(plan.irregularities) + list(stats.pop("irregularities"))
    if len(studies) > 1:
        irregular.append(f"{len(studies)} StudyInstanceUIDs in one series")
    if n_failed:
        irregular.append(f"{n_failed} slice(s) could not be decoded")
    spacings = {h.pixel_spacing for h in kept if h.pixel_spacing is not None}
    if len(spacings) > 1:
        irregular.append("mixed PixelSpacing")
    pixel_spacing = list(first.pixel_spacing) if first is not None and first.pixel_spacing else None
    scale = min(height / plan.rows, width / plan.cols) if plan.rows and plan.cols else 1.0
    return {
        STUDY: studies[0] if studies else (first.study if first is not None else ""),
        SERIES: first.series if first is not None else "",
        "n_slices": len(kept),
        "height": int(height),
        "width": int(width),
        "source_rows": int(plan.rows),
        "source_cols": int(plan.cols),
        "scale": float(scale),
        "pixel_spacing": pixel_spacing,
        "stored_pixel_spacing": [v / scale for v in pixel_spacing] if pixel_spacing else None,
        "slice_thickness": first.slice_thickness if first is not None else None,
        "order_by": plan.order_by,
        "normal": list(plan.normal) if plan.normal is not None else None,
        "instance_number_order": plan.instance_number_order,
        "z": [float(v) for v in z],
        **stats,
        "irregularities": irregular,
        "modality": first.modality if first is not None else "",
        "transfer_syntaxes": sorted({h.transfer_syntax for h in kept if h.transfer_syntax}),
    }


def _read_all(files: Iterable[Source]) -> tuple[list[SliceHeader], dict[int, Any], list[Failure]]:
    headers: list[SliceHeader] = []
    datasets: dict[int, Any] = {}
    failures: list[Failure] = []
    for source in files:
        label = source_label(source)
        try:
            size, mtime = source_stat(source)
            data = read_bytes(source)
            ds = dcmread_source(source, data=data)
            header = header_from_dataset(ds, source, size=size, mtime_ns=mtime)
        except DicomError as error:
            failures.append(Failure(label, error.reason))
            continue
        except (OSError, KeyError) as error:
            failures.append(Failure(label, f"unreadable ({describe_error(error)})"))
            continue
        datasets[id(header)] = ds
        headers.append(header)
    return headers, datasets, failures


def read_files(
    files: Iterable[Source],
    *,
    windows: Optional[Sequence[Sequence[float]]] = None,
    image_size: Optional[int] = None,
) -> tuple[list[SeriesVolume], list[Failure]]:
    """Read files (paths or :class:`~pedetect.dicom.source.ZipMember`), group them by series and
    return each series in position order, plus the failures of files that belong to no series
    (each volume also carries its own failures)."""
    wins = as_windows(windows)
    headers, datasets, failures = _read_all(files)
    groups, duplicates = group_headers(headers)
    failures.extend(duplicates)
    volumes = [_volume(group, datasets, wins, image_size) for group in groups.values()]
    return volumes, failures


def read_series(
    files: Iterable[Source],
    *,
    windows: Optional[Sequence[Sequence[float]]] = None,
    image_size: Optional[int] = None,
) -> SeriesVolume:
    """Read the files of one series. Unreadable files are in ``volume.failures``; files of more than
    one series are an error (use :func:`read_files`)."""
    volumes, failures = read_files(files, windows=windows, image_size=image_size)
    if len(volumes) > 1:
        raise ValueError(f"the files hold {len(volumes)} series; use read_files() to read several")
    if not volumes:
        return SeriesVolume("", "", np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0), [], [], [], {}, failures)
    volumes[0].failures[:0] = failures
    return volumes[0]


def _volume(group: list[SliceHeader], datasets: dict[int, Any], windows: tuple, image_size: Optional[int]) -> SeriesVolume:
    plan = plan_series(group)
    failures = [Failure.of(h, reason) for h, reason in plan.rejected]
    images, kept, z = [], [], []
    for header, position in zip(plan.slices, plan.z):
        try:
            images.append(window_dataset(datasets[id(header)], windows, image_size))
        except Exception as error:  # a decoder error of any kind is this slice's failure
            failures.append(Failure.of(header, f"pixel data unreadable ({describe_error(error)})"))
            continue
        kept.append(header)
        z.append(float(position))
    height, width = (image_size, image_size) if image_size else (plan.rows, plan.cols)
    n_failed = len(plan.slices) - len(kept)
    meta = series_metadata(plan, kept, z, height=height, width=width, n_failed=n_failed)
    stack = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return SeriesVolume(
        study=meta[STUDY],
        series=meta[SERIES] or group[0].series,
        images=stack,
        z=np.asarray(z, dtype=float),
        sop_uids=[h.sop for h in kept],
        instance_numbers=[h.instance_number for h in kept],
        sources=[h.label for h in kept],
        meta=meta,
        failures=failures,
    )
