"""The lung box (pedetect.data.lung_box) on synthetic studies: it holds both lungs and every embolus.

The studies are written by ``pedetect synth`` and prepared into a slice store by ``pedetect
prepare``; the box is computed from the store's windowed slices (the lung window inverted to HU),
as training and predict compute it. The truth (which voxel is lung, which embolus) comes from the
phantom of the same study (``render_study`` with the arguments the files were written with).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.processes import run_pedetect
from pedetect.data.dataset import series_inputs, series_lung_box
from pedetect.data.lung_box import (
    WHOLE,
    LungBoxSettings,
    body_mask,
    hu_from_window,
    lung_box,
    lung_box_of_windows,
    lung_mask,
)
from pedetect.labels import SERIES, STUDY
from pedetect.recipe import InputConfig, LungCropConfig
from pedetect.store import SliceStore
from pedetect.synth.anatomy import Tissue
from pedetect.synth.render import render_study

N, SLICES, SIZE, SEED = 8, 24, 128, 5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("lungbox")
    run_pedetect(
        "synth",
        root / "synth",
        "--studies",
        N,
        "--slices",
        SLICES,
        "--size",
        SIZE,
        "--seed",
        SEED,
        "--positive-fraction",
        "0.75",
        "--no-progress",
    )
    run_pedetect("prepare", root / "synth" / "train", "--out", root / "store", "--workers", 1)
    return SliceStore(root / "store")


def test_box_holds_both_lungs_and_every_embolus(store):
    windows = store.settings["windows"]
    series_of = store.slices.drop_duplicates(STUDY).set_index(STUDY)[SERIES]
    labels = pd.read_csv(store.path.parent / "synth" / "train.csv")
    studies = list(dict.fromkeys(labels[STUDY]))
    assert len(studies) == N
    emboli_seen = 0
    for index, study in enumerate(studies):
        truth = render_study(index, seed=SEED, slices=SLICES, size=SIZE, positive_fraction=0.75)
        assert truth.plan.study_uid == study
        volume = store.read_series(series_of[study])
        box = lung_box_of_windows(volume, tuple(windows[0]))
        assert box != WHOLE
        r0, c0, r1, c1 = box.pixels(*volume.shape[1:3])
        outside = np.ones(volume.shape[1:3], dtype=bool)
        outside[r0:r1, c0:c1] = False
        lungs = truth.tissue == int(Tissue.LUNG)
        # Both lungs: lung voxels on each side of the midline, and none of them outside the box.
        assert lungs[:, :, : SIZE // 2].sum() > 100 and lungs[:, :, SIZE // 2 :].sum() > 100
        assert not (lungs & outside).any(), f"study {index}: {(lungs & outside).sum()} lung voxels outside {box}"
        assert not (truth.pe_mask & outside).any(), f"study {index}: embolus voxels outside {box}"
        emboli_seen += int(truth.pe_mask.sum())
        # The box is a crop, not the whole slice: the table, the arms' air and the background go.
        assert (r1 - r0) * (c1 - c0) < 0.75 * SIZE * SIZE
        # From the store's windowed JPEG slices as from the phantom's exact HU: within 2 % of the side.
        exact = lung_box(truth.hu)
        assert np.allclose(box, exact, atol=0.02), (box, exact)
    assert emboli_seen > 0  # positive studies were among them


def test_masks_on_one_slice_and_what_the_crop_gives(store):
    series = store.series_uids[0]
    volume = store.read_series(series)
    hu = hu_from_window(volume[..., 0], *store.settings["windows"][0])
    body, lungs = body_mask(hu), lung_mask(hu)
    assert body.shape == lungs.shape == hu.shape and not (lungs & ~body).any()  # lung is air inside the body
    assert 0.1 < body.mean() < 0.9 and lungs.any()
    # A series' inputs with the lung crop: the box's pixels resized to the input size.
    config = InputConfig(mode="windows", image_size=64, lung_crop=LungCropConfig())
    box = series_lung_box(volume, config, store.settings["windows"])
    inputs = series_inputs(volume, config, box)
    assert inputs.shape == (len(volume), 3, 64, 64)
    with pytest.raises(ValueError, match="lung box"):
        series_inputs(volume, config)  # a part of a series would give another box: the caller passes it


def test_no_lung_gives_the_whole_slice_and_settings_are_used():
    soft = np.full((4, 64, 64), 40.0, dtype=np.float32)  # all soft tissue: no air inside a body
    assert lung_box(soft) == WHOLE
    air = np.full((4, 64, 64), -1000.0, dtype=np.float32)  # all air: no body
    assert lung_box(air) == WHOLE
    # A body (a disc) with one small lung: the box is at least min_side wide and high.
    yy, xx = np.mgrid[:64, :64]
    hu = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28**2, 40.0, -1000.0).astype(np.float32)
    hu[30:34, 20:24] = -850.0
    box = lung_box(np.stack([hu] * 3), LungBoxSettings(margin=0.0, min_side=0.3))
    assert box.y1 - box.y0 == pytest.approx(0.3) and box.x1 - box.x0 == pytest.approx(0.3)
    assert box.y0 < 30 / 64 and box.y1 > 34 / 64 and box.x0 < 20 / 64 and box.x1 > 24 / 64
