"""Stage-1 data: slice datasets over a store, input modes, samplers (balanced, per rank, per epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.train import FakeStore, fake_labels
from pedetect.data.dataset import N_SLICES, SLICE_INDEX, SliceDataset, StoreError, slice_items
from pedetect.data.sampler import EpochSampler, ShardSampler
from pedetect.labels import IMAGE_LABEL, SERIES, SOP
from pedetect.recipe import AugmentConfig


@pytest.fixture(scope="module")
def labelled():
    labels = fake_labels(4, slices=6)
    return labels, FakeStore(labels, size=24)


def test_slice_items_place_labels_in_the_store(labelled):
    labels, store = labelled
    shuffled = labels.sample(frac=1.0, random_state=0)
    items = slice_items(shuffled, store.slices)
    assert list(items[SOP]) == list(shuffled[SOP])  # label order kept
    assert (items[N_SLICES] == 6).all() and items[SLICE_INDEX].between(0, 5).all()


def test_missing_slices_are_counted(labelled):
    labels, store = labelled
    partial = store.slices[~store.slices[SOP].isin(labels[SOP].iloc[:5])]
    with pytest.raises(StoreError, match=r"the store lacks 5 of 24 slices in the labels \(1 studies"):
        slice_items(labels, partial)


@pytest.mark.parametrize("mode,channels", [("windows", 3), ("pe", 1), ("adjacent", 3), ("both", 9)])
def test_input_modes(labelled, mode, channels):
    labels, store = labelled
    items = slice_items(labels, store.slices)
    dataset = SliceDataset(store, items, mode=mode, image_size=16, exam_labels=("central_pe",))
    image, target, index = dataset[1]
    assert image.shape == (channels, 16, 16) and image.dtype == torch.uint8
    assert target.shape == (2,) and index == 1
    series, i = items[SERIES].iloc[1], items[SLICE_INDEX].iloc[1]
    raw = dataset.read(1)
    if mode == "pe":  # the PE window of z alone
        assert np.array_equal(raw[:, :, 0], store.read_slice(series, i)[:, :, 1])
    if mode == "adjacent":  # PE window of z-1, z, z+1
        for c, j in enumerate((i - 1, i, i + 1)):
            assert np.array_equal(raw[:, :, c], store.read_slice(series, j)[:, :, 1])
    if mode == "both":  # three windows of z-1, z, z+1
        for c, j in enumerate((i - 1, i, i + 1)):
            assert np.array_equal(raw[:, :, 3 * c : 3 * c + 3], store.read_slice(series, j))


def test_adjacent_clamps_at_the_ends(labelled):
    labels, store = labelled
    items = slice_items(labels, store.slices)
    first = int(np.flatnonzero(items[SLICE_INDEX].to_numpy() == 0)[0])
    raw = SliceDataset(store, items, mode="adjacent", image_size=24).read(first)
    assert np.array_equal(raw[:, :, 0], raw[:, :, 1])


def test_crop_and_training_augmentation(labelled):
    labels, store = labelled
    items = slice_items(labels, store.slices)
    plain = SliceDataset(store, items, image_size=12, crop=0.5)
    assert torch.equal(
        plain[0][0], torch.from_numpy(store.read_slice(items[SERIES].iloc[0], 0)[6:18, 6:18]).permute(2, 0, 1)
    )
    augment = AugmentConfig.model_validate({"hflip": 1.0})
    flipped = SliceDataset(store, items, image_size=12, crop=0.5, augment=augment)
    assert torch.equal(flipped[0][0], plain[0][0].flip(-1))


def test_dataset_in_worker_processes(labelled):
    labels, store = labelled
    items = slice_items(labels, store.slices)
    # This process has run torch ops and the datasets above (cv2 imported): the workers that fork
    # from it resize with OpenCV (24 -> 16 px); this deadlocked when each worker set its OpenCV threads.
    SliceDataset(store, items, image_size=12, augment=AugmentConfig.model_validate({"hflip": 1.0}))[0]
    dataset = SliceDataset(store, items, image_size=16)
    loader = DataLoader(dataset, batch_size=5, num_workers=2, timeout=60)  # a deadlock fails, not hangs
    images, targets, index = next(iter(loader))
    assert images.shape == (5, 3, 16, 16) and index.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(targets[:, 0], torch.tensor(labels[IMAGE_LABEL].iloc[:5].to_numpy(), dtype=torch.float32))


def test_balanced_sampler_share_and_epochs():
    positive = np.zeros(1000, dtype=bool)
    positive[:50] = True
    sampler = EpochSampler(positive, mode="balanced", positive_share=0.25, samples_per_epoch=400, seed=3)
    order = np.array(list(sampler))
    assert len(order) == len(sampler) == 400
    assert positive[order].sum() == 100
    assert np.bincount(order[positive[order]], minlength=50)[:50].min() == 2  # whole passes over the positives
    sampler.set_epoch(1)
    assert not np.array_equal(np.array(list(sampler)), order)
    sampler.set_epoch(0)
    assert np.array_equal(np.array(list(sampler)), order)  # a resumed epoch draws the same


def test_all_sampler_is_a_permutation():
    sampler = EpochSampler(np.arange(10) < 3, mode="all", seed=0)
    assert sorted(sampler) == list(range(10))


def test_samplers_shard_by_rank(monkeypatch):
    import pedetect.data.sampler as sampler_module

    positive = np.arange(11) < 4
    shards, val = [], []
    for rank in range(2):
        monkeypatch.setattr(sampler_module, "world", lambda rank=rank: (rank, 2))
        train = EpochSampler(positive, mode="all", seed=1)
        shards.append(list(train))
        assert len(train) == 6
        val.append(list(ShardSampler(11)))
    assert set(shards[0]) | set(shards[1]) == set(range(11))  # padded by wrapping: equal shares
    assert sorted(val[0] + val[1]) == list(range(11))  # validation: every row exactly once


def test_balanced_needs_both_classes():
    with pytest.raises(ValueError, match="both positive and negative"):
        EpochSampler(np.zeros(5, dtype=bool), mode="balanced")


@pytest.mark.parametrize("mode", ["windows", "pe", "adjacent", "both"])
def test_series_inputs_match_the_training_inputs(labelled, mode):
    from pedetect.data.dataset import series_inputs
    from pedetect.recipe import InputConfig

    labels, store = labelled
    items = slice_items(labels, store.slices)
    series = items[SERIES].iloc[0]
    rows = np.flatnonzero((items[SERIES] == series).to_numpy())
    config = InputConfig(mode=mode, image_size=16, crop=0.75)
    batch = series_inputs(store.read_series(series), config)
    dataset = SliceDataset(store, items, mode=mode, image_size=16, crop=0.75)
    assert batch.shape == (6, config.channels, 16, 16) and batch.dtype == torch.uint8
    for row in rows:
        assert torch.equal(batch[items[SLICE_INDEX].iloc[row]], dataset[row][0])


def test_a_mirrored_slice_swaps_its_left_and_right_targets(labelled):
    """A left-right flip (or a half turn) puts the embolus on the image's other side: the slice's
    leftsided_pe and rightsided_pe targets trade places; an up-down flip keeps them."""
    labels, store = labelled
    labels = labels.copy()
    labels["leftsided_pe"], labels["rightsided_pe"], labels["central_pe"] = 1.0, 0.0, 1.0
    items = slice_items(labels, store.slices)
    positive = int(np.flatnonzero(items[IMAGE_LABEL].to_numpy() > 0.5)[0])
    sides = ("leftsided_pe", "central_pe", "rightsided_pe")
    order = {}
    for name, augment in {
        "plain": None,
        "hflip": {"hflip": 1.0},
        "vflip": {"vflip": 1.0},
        "half turn": {"hflip": 1.0, "vflip": 1.0},
    }.items():
        config = AugmentConfig.model_validate(augment) if augment else None
        target = SliceDataset(store, items, image_size=12, augment=config, exam_labels=sides)[positive][1].tolist()
        order[name] = target[1:]
    assert order["plain"] == [1.0, 1.0, 0.0]
    assert order["hflip"] == [0.0, 1.0, 1.0]  # left and right swapped, central kept
    assert order["vflip"] == [1.0, 1.0, 0.0]
    assert order["half turn"] == [0.0, 1.0, 1.0]  # both flips: a rotation by 180 degrees, the sides swapped
    assert (
        SliceDataset(
            store, items, image_size=12, augment=AugmentConfig.model_validate({"vflip": 1.0}), exam_labels=sides
        ).side_columns
        is None
    )


def test_augmentations_that_would_mislabel_sides_are_refused(labelled):
    labels, store = labelled
    labels = labels.copy()
    labels["leftsided_pe"], labels["rightsided_pe"] = 1.0, 0.0
    items = slice_items(labels, store.slices)
    with pytest.raises(ValueError, match="train both leftsided_pe and rightsided_pe"):
        SliceDataset(store, items, augment=AugmentConfig.model_validate({"hflip": 0.5}), exam_labels=("leftsided_pe",))
    with pytest.raises(ValueError, match="rotate90"):
        SliceDataset(
            store,
            items,
            augment=AugmentConfig.model_validate({"rotate90": 0.5}),
            exam_labels=("leftsided_pe", "rightsided_pe"),
        )
