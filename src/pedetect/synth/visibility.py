"""Whether a reader could see an embolus on a slice (docs/synthetic_visibility.md).

A filling defect shows when its contrast against the opacified blood, integrated over its area, stands
out of the image noise by Rose's criterion:

    SNR = (ΔHU · f / σ) · sqrt(A / c(A)) ≥ k,   and   A · f ≥ MIN_PIXELS,

with ΔHU the opacified blood's HU minus the clot's, σ the study's noise SD (per pixel), A the clot's
cross-section on the slice in pixels of the stored image, f the mean fraction of the slice's slab
(its thickness) that the clot fills over those pixels (partial volume along z: a clot that only
grazes a thick slice has its contrast diluted), and c(A) the noise's correlation factor: the variance
of the noise summed over A pixels is σ² · A · c(A) (c = 1 for white noise; the renderer's noise is
white noise blurred by a Gaussian, :data:`NOISE_BLUR_PX`, so neighbouring pixels share it and an area
averages less of it away). k = :data:`ROSE_K`. Everything here is pure arithmetic on the plan's
geometry: no random draw, no rendering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pedetect.synth.raster import Grid, Segment, segment_mask

ROSE_K = 5.0  # Rose (1948): a uniform object is seen with certainty at an SNR of about 5 (3-7)
MIN_PIXELS = 2.0  # pixels' worth of clot (A · f) on the slice: below this no reader calls a defect
NOISE_BLUR_PX = 0.8  # Gaussian sigma (pixels) of the renderer's noise (pedetect.synth.render._noise_bank)
# Correlated pixels per pixel over a clot-sized area: c(A) = A·N/(A + N − 1) with N fitted to the
# variance of sums of the renderer's own noise over discs of 5-197 pixels (within 7 %; thin and
# crescent shapes average more noise away, so the rule errs towards "not visible" for them). The
# asymptote for an infinite area is 4π·0.8² = 8.04 (docs/synthetic_visibility.md, "Calibration").
NOISE_CORRELATED_PIXELS = 6.8
SUBPLANE_MM = 0.5  # the slab is sampled along z at most this far apart


def correlation_factor(area_px: float, correlated: float = NOISE_CORRELATED_PIXELS) -> float:
    """c(A): Var(noise summed over ``area_px`` pixels) / (σ² · area_px); 1 for a single pixel, rising
    to ``correlated`` for a large area."""
    area = max(float(area_px), 1e-9)
    return area * correlated / (area + correlated - 1.0)


def rose_snr(contrast_hu: float, noise_sd: float, area_px: float, fill: float = 1.0) -> float:
    """The defect's signal-to-noise ratio: (ΔHU · fill / σ) · sqrt(A / c(A))."""
    if area_px <= 0 or fill <= 0:
        return 0.0
    return contrast_hu * fill / noise_sd * math.sqrt(area_px / correlation_factor(area_px))


def is_visible(
    contrast_hu: float,
    noise_sd: float,
    area_px: float,
    fill: float = 1.0,
    *,
    k: float = ROSE_K,
    min_pixels: float = MIN_PIXELS,
) -> bool:
    """Whether a defect of ``area_px`` pixels, ``contrast_hu`` below the blood, filling ``fill`` of the
    slice's thickness on average, shows in noise of SD ``noise_sd``: at least ``min_pixels`` pixels'
    worth of clot (area × fill) and a Rose SNR of at least ``k``."""
    return area_px * fill >= min_pixels and rose_snr(contrast_hu, noise_sd, area_px, fill) >= k


# --------------------------------------------------------------------------------- an embolus, slice by slice


@dataclass(frozen=True)
class SliceVisibility:
    """One embolus on every slice of the grid (arrays of length S, position order)."""

    pixels: np.ndarray  # int: its pixels on the slice (the rendered mask)
    fill: np.ndarray  # float: mean fraction of the slice's slab the clot fills over those pixels
    snr: np.ndarray  # float: rose_snr of the slice
    visible: np.ndarray  # bool: is_visible of the slice


