"""Where the heart is in a series, from its Hounsfield units alone (no hand-drawn labels).

A CTPA shows the heart as the largest pool of contrast-enhanced blood inside the thoracic cavity:
the ventricles and atria together are several times the cross-section of any vessel, and the
solid organs below the diaphragm (liver, spleen) are not enhanced to blood's level. So, slice by
slice, on the windowed images of the store (or of ``predict``'s reader):

1. the Hounsfield units are recovered from the three window channels (:func:`estimate_hu`);
2. the body and the lungs are :mod:`pedetect.data.lung_box`'s masks (air inside the body, in
   regions of lung size); the cavity between and around the lungs is each image row from the first
   lung pixel to the last;
3. blood is HU ≥ ``BLOOD_HU`` inside the cavity, outside the lungs and in front of the spine
   (the posterior ``SPINE_SHARE`` of the chest, where bone marrow is as bright as blood); an opening
   by a disk of ``OPENING`` keeps what is thicker than about 2 cm, the chambers (and the aortic
   root), and drops the vessels and the hilar branches; on each slice the chambers are the thick
   regions of at least ``CHAMBER_SHARE`` of its largest;
4. the heart's slices are the run of slices around the largest chamber area where it keeps at
   least ``SLICE_SHARE`` of it; the box is the union of the chambers' bounding boxes there,
   widened by ``MARGIN`` (the myocardium and pericardium around the blood) and made square.

Image rows are taken to run from the front of the patient to the back (the standard axial
orientation of supine CT). Distances are fractions of the image side, not millimetres: the reader's
images carry no pixel spacing, and a CT field of view is about 350 mm whatever the matrix (so 0.03
of the side is about 10 mm). Where no blood region is found (an unenhanced scan) the box is the cavity's central
anterior part and ``found`` is False: the heart model still gets an input, and the caller can count
such series.

The crop (:func:`heart_crop`) resamples the box to a fixed ``depth × size²`` block in a given window
(the 2nd place's mediastinal L50/W350 by default), the input of :mod:`pedetect.models.heart`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pedetect.data.lung_box import body_mask, hu_from_window, lung_mask

BLOOD_HU = 100.0  # contrast-enhanced blood is above it; myocardium, liver and muscle (40-75 HU) below
SPINE_SHARE = 0.25  # the posterior part of the chest, front to back, that holds the spine
OPENING = 0.025  # of the side: about 9 mm; an opening by it keeps the chambers and drops the vessels
CHAMBER_SHARE = 0.2  # a thick blood region this share of the slice's largest is a chamber too
SLICE_SHARE = 0.3  # a heart slice keeps this share of the largest region's area
MARGIN = 0.04  # of the side, around the blood pools' box: the myocardium and the opening's loss
WORK_SIDE = 128  # images are reduced to this side for the search (the box is scaled back)


@dataclass(frozen=True)
class HeartBox:
    """Slices ``z0 ≤ k < z1``, rows ``y0 ≤ r < y1`` and columns ``x0 ≤ c < x1`` of the series as read."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int
    found: bool  # a blood region was found (else the box is the cavity's central anterior part)


