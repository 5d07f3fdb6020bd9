"""Tensor augmentations: geometry exactness, the OpenCV and torch paths agreeing, channel counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedetect.data.augment import (
    Geometry,
    SliceAugment,
    affine_matrix,
    brightness_contrast,
    cutout,
    resize,
    warp,
    warp_torch,
)
from pedetect.recipe import AugmentConfig


def image(channels: int = 3, h: int = 40, w: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    # A smooth image (interpolation differences stay small) as a permuted HWC array, like the dataset's.
    yy, xx = np.mgrid[:h, :w]
    base = 127 + 60 * np.sin(yy / 5.0 + rng.uniform(0, 3)) * np.cos(xx / 7.0)
    stack = np.stack([base + 10 * c for c in range(channels)], axis=2)
    return torch.from_numpy(np.clip(stack, 0, 255).astype(np.uint8)).permute(2, 0, 1)


@pytest.mark.parametrize("channels", [3, 9])
def test_flips_are_exact(channels):
    x = image(channels)
    assert torch.equal(warp(x, affine_matrix((40, 40), 40, Geometry(hflip=True)), 40), x.flip(-1))
    assert torch.equal(warp(x, affine_matrix((40, 40), 40, Geometry(vflip=True)), 40), x.flip(-2))
    assert torch.equal(warp_torch(x, affine_matrix((40, 40), 40, Geometry(hflip=True)), 40), x.flip(-1))


def test_rotation_is_counter_clockwise_on_screen():
    x = torch.zeros(1, 41, 41, dtype=torch.uint8)
    x[0, 20, 35] = 255  # right of the centre
    out = warp(x, affine_matrix((41, 41), 41, Geometry(angle=90)), 41)
    assert tuple(np.argwhere(out[0].numpy() > 100)[0]) == (5, 20)  # now above the centre


@pytest.mark.parametrize("border", ["constant", "reflect"])
def test_opencv_and_torch_warps_agree(border):
    x = image(9, 40, 50)
    geometry = Geometry(hflip=True, angle=17, scale=1.1, shift_x=0.05, shift_y=-0.03, border=border)
    matrix = affine_matrix((40, 50), 32, geometry)
    a, b = warp(x, matrix, 32, border).float(), warp_torch(x.float(), matrix, 32, border)
    assert a.shape == b.shape == (9, 32, 32)
    inner = (a - b).abs()[:, 4:-4, 4:-4]  # borders differ by convention only (reflect-101 vs reflect)
    assert inner.mean() < 1.0


def test_resize_shrinks_by_area_and_keeps_dtype():
    x = torch.zeros(3, 64, 64, dtype=torch.uint8)
    x[:, ::2, :] = 255  # stripes one pixel wide: area averaging gives flat grey, not aliasing
    out = resize(x, 32)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert 120 <= int(out.float().mean()) <= 135 and int(out.max()) - int(out.min()) <= 2
    assert resize(x, 64) is x


def test_without_config_only_resize():
    x = image(3, 48, 48)
    augment = SliceAugment(32, None)
    rng = np.random.default_rng(0)
    assert torch.equal(augment(x, rng), resize(x, 32))


def test_zero_probabilities_change_nothing():
    x = image(3)
    augment = SliceAugment(40, AugmentConfig())
    assert torch.equal(augment(x, np.random.default_rng(0)), x)


def test_brightness_contrast_lookup_matches_float():
    x = image(3)
    a = brightness_contrast(x, 1.2, 0.1)
    b = brightness_contrast(x.float(), 1.2, 0.1).round()
    assert a.dtype == torch.uint8
    assert (a.float() - b).abs().max() <= 1
    assert a.float().mean() > x.float().mean()


def test_cutout_zeroes_boxes_without_touching_the_input():
    x = image(3) + 1
    out = cutout(x, [(2, 3, 10, 12)])
    assert (out[:, 2:10, 3:12] == 0).all() and (x > 0).all()
    assert torch.equal(out[:, 10:], x[:, 10:])


def test_full_augmentation_is_deterministic_for_a_seed_and_varies_otherwise():
    config = AugmentConfig.model_validate(
        {
            "hflip": 0.5,
            "vflip": 0.5,
            "shift_scale_rotate": {"p": 1.0},
            "brightness_contrast": {"p": 1.0},
            "cutout": {"p": 1.0, "holes": 3, "size": 0.2},
        }
    )
    augment = SliceAugment(32, config)
    x = image(9, 48, 48)
    a = augment(x, np.random.default_rng(1))
    b = augment(x, np.random.default_rng(1))
    c = augment(x, np.random.default_rng(2))
    assert a.shape == (9, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_works_on_float_tensors():
    config = AugmentConfig.model_validate(
        {"hflip": 1.0, "shift_scale_rotate": {"p": 1.0}, "brightness_contrast": {"p": 1.0}}
    )
    out = SliceAugment(32, config)(image(3).float(), np.random.default_rng(0))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
