"""Augmentations of slice tensors: flips, shift-scale-rotate, brightness/contrast, cutout, grid dropout.

They take and return ``(C, H, W)`` tensors of any channel count (3 windows, 3 adjacent slices, or
9). Flips, shift, scale, rotation and the resize to the training size are one affine map, so each
sample is interpolated once. On CPU uint8 tensors the warp and the intensity map run through OpenCV
on a zero-copy HWC view (about 5× faster than ``grid_sample``; the data loader workers are where
this matters); any other tensor (float, or on a GPU) goes through ``affine_grid``/``grid_sample``
with the same geometry.

Order, as the 4th-place recipe (albumentations): flips, shift-scale-rotate, brightness/contrast,
cutout or grid dropout. Each sample draws its parameters from a ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pedetect.recipe import AugmentConfig


@dataclass(frozen=True)
class Geometry:
    """One sample's geometric transform (in the output frame)."""

    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0  # degrees, counter-clockwise
    scale: float = 1.0
    shift_x: float = 0.0  # fraction of the output side
    shift_y: float = 0.0
    border: str = "constant"  # or "reflect"

    @property
    def is_identity(self) -> bool:  # the border does not matter without a warp
        return (
            not (self.hflip or self.vflip)
            and self.angle == 0
            and self.scale == 1
            and self.shift_x == 0
            and self.shift_y == 0
        )

    @property
    def swaps_sides(self) -> bool:
        """Whether the patient's left and right trade sides of the image: a left-right flip or a half
        turn, not both. An up-down flip keeps them (why the 5th place flipped vertically)."""
        half_turn = round(self.angle / 90.0) % 4 == 2
        return self.hflip != half_turn


def affine_matrix(in_hw: tuple[int, int], out_size: int, geometry: Geometry = Geometry()) -> np.ndarray:
    """2×3 matrix mapping source pixel (x, y) to output pixel (OpenCV convention, centres at integers).

    The source is resized to ``out_size`` about its centre, flipped, scaled, rotated and shifted.
    A pure flip at the same size is exact: x ↦ W − 1 − x.
    """
    h, w = in_hw
    c_src = np.array([(w - 1) / 2, (h - 1) / 2])
    c_dst = np.array([(out_size - 1) / 2, (out_size - 1) / 2])
    resize = np.diag([out_size / w, out_size / h])
    flip = np.diag([-1.0 if geometry.hflip else 1.0, -1.0 if geometry.vflip else 1.0])
    theta = math.radians(geometry.angle)
    # Counter-clockwise on screen (y points down): [[cos, sin], [-sin, cos]].
    cos, sin = math.cos(theta), math.sin(theta)
    if geometry.angle % 90 == 0:  # exact quarter turns (no 6e-17 residues): pixel centres land on pixel centres
        cos, sin = round(cos), round(sin)
    rotate = np.array([[cos, sin], [-sin, cos]]) * geometry.scale
    linear = rotate @ flip @ resize
    offset = c_dst + np.array([geometry.shift_x, geometry.shift_y]) * out_size - linear @ c_src
    return np.concatenate([linear, offset[:, None]], axis=1)


def _hwc_view(image: torch.Tensor) -> np.ndarray:
    """A numpy HWC view of a CHW tensor (no copy when the tensor is a permuted HWC array)."""
    return image.permute(1, 2, 0).numpy()


def _chw(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def _cv2_apply(fn, array: np.ndarray) -> np.ndarray:
    """Apply an OpenCV function channel-group-wise (OpenCV handles at most 4 channels in some ops)."""
    channels = array.shape[2]
    if channels <= 4:
        out = fn(np.ascontiguousarray(array))
        return out if out.ndim == 3 else out[:, :, None]
    parts = [_cv2_apply(fn, array[:, :, i : i + 3]) for i in range(0, channels, 3)]
    return np.concatenate(parts, axis=2)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (C, H, W) tensor to (C, size, size): area averaging when shrinking (no aliasing)."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
        return _chw(_cv2_apply(lambda a: cv2.resize(a, (size, size), interpolation=interpolation), _hwc_view(image)))
    mode = "area" if size < min(h, w) else "bilinear"
    out = F.interpolate(
        image[None].float(), size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False})
    )[0]
    return out.round().clamp(0, 255).to(image.dtype) if image.dtype == torch.uint8 else out