def estimate_hu(volume: np.ndarray, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """Hounsfield units of ``volume`` (N, H, W, C) uint8, channel c windowed by ``windows[c]`` (level,
    width), as float32 (N, H, W). Each pixel takes the narrowest window in which it is not clipped
    (the most precise); clipped in every window, the farthest bound it is clipped at (with the
    store's windows, anything above 450 HU reads 450: bone and the densest contrast look alike)."""
    windows = [(float(level), float(width)) for level, width in windows]
    if volume.ndim != 4 or volume.shape[-1] != len(windows):
        raise ValueError(f"expected (N, H, W, {len(windows)}) images, got shape {volume.shape}")
    shape = volume.shape[:3]
    planes = np.ascontiguousarray(np.moveaxis(volume, -1, 0))  # each window's image contiguous for the masked updates
    high = np.full(shape, -np.inf, dtype=np.float32)
    low = np.full(shape, np.inf, dtype=np.float32)
    for c, (level, width) in enumerate(windows):  # in place, masked: no temporary volumes
        channel = planes[c]
        np.maximum(high, np.float32(level + width / 2.0), out=high, where=channel == 255)
        np.minimum(low, np.float32(level - width / 2.0), out=low, where=channel == 0)
    hu = np.where(np.isfinite(high), high, low)  # clipped in every window (overwritten below where not)
    for c in sorted(range(len(windows)), key=lambda c: -windows[c][1]):  # widest first: the narrowest wins
        level, width = windows[c]
        channel = planes[c]
        np.copyto(hu, hu_from_window(channel, level, width), where=(channel > 0) & (channel < 255))
    return hu.astype(np.float32, copy=False)


def _reduce(hu: np.ndarray, step: int) -> np.ndarray:
    """Means of ``step`` × ``step`` blocks, then a light blur: the search works on the anatomy, not
    the noise (a left ventricle at 120 HU under 25 HU of noise breaks up when thresholded raw)."""
    n, h, w = hu.shape
    h2, w2 = h // step * step, w // step * step
    small = hu[:, :h2, :w2].reshape(n, h2 // step, step, w2 // step, step).mean(axis=(2, 4))
    return ndimage.gaussian_filter(small, sigma=(0, 1.0, 1.0)).astype(np.float32)


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 1)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def _in_front_of_the_spine(lung: np.ndarray) -> np.ndarray:
    """Rows in front of the posterior ``SPINE_SHARE`` of the lungs' front-to-back extent: the vertebral
    body (its marrow as bright as blood, its cortex clipped like dense contrast) and the descending
    aorta lie there, the heart in front of them."""
    rows = np.flatnonzero(lung.any(axis=1))
    keep = np.zeros(lung.shape, dtype=bool)
    if len(rows):
        front, back = rows.min(), rows.max()
        keep[: int(back - SPINE_SHARE * (back - front)) + 1] = True
    return keep


def _chambers(thick: np.ndarray) -> np.ndarray:
    """The thick blood regions that are a sizeable part of the slice's largest (the chambers, not a
    vessel that survived the opening)."""
    labels, n = ndimage.label(thick)
    if n == 0:
        return thick
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= CHAMBER_SHARE * sizes.max()) + 1
    return np.isin(labels, keep)


def _cavity(lung: np.ndarray) -> np.ndarray:
    """Each row from its first lung pixel to its last (the space the lungs wrap: mediastinum, heart)."""
    cols = np.arange(lung.shape[1])
    has = lung.any(axis=1)
    first = np.where(has, np.argmax(lung, axis=1), lung.shape[1])
    last = np.where(has, lung.shape[1] - 1 - np.argmax(lung[:, ::-1], axis=1), -1)
    return (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])


