"""Rasterisation of analytic 3D shapes onto a stack of axial slices, inside bounding boxes only.

Coordinates are millimetres in the phantom frame: x towards the patient's left (image columns),
y towards the patient's back (image rows), z (anatomical) towards the head. A slice samples the
plane z = zs[k]; pixel centres sit at (xs[c], ys[r]). All arrays are ascending.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Slices rasterised together per shape: bounds the bounding-box waste of oblique tubes.
_CHUNK = 8


@dataclass(frozen=True)
class Grid:
    """Sampling grid of one series: slice planes and pixel centres (mm, phantom frame)."""

    zs: np.ndarray  # (S,) anatomical z of each slice, ascending (position order)
    ys: np.ndarray  # (H,) row centres
    xs: np.ndarray  # (W,) column centres

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.zs), len(self.ys), len(self.xs))

    def rows(self, lo: float, hi: float) -> slice:
        return slice(int(np.searchsorted(self.ys, lo, "left")), int(np.searchsorted(self.ys, hi, "right")))

    def cols(self, lo: float, hi: float) -> slice:
        return slice(int(np.searchsorted(self.xs, lo, "left")), int(np.searchsorted(self.xs, hi, "right")))

    def slices(self, lo: float, hi: float) -> slice:
        return slice(int(np.searchsorted(self.zs, lo, "left")), int(np.searchsorted(self.zs, hi, "right")))


@dataclass(frozen=True)
class Segment:
    """A tapered capsule: points within r(t) of p0 + t (p1 - p0), r(t) = r0 + t (r1 - r0)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float


Box = tuple[slice, slice, slice]