def warp(image: torch.Tensor, matrix: np.ndarray, out_size: int, border: str = "constant") -> torch.Tensor:
    """Bilinear affine warp of a (C, H, W) tensor; outside the source is 0 (or the source mirrored)."""
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        m = matrix.astype(np.float64)
        mode = cv2.BORDER_REFLECT_101 if border == "reflect" else cv2.BORDER_CONSTANT

        def warp(a: np.ndarray) -> np.ndarray:
            return cv2.warpAffine(a, m, (out_size, out_size), flags=cv2.INTER_LINEAR, borderMode=mode, borderValue=0)

        return _chw(_cv2_apply(warp, _hwc_view(image)))
    return warp_torch(image, matrix, out_size, border)


def warp_torch(image: torch.Tensor, matrix: np.ndarray, out_size: int, border: str = "constant") -> torch.Tensor:
    """The same warp as :func:`warp` with ``grid_sample`` (any dtype, any device)."""
    h, w = image.shape[-2:]
    # Output pixel -> source pixel, then both to normalised [-1, 1] coordinates (align_corners=False).
    full = np.vstack([matrix, [0, 0, 1]])
    inverse = np.linalg.inv(full)
    to_norm = lambda n: np.array([[2 / n, 0, 1 / n - 1], [0, 2 / n, 1 / n - 1], [0, 0, 1]])  # noqa: E731
    from_norm_out = np.linalg.inv(to_norm(out_size))
    src_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    theta = (src_norm @ inverse @ from_norm_out)[:2]
    theta_t = torch.as_tensor(theta, dtype=torch.float32, device=image.device)[None]
    source = image[None].float()
    grid = F.affine_grid(theta_t, [1, image.shape[0], out_size, out_size], align_corners=False)
    padding = "reflection" if border == "reflect" else "zeros"
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode=padding, align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out


def brightness_contrast(image: torch.Tensor, gain: float, offset: float) -> torch.Tensor:
    """``clip(x · gain + offset · 255)`` on the 0–255 scale (a lookup table on uint8)."""
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        table = np.clip(np.arange(256) * gain + offset * 255, 0, 255).round().astype(np.uint8)
        return _chw(_cv2_apply(lambda a: cv2.LUT(a, table), _hwc_view(image)))
    out = image.float() * gain + offset * 255
    return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out.clamp(0, 255)