def locate_heart(hu: np.ndarray) -> HeartBox:
    """The heart's box in a series' Hounsfield units ``hu`` (N, H, W), slices in position order."""
    n, h, w = hu.shape
    step = max(1, int(round(max(h, w) / WORK_SIDE)))
    small = _reduce(hu, step)
    side = max(small.shape[1:])
    opening = _disk(int(round(OPENING * side)))
    areas = np.zeros(n)
    boxes: list[tuple[int, int, int, int] | None] = [None] * n
    cavities = np.zeros(small.shape, dtype=bool)
    bodies = body_mask(small)  # the lung box's masks: one definition of the body and the lungs
    lungs = lung_mask(small, body=bodies)
    blood = np.zeros(small.shape, dtype=bool)
    for k in range(n):
        body, lung = bodies[k], lungs[k]
        cavity = _cavity(lung) & body
        cavities[k] = cavity
        blood[k] = cavity & ~lung & (small[k] >= BLOOD_HU) & _in_front_of_the_spine(lung)
    # Every slice's opening at once: the disk lies in the slice plane, so slices do not mix.
    opened = ndimage.binary_opening(blood, structure=opening[None])
    for k in range(n):
        if not opened[k].any():
            continue
        region = _chambers(opened[k])
        if not region.any():
            continue
        rows, cols = np.nonzero(region)
        areas[k] = len(rows)
        boxes[k] = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    margin = MARGIN * side
    if areas.max() > 0:
        peak = int(np.argmax(areas))
        keep = areas >= SLICE_SHARE * areas[peak]
        z0 = peak
        while z0 > 0 and keep[z0 - 1]:
            z0 -= 1
        z1 = peak + 1
        while z1 < n and keep[z1]:
            z1 += 1
        chosen = [box for box in boxes[z0:z1] if box is not None]
        y0, y1 = min(b[0] for b in chosen), max(b[1] for b in chosen)
        x0, x1 = min(b[2] for b in chosen), max(b[3] for b in chosen)
        z0, z1 = max(0, z0 - 1), min(n, z1 + 1)  # the slices just beyond still hold myocardium
        found = True
    else:  # no enhanced blood: the central anterior part of the cavity over the middle slices
        rows, cols = np.nonzero(cavities.any(axis=0))
        if len(rows) == 0:
            rows, cols = np.array([0, small.shape[1] - 1]), np.array([0, small.shape[2] - 1])
        cy, cx = (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0
        half = 0.2 * side
        y0, y1, x0, x1 = int(cy - 2 * half), int(cy), int(cx - half), int(cx + half)
        z0, z1 = n // 4, max(n // 4 + 1, (3 * n) // 4)
        found = False
    # Back to the series' pixels, widened by the margin, made square about its centre, clipped.
    y0, y1, x0, x1 = y0 - margin, y1 + margin, x0 - margin, x1 + margin
    half = max(y1 - y0, x1 - x0) / 2.0
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    y0, y1, x0, x1 = (cy - half) * step, (cy + half) * step, (cx - half) * step, (cx + half) * step
    return HeartBox(
        z0=int(z0),
        z1=int(z1),
        y0=int(max(0, np.floor(y0))),
        y1=int(min(h, np.ceil(y1))),
        x0=int(max(0, np.floor(x0))),
        x1=int(min(w, np.ceil(x1))),
        found=bool(found),
    )


def heart_crop(hu: np.ndarray, box: HeartBox, *, depth: int, size: int, window: Sequence[float]) -> np.ndarray:
    """The box of ``hu`` (N, H, W) in ``window`` (level, width), resampled (linear) to (depth, size, size) uint8."""
    # torch here only: the heart model's crop (recipes with a heart: section); localisation imports
    # this module for estimate_hu alone.
    import torch
    import torch.nn.functional as F

    block = hu[box.z0 : box.z1, box.y0 : box.y1, box.x0 : box.x1]
    if block.size == 0:
        raise ValueError(f"empty heart box {box} for a series of shape {hu.shape}")
    level, width = float(window[0]), float(window[1])
    scaled = np.clip((block - (level - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(scaled))[None, None]
    resized = F.interpolate(tensor, size=(int(depth), int(size), int(size)), mode="trilinear", align_corners=False)
    return np.round(resized[0, 0].numpy() * 255.0).astype(np.uint8)


def series_heart_crop(
    volume: np.ndarray, windows: Sequence[Sequence[float]], *, depth: int, size: int, window: Sequence[float]
) -> tuple[np.ndarray, HeartBox]:
    """The heart crop of a windowed series ``volume`` (N, H, W, 3) uint8 and the box it came from
    (in the series' pixels). The search reads every ``step``-th pixel (it works at ``WORK_SIDE``
    anyway) and the crop reads the box's pixels only: Hounsfield units of the whole series at full
    resolution are never made."""
    n, h, w = volume.shape[:3]
    step = max(1, int(round(max(h, w) / WORK_SIDE)))
    found = locate_heart(estimate_hu(volume[:, ::step, ::step], windows))
    box = HeartBox(
        z0=found.z0,
        z1=found.z1,
        y0=min(h - 1, found.y0 * step),
        y1=min(h, found.y1 * step),
        x0=min(w - 1, found.x0 * step),
        x1=min(w, found.x1 * step),
        found=found.found,
    )
    block = estimate_hu(volume[box.z0 : box.z1, box.y0 : box.y1, box.x0 : box.x1], windows)
    whole = HeartBox(0, block.shape[0], 0, block.shape[1], 0, block.shape[2], box.found)
    return heart_crop(block, whole, depth=depth, size=size, window=window), box
