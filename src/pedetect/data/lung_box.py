"""The lung box of a CT series, from Hounsfield units: air inside the body, union over slices, margin.

The 1st place of the RSNA-STR challenge cropped every series to its lungs before the resize (a CNN
regressed the box, trained on boxes drawn by hand), so the slice CNN spends its pixels on the chest
and not on the table, the arms or the air around the patient. We have the Hounsfield units, so the
box is computed, not learnt:

1. ``body_mask``: tissue (HU above ``tissue_hu``) with the holes of each slice filled, keeping each
   slice's largest piece (the patient; the table and blankets are smaller, separate pieces);
2. ``lung_mask``: air (HU below ``air_hu``) inside the body, as connected 3-D regions; regions
   smaller than ``min_region`` × the largest are dropped (bowel gas, a stray pocket), so what is
   left is the lungs and the airways;
3. ``lung_box``: the bounding rectangle of the lung mask over every slice of the series, grown by
   ``margin`` × the image side on each side and kept at least ``min_side`` × the side wide and high
   (a series with little lung, such as the lung bases, still gets a sensible box). No lung found at
   all: the whole slice.

Everything here is numpy and scipy on arrays of slices (no torch), so other parts of pedetect (the
heart, the viewer) can reuse the masks. The slice store keeps windowed uint8 slices, not HU; the lung
window (L −600 / W 1500, the store's first channel) spans −1350 … 150 HU, which holds both thresholds,
so :func:`hu_from_window` inverts it to HU within 6 HU per grey level — plenty for a box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

# In-plane connectivity only: a slice's holes and pieces are its own (3 × 3 cross in the middle plane).
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class LungBoxSettings:
    """How a box is computed; recorded with the boxes, so training and ``predict`` compute alike."""

    tissue_hu: float = -500.0  # above: the body (fat is about -100, lung -850, air -1000)
    air_hu: float = -400.0  # below, inside the body: lung and airway
    min_region: float = 0.1  # air regions smaller than this × the largest are not lung
    margin: float = 0.05  # added on each side, as a fraction of the image side
    min_side: float = 0.3  # the box is at least this fraction of the side wide and high
    max_pixels: int = 128  # masks are computed on slices subsampled to at most this side (speed)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Box(NamedTuple):
    """A rectangle in fractions of the slice (0 … 1): rows y0 … y1, columns x0 … x1."""

    y0: float
    x0: float
    y1: float
    x1: float

    def pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1) in pixels of a ``height`` × ``width`` slice, at least one pixel each way."""
        r0, c0 = int(np.floor(self.y0 * height)), int(np.floor(self.x0 * width))
        r1, c1 = int(np.ceil(self.y1 * height)), int(np.ceil(self.x1 * width))
        r0, c0 = min(max(r0, 0), height - 1), min(max(c0, 0), width - 1)
        return r0, c0, max(min(r1, height), r0 + 1), max(min(c1, width), c0 + 1)


WHOLE = Box(0.0, 0.0, 1.0, 1.0)


def hu_from_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Approximate HU of windowed uint8 pixels (0 → level − width/2, 255 → level + width/2); values
    clipped by the window come back as its ends."""
    return (level - width / 2.0 + values.astype(np.float32) * np.float32(width / 255.0)).astype(np.float32)


def _largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """Each slice's largest in-plane connected piece of ``mask`` (S, H, W)."""
    labels, n = ndimage.label(mask, structure=_IN_PLANE)
    if n == 0:
        return mask
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    sizes[0] = 0
    # Each label lies in one slice (in-plane connectivity): any of its voxels names it. Then per
    # slice its largest label, the lowest-numbered of equal ones (whole arrays: a noisy slice has
    # thousands of specks, too many for a loop over labels).
    slice_of = np.zeros(n + 1, dtype=np.int64)
    slice_of[flat] = np.repeat(np.arange(mask.shape[0]), mask.shape[1] * mask.shape[2])
    label_ids = np.arange(1, n + 1)
    best_size = np.zeros(mask.shape[0], dtype=np.int64)
    np.maximum.at(best_size, slice_of[1:], sizes[1:])
    largest = label_ids[sizes[1:] == best_size[slice_of[1:]]]
    best = np.full(mask.shape[0], n + 1, dtype=np.int64)  # n + 1: a slice without any piece
    np.minimum.at(best, slice_of[largest], largest)
    keep = np.zeros(n + 1, dtype=bool)
    keep[best[best <= n]] = True
    return keep[labels]