def cutout(image: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Set each (y0, x0, y1, x1) box to 0 on every channel (the tensor is copied first)."""
    if not boxes:
        return image
    image = image.clone() if image.is_contiguous() else image.contiguous()
    for y0, x0, y1, x1 in boxes:
        image[:, y0:y1, x0:x1] = 0
    return image


def grid_boxes(size: int, unit: int, hole: int, offset: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """GridDropout's squares: one ``hole`` × ``hole`` square at the top-left of every ``unit`` × ``unit``
    cell of a grid shifted by ``offset`` (albumentations' GridDropout with random_offset)."""
    boxes = []
    for y in range(offset[0] - unit, size, unit):
        for x in range(offset[1] - unit, size, unit):
            y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + hole, size), min(x + hole, size)
            if y1 > y0 and x1 > x0:
                boxes.append((y0, x0, y1, x1))
    return boxes


def crop_region(height: int, width: int, crop: float = 1.0, box=None) -> tuple[int, int, int, int]:
    """``(row0, col0, row1, col1)``: the part of a ``height`` × ``width`` slice the CNN sees — the
    series' lung ``box`` (:class:`pedetect.data.lung_box.Box`) when given, else the central square of
    side ``crop`` × the shorter side (the whole slice for ``crop`` ≥ 1)."""
    if box is not None:
        return box.pixels(height, width)
    if crop >= 1.0:
        return 0, 0, height, width
    side = max(1, int(round(min(height, width) * crop)))
    y0, x0 = (height - side) // 2, (width - side) // 2
    return y0, x0, y0 + side, x0 + side


def box_crop(image: torch.Tensor, box) -> torch.Tensor:
    """The ``box`` (:class:`pedetect.data.lung_box.Box`, fractions of the slice) of a (C, H, W) tensor (a view)."""
    height, width = image.shape[-2:]
    r0, c0, r1, c1 = crop_region(height, width, box=box)
    return image[..., r0:r1, c0:c1]


_Image = TypeVar("_Image", torch.Tensor, np.ndarray)


def centre_crop(image: _Image, fraction: float) -> _Image:
    """The central square of side ``fraction`` × the shorter side (a view, no copy)."""
    height, width = image.shape[-2:]
    r0, c0, r1, c1 = crop_region(height, width, fraction)
    return image[..., r0:r1, c0:c1]


class SliceAugment:
    """Crop, resize and (for training) augment one (C, H, W) slice tensor to (C, size, size).

    With ``config=None`` only the crop and resize happen (validation and inference).
    """

    def __init__(self, image_size: int, config: AugmentConfig | None = None, crop: float = 1.0):
        self.size = image_size
        self.config = config
        self.crop = crop

    def draw_geometry(self, rng: np.random.Generator) -> Geometry:
        c = self.config
        if c is None:
            return Geometry()
        hflip = bool(rng.random() < c.hflip)
        vflip = bool(rng.random() < c.vflip)
        quarter = 90.0 * int(rng.integers(1, 4)) if c.rotate90 > 0 and rng.random() < c.rotate90 else 0.0
        ssr = c.shift_scale_rotate
        if ssr.p > 0 and rng.random() < ssr.p:
            return Geometry(
                hflip,
                vflip,
                angle=quarter + float(rng.uniform(-ssr.rotate, ssr.rotate)),
                scale=float(rng.uniform(1 - ssr.scale, 1 + ssr.scale)),
                shift_x=float(rng.uniform(-ssr.shift, ssr.shift)),
                shift_y=float(rng.uniform(-ssr.shift, ssr.shift)),
                border=ssr.border,
            )
        return Geometry(hflip, vflip, angle=quarter)

    def place(self, image: torch.Tensor, geometry: Geometry, box=None) -> torch.Tensor:
        """The geometric part of :meth:`transform` alone: crop (the lung ``box`` or the central
        square), resize and ``geometry``'s warp. A per-pixel target (the clot map of
        ``cnn.loss.clot_map_weight``) goes through this with its slice's geometry, so it stays on
        the pixels it marks."""
        image = box_crop(image, box) if box is not None else centre_crop(image, self.crop)
        if geometry.is_identity:
            return resize(image, self.size)
        # Shrink by area averaging first (no aliasing of thin vessels), then one warp at the training size.
        if min(image.shape[-2:]) > self.size:
            image = resize(image, self.size)
        return warp(
            image, affine_matrix((image.shape[-2], image.shape[-1]), self.size, geometry), self.size, geometry.border
        )

    def __call__(self, image: torch.Tensor, rng: np.random.Generator | None = None, box=None) -> torch.Tensor:
        return self.transform(image, rng, box)[0]

    def transform(
        self, image: torch.Tensor, rng: np.random.Generator | None = None, box=None
    ) -> tuple[torch.Tensor, Geometry]:
        """The slice and the geometry drawn for it (targets that name a side follow the geometry).
        ``box``: the series' lung box (``cnn.input.lung_crop``), cropped before the resize."""
        if self.config is None or rng is None:
            return self.place(image, Geometry(), box), Geometry()
        c = self.config
        geometry = self.draw_geometry(rng)
        image = self.place(image, geometry, box)
        bc = c.brightness_contrast
        if bc.p > 0 and rng.random() < bc.p:
            gain = float(rng.uniform(1 - bc.contrast, 1 + bc.contrast))
            offset = float(rng.uniform(-bc.brightness, bc.brightness))
            image = brightness_contrast(image, gain, offset)
        co, gd = c.cutout, c.grid_dropout
        if c.dropout_one_of:  # one draw picks cutout, grid dropout or neither (albumentations OneOf)
            u = rng.random() if co.p or gd.p else 1.0
            do_cutout, do_grid = u < co.p, co.p <= u < co.p + gd.p
        else:
            do_cutout = co.p > 0 and rng.random() < co.p
            do_grid = gd.p > 0 and rng.random() < gd.p
        if do_cutout:
            boxes = []
            largest = max(1, int(round(co.size * self.size)))
            for _ in range(co.holes):
                hh, ww = (largest, largest) if co.fixed_size else (int(v) for v in rng.integers(1, largest + 1, size=2))
                y0, x0 = (int(v) for v in rng.integers(0, self.size - np.array([hh, ww]) + 1))
                boxes.append((y0, x0, y0 + hh, x0 + ww))
            image = cutout(image, boxes)
        if do_grid:
            lo, hi = (max(2, int(round(f * self.size))) for f in (gd.unit_min, gd.unit_max))
            unit = int(rng.integers(lo, hi + 1))
            hole = max(1, int(round(unit * gd.ratio)))
            grid_offset = (int(rng.integers(0, unit)), int(rng.integers(0, unit)))
            image = cutout(image, grid_boxes(self.size, unit, hole, grid_offset))
        return image, geometry
