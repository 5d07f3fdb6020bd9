"""Slice order, z positions and the irregularities of one series (docs/design.md, "Data flow").

Slices are ordered by position along the slice normal: ImagePositionPatient projected on the cross
product of the two ImageOrientationPatient vectors, ascending. InstanceNumber is a fallback only,
and when it is used the series records it (``order_by``). Slices whose size differs from the
series' (most common) size are set aside as failures: in practice they are localisers or other
images that share the series UID, not slices of the volume.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from pedetect.dicom.header import SliceHeader

_T = TypeVar("_T")

GAP_FACTOR = 1.5  # a step larger than this × the median step is a gap
DUPLICATE_MM = 1e-3  # positions closer than this are duplicates


@dataclass
class SeriesPlan:
    """The slices of a series in position order, with what was found about the geometry."""

    slices: list[SliceHeader]  # in order
    z: np.ndarray  # (N,) mm along the normal (NaN when unknown)
    order_by: str  # "position" | "instance_number" | "file"
    normal: tuple[float, float, float] | None
    rows: int
    cols: int
    irregularities: list[str] = field(default_factory=list)
    rejected: list[tuple[SliceHeader, str]] = field(default_factory=list)  # (slice, reason)
    instance_number_order: str = "missing"  # vs position order: ascending | descending | mixed | missing


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    return normal / norm


def _mode(values: list[_T]) -> _T:
    return Counter(values).most_common(1)[0][0]


def _instance_trend(numbers: Sequence[int | None]) -> str:
    if any(n is None for n in numbers):
        return "missing"
    if len(numbers) < 2:
        return "ascending"
    diffs = np.diff(np.asarray(numbers, dtype=np.int64))
    if np.all(diffs > 0):
        return "ascending"
    if np.all(diffs < 0):
        return "descending"
    return "mixed"


def plan_series(headers: Sequence[SliceHeader]) -> SeriesPlan:
    """Order the slices of one series and describe its geometry."""
    if not headers:
        raise ValueError("no slices")
    irregular: list[str] = []
    rejected: list[tuple[SliceHeader, str]] = []
    rows, cols = _mode([(h.rows, h.cols) for h in headers])
    kept = []
    for h in headers:
        if (h.rows, h.cols) != (rows, cols):
            rejected.append((h, f"slice size {h.rows}x{h.cols} differs from its series' {rows}x{cols}"))
        else:
            kept.append(h)
    if rejected:
        sizes = sorted({f"{h.rows}x{h.cols}" for h, _ in rejected})
        irregular.append(
            f"mixed sizes: {len(rejected)} slice(s) of {', '.join(sizes)} set aside (series {rows}x{cols})"
        )

    normal: np.ndarray | None = None
    have_geometry = all(h.position is not None and h.orientation is not None for h in kept)
    if have_geometry:
        orientations = [tuple(round(v, 4) for v in h.orientation) for h in kept]  # type: ignore[union-attr]
        common = _mode(orientations)
        try:
            normal = slice_normal(common)
        except ValueError:
            normal = None
        if normal is not None and len(set(orientations)) > 1:
            irregular.append(f"mixed orientations: {len(set(orientations))} distinct ImageOrientationPatient")

    if normal is not None:
        z = np.array([float(np.dot(h.position, normal)) for h in kept])  # type: ignore[arg-type]
        keys = [
            (z[i], kept[i].instance_number if kept[i].instance_number is not None else math.inf, kept[i].sop)
            for i in range(len(kept))
        ]
        order = sorted(range(len(kept)), key=lambda i: keys[i])
        order_by = "position"
    else:
        missing = sum(h.position is None or h.orientation is None for h in kept)
        if all(h.instance_number is not None for h in kept):
            order = sorted(range(len(kept)), key=lambda i: (kept[i].instance_number, kept[i].sop))
            order_by = "instance_number"
            irregular.append(
                f"no usable ImagePositionPatient/ImageOrientationPatient on {missing or 'some'} of {len(kept)} slices: ordered by InstanceNumber"
            )
        else:
            order = sorted(range(len(kept)), key=lambda i: (kept[i].sop,))
            order_by = "file"
            irregular.append(
                "neither position nor InstanceNumber on every slice: slice order unknown (sorted by SOPInstanceUID)"
            )
        locations = [kept[i].slice_location for i in range(len(kept))]
        z = np.array([loc if loc is not None else math.nan for loc in locations], dtype=float)

    slices = [kept[i] for i in order]
    z = z[order] if len(order) else z
    plan = SeriesPlan(
        slices=slices,
        z=np.asarray(z, dtype=float),
        order_by=order_by,
        normal=tuple(float(v) for v in normal) if normal is not None else None,  # type: ignore[arg-type]
        rows=rows,
        cols=cols,
        irregularities=irregular,
        rejected=rejected,
        instance_number_order=_instance_trend([h.instance_number for h in slices]),
    )
    return plan


def spacing_stats(z: Sequence[float] | np.ndarray) -> dict:
    """Slice spacing and its irregularities from ordered z positions.

    Returns ``spacing`` (median step, mm), ``min_step``, ``max_step``, ``n_gaps`` (steps >
    1.5 × median), ``largest_gap``, ``n_duplicates`` (steps < 0.001 mm) and ``irregularities`` (text).
    """
    z = np.asarray(z, dtype=float)
    out: dict = {
        "spacing": None,
        "min_step": None,
        "max_step": None,
        "n_gaps": 0,
        "largest_gap": None,
        "n_duplicates": 0,
        "irregularities": [],
    }
    if len(z) < 2 or not np.all(np.isfinite(z)):
        return out
    steps = np.diff(z)
    duplicates = int(np.sum(np.abs(steps) < DUPLICATE_MM))
    positive = steps[np.abs(steps) >= DUPLICATE_MM]
    out["n_duplicates"] = duplicates
    if duplicates:
        out["irregularities"].append(
            f"duplicate positions: {duplicates} slice(s) share a position with their neighbour"
        )
    if len(positive) == 0:
        return out
    spacing = float(np.median(positive))
    out.update(spacing=spacing, min_step=float(positive.min()), max_step=float(positive.max()))
    gaps = positive[positive > GAP_FACTOR * spacing]
    if len(gaps):
        out.update(n_gaps=int(len(gaps)), largest_gap=float(gaps.max()))
        out["irregularities"].append(
            f"gaps: {len(gaps)} step(s) over {GAP_FACTOR}× the median spacing {spacing:.3g} mm (largest {gaps.max():.3g} mm)"
        )
    return out
