"""A series' files as the read path sees them: the failures (a file or slice that could not be used,
and why), the grouping of headers by series (duplicates set aside) and the per-series metadata that
prepare stores and :class:`~pedetect.dicom.read.SeriesRead` reports. Reading itself is
:mod:`pedetect.dicom.read`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pedetect.dicom.header import SliceHeader
from pedetect.dicom.order import SeriesPlan, spacing_stats
from pedetect.labels import SERIES, SOP, STUDY

FAILURE_COLUMNS = ("path", "reason", STUDY, SERIES, SOP)


@dataclass
class Failure:
    """A file (or one slice of it) that could not be used, and why."""

    path: str
    reason: str
    study: str | None = None
    series: str | None = None
    sop: str | None = None

    def as_record(self) -> dict:
        return {"path": self.path, "reason": self.reason, STUDY: self.study, SERIES: self.series, SOP: self.sop}

    @classmethod
    def of(cls, header: SliceHeader, reason: str) -> Failure:
        return cls(header.label, reason, header.study or None, header.series, header.sop)


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
    z: Sequence[float] | np.ndarray,
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
    by_modality = sum(1 for h in kept if h.extra.get("taken_as_ct_by_modality"))
    if by_modality:
        irregular.append(f"{by_modality} slice(s) without a SOP class UID, taken as CT by their Modality")
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