def slab_thickness(grid: Grid, spacing_mm: float, thickness_mm: float) -> float:
    """The slab one slice images, in the phantom's own millimetres: the grid's step times the header's
    thickness over its spacing (the phantom's chest is mapped onto the scan range whatever the
    spacing, so the header's millimetres are not the phantom's along z)."""
    step = float(grid.zs[1] - grid.zs[0]) if len(grid.zs) > 1 else float(spacing_mm)
    return step * float(thickness_mm) / float(spacing_mm)


def _slice_masks(chunks: Sequence, n_slices: int) -> dict[int, tuple[slice, slice, np.ndarray]]:
    """The embolus's mask on each slice it touches: slice → (rows, cols, mask over that box)."""
    parts: dict[int, list] = {}
    for box, m in chunks:
        for k in range(box[0].start, box[0].stop):
            on = m[k - box[0].start]
            if on.any():
                parts.setdefault(k, []).append((box[1], box[2], on))
    out = {}
    for k, pieces in parts.items():
        r0, r1 = min(p[0].start for p in pieces), max(p[0].stop for p in pieces)
        c0, c1 = min(p[1].start for p in pieces), max(p[1].stop for p in pieces)
        mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        for rows, cols, on in pieces:
            mask[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] |= on
        out[k] = (slice(r0, r1), slice(c0, c1), mask)
    return out


def slab_fill(
    segments: Sequence[Segment], lumen: Sequence[Segment], grid: Grid, k: int, rows: slice, cols: slice, slab_mm: float
) -> np.ndarray:
    """Per pixel of the box (rows, cols) on slice k: the fraction of the slab [z_k ± slab_mm/2] that the
    clot (its capsules, clipped to the artery's lumen as the rasteriser clips it) fills."""
    n = max(5, math.ceil(slab_mm / SUBPLANE_MM))
    zs = grid.zs[k] + slab_mm * ((np.arange(n) + 0.5) / n - 0.5)
    ys, xs = grid.ys[rows], grid.xs[cols]
    clot = np.zeros((n, len(ys), len(xs)), dtype=bool)
    for seg in segments:
        clot |= segment_mask(seg, zs, ys, xs)
    inside = np.zeros_like(clot)
    for seg in lumen:
        inside |= segment_mask(seg, zs, ys, xs)
    return (clot & inside).mean(axis=0)


def embolus_visibility(
    segments: Sequence[Segment],
    lumen: Sequence[Segment],
    chunks: Sequence,
    grid: Grid,
    *,
    slab_mm: float,
    contrast_hu: float,
    noise_sd: float,
) -> SliceVisibility:
    """Where an embolus shows: on each slice its rendered pixels (``chunks``, the plan's mask), the
    mean slab fill over them, the Rose SNR and whether it is visible (:func:`is_visible`)."""
    S = len(grid.zs)
    pixels = np.zeros(S, dtype=np.int64)
    fill = np.zeros(S, dtype=np.float64)
    snr = np.zeros(S, dtype=np.float64)
    visible = np.zeros(S, dtype=bool)
    for k, (rows, cols, mask) in sorted(_slice_masks(chunks, S).items()):
        pixels[k] = int(mask.sum())
        fill[k] = float(slab_fill(segments, lumen, grid, k, rows, cols, slab_mm)[mask].mean())
        snr[k] = rose_snr(contrast_hu, noise_sd, pixels[k], fill[k])
        visible[k] = is_visible(contrast_hu, noise_sd, pixels[k], fill[k])
    return SliceVisibility(pixels=pixels, fill=fill, snr=snr, visible=visible)


__all__ = [
    "MIN_PIXELS",
    "NOISE_BLUR_PX",
    "NOISE_CORRELATED_PIXELS",
    "ROSE_K",
    "SliceVisibility",
    "correlation_factor",
    "embolus_visibility",
    "is_visible",
    "rose_snr",
    "slab_fill",
    "slab_thickness",
]