def body_mask(hu: np.ndarray, settings: LungBoxSettings = LungBoxSettings()) -> np.ndarray:
    """(S, H, W) bool: the patient on each slice — tissue, its largest piece, holes (lungs) filled."""
    hu = np.asarray(hu)
    if hu.ndim == 2:
        return body_mask(hu[None], settings)[0]
    tissue = hu > settings.tissue_hu
    return ndimage.binary_fill_holes(_largest_per_slice(tissue), structure=_IN_PLANE)


def lung_mask(
    hu: np.ndarray, settings: LungBoxSettings = LungBoxSettings(), body: np.ndarray | None = None
) -> np.ndarray:
    """(S, H, W) bool: air inside the body, its 3-D regions of at least ``min_region`` × the largest."""
    hu = np.asarray(hu)
    if hu.ndim == 2:
        return lung_mask(hu[None], settings, None if body is None else body[None])[0]
    body = body_mask(hu, settings) if body is None else body
    air = body & (hu < settings.air_hu)
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes >= settings.min_region * sizes.max()
    keep[0] = False
    return keep[labels]


def _subsample(hu: np.ndarray, max_pixels: int) -> np.ndarray:
    step = max(1, int(np.ceil(max(hu.shape[1:]) / max_pixels)))
    return hu[:, ::step, ::step] if step > 1 else hu


def box_of_mask(mask: np.ndarray, settings: LungBoxSettings = LungBoxSettings()) -> Box:
    """The rectangle (fractions) of ``mask`` (S, H, W) over every slice, with margin and minimum side."""
    height, width = mask.shape[-2:]
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    if len(rows) == 0:
        return WHOLE
    edges = []
    for lo, hi, side in ((rows[0], rows[-1] + 1, height), (cols[0], cols[-1] + 1, width)):
        a, b = lo / side - settings.margin, hi / side + settings.margin
        short = settings.min_side - (b - a)
        if short > 0:  # grow about the centre to the minimum side
            a, b = a - short / 2, b + short / 2
        shift = max(0.0 - a, 0.0) - max(b - 1.0, 0.0)  # slide back inside the slice before clipping
        a, b = max(a + shift, 0.0), min(b + shift, 1.0)
        edges.append((float(a), float(b)))
    (y0, y1), (x0, x1) = edges
    return Box(y0, x0, y1, x1)


def lung_box(hu: np.ndarray, settings: LungBoxSettings = LungBoxSettings()) -> Box:
    """The lung box of one series, ``hu`` (S, H, W) Hounsfield units in any slice order (a box is a
    union over slices). Computed on slices subsampled to ``max_pixels`` a side; a box in fractions
    of the slice fits the full-size slices alike."""
    hu = np.asarray(hu)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.size == 0:
        return WHOLE
    # Fractions measured on the subsampled grid hold for the full one within one small pixel (under
    # 1 % of the side at 128), well inside the margin.
    return box_of_mask(lung_mask(_subsample(hu, settings.max_pixels), settings), settings)


def lung_box_of_windows(
    volume: np.ndarray,
    lung_window: tuple[float, float],
    settings: LungBoxSettings = LungBoxSettings(),
    channel: int = 0,
) -> Box:
    """The lung box of a series of windowed uint8 slices ``(S, H, W, C)`` (the slice store's, or what
    ``predict`` reads), from the lung window's channel inverted to HU."""
    volume = np.asarray(volume)
    if volume.ndim != 4 or volume.shape[0] == 0:
        return WHOLE
    step = max(1, int(np.ceil(max(volume.shape[1:3]) / settings.max_pixels)))
    level, width = lung_window
    return lung_box(hu_from_window(volume[:, ::step, ::step, channel], level, width), settings)