def segment_mask(seg: Segment, zs: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean (len(zs), len(ys), len(xs)) mask of the capsule sampled at the given coordinates."""
    x0, y0, z0 = seg.p0
    dx, dy, dz = seg.p1[0] - x0, seg.p1[1] - y0, seg.p1[2] - z0
    dd = dx * dx + dy * dy + dz * dz
    zc = (zs - z0).astype(np.float32)[:, None, None]
    yc = (ys - y0).astype(np.float32)[None, :, None]
    xc = (xs - x0).astype(np.float32)[None, None, :]
    wd = (zc * np.float32(dz) + yc * np.float32(dy)) + xc * np.float32(dx)
    w2 = (zc * zc + yc * yc) + xc * xc
    if dd < 1e-9:
        r = np.float32(max(seg.r0, seg.r1))
        return w2 <= r * r
    t = np.clip(wd * np.float32(1.0 / dd), 0.0, 1.0)
    d2 = w2 - t * (2.0 * wd - t * np.float32(dd))
    r = np.float32(seg.r0) + t * np.float32(seg.r1 - seg.r0)
    return d2 <= r * r


def segment_chunks(seg: Segment, grid: Grid) -> Iterator[tuple[Box, np.ndarray]]:
    """The capsule's mask on the grid, as (box, mask) pieces covering at most _CHUNK slices each."""
    p0 = np.asarray(seg.p0, dtype=np.float64)
    d = np.asarray(seg.p1, dtype=np.float64) - p0
    rmax = max(seg.r0, seg.r1)
    ks = grid.slices(min(seg.p0[2], seg.p1[2]) - rmax, max(seg.p0[2], seg.p1[2]) + rmax)
    for ka in range(ks.start, ks.stop, _CHUNK):
        kb = min(ka + _CHUNK, ks.stop)
        zlo, zhi = grid.zs[ka] - rmax, grid.zs[kb - 1] + rmax
        if abs(d[2]) > 1e-9:
            ta, tb = sorted(((zlo - p0[2]) / d[2], (zhi - p0[2]) / d[2]))
            ta, tb = max(ta, 0.0), min(tb, 1.0)
            if ta > tb:
                continue
        else:
            ta, tb = 0.0, 1.0
        pa, pb = p0 + ta * d, p0 + tb * d
        rows = grid.rows(min(pa[1], pb[1]) - rmax, max(pa[1], pb[1]) + rmax)
        cols = grid.cols(min(pa[0], pb[0]) - rmax, max(pa[0], pb[0]) + rmax)
        if rows.stop <= rows.start or cols.stop <= cols.start:
            continue
        m = segment_mask(seg, grid.zs[ka:kb], grid.ys[rows], grid.xs[cols])
        if m.any():
            yield (slice(ka, kb), rows, cols), m


def paint(vol: np.ndarray, box: Box, mask: np.ndarray, value: int, where: tuple[int, ...] | None = None) -> None:
    """Set ``vol[box][mask] = value``; with ``where``, only over voxels whose label is in ``where``."""
    view = vol[box]
    if where is not None:
        allowed = view == where[0]
        for w in where[1:]:
            allowed |= view == w
        mask = mask & allowed
    view[mask] = value


def paint_segment(vol: np.ndarray, grid: Grid, seg: Segment, value: int, where: tuple[int, ...] | None = None) -> None:
    for box, m in segment_chunks(seg, grid):
        paint(vol, box, m, value, where)


def ellipse_rho2(
    grid: Grid,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    angle: float = 0.0,
    ay_back: float | None = None,
    reach: float = 1.0,
) -> tuple[slice, slice, np.ndarray]:
    """Squared normalised radius of an (optionally rotated, two-half) ellipse over its bounding box.

    ``rho2 < s**2`` is the ellipse scaled by s about its centre. ``ay_back`` gives a different
    semi-axis for the posterior half (y > cy, before rotation), for body outlines flattened on the
    table. ``reach`` enlarges the box (for s > 1 or rings outside the ellipse).
    """
    ayb = ay if ay_back is None else ay_back
    ext = max(ax, ay, ayb) * reach + 1.0
    rows, cols = grid.rows(cy - ext, cy + ext), grid.cols(cx - ext, cx + ext)
    x = (grid.xs[cols] - cx).astype(np.float32)[None, :]
    y = (grid.ys[rows] - cy).astype(np.float32)[:, None]
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        x, y = x * c + y * s, y * c - x * s
    u = x / np.float32(ax)
    if ay_back is None:
        v = y / np.float32(ay)
    else:
        v = np.where(y > 0, y / np.float32(ayb), y / np.float32(ay))
    return rows, cols, u * u + v * v


def paint_scaled(
    vol: np.ndarray,
    ks: slice,
    rows: slice,
    cols: slice,
    rho2: np.ndarray,
    scales: np.ndarray,
    value: int,
    where: tuple[int, ...] | None = None,
    inner: np.ndarray | None = None,
) -> None:
    """Paint slices ks where rho2 < scales[k]**2 (and, with ``inner``, rho2 >= inner[k]**2: a ring)."""
    if ks.stop <= ks.start or rows.stop <= rows.start or cols.stop <= cols.start:
        return
    s2 = (np.asarray(scales, dtype=np.float32) ** 2)[:, None, None]
    mask = rho2[None] < s2
    if inner is not None:
        mask &= rho2[None] >= (np.asarray(inner, dtype=np.float32) ** 2)[:, None, None]
    paint(vol, (ks, rows, cols), mask, value, where)


def paint_ellipsoid(
    vol: np.ndarray,
    grid: Grid,
    centre: tuple[float, float, float],
    ax: float,
    ay: float,
    hz: float,
    value: int,
    angle: float = 0.0,
    where: tuple[int, ...] | None = None,
) -> None:
    """An ellipsoid with in-plane semi-axes (ax, ay) rotated by ``angle`` and half-height hz."""
    cx, cy, cz = centre
    ks = grid.slices(cz - hz, cz + hz)
    if ks.stop <= ks.start:
        return
    dz = (grid.zs[ks] - cz) / hz
    scales = np.sqrt(np.clip(1.0 - dz * dz, 0.0, None))
    rows, cols, rho2 = ellipse_rho2(grid, cx, cy, ax, ay, angle)
    paint_scaled(vol, ks, rows, cols, rho2, scales, value, where)
