"""``cnn.loss.clot_map_weight``: the slice CNN's activation map taught the training emboli's boxes.

- a clot map goes through the training augmentation with its slice's geometry and stays on the defect;
- the dense loss: positives and negatives averaged apart;
- ``--clots`` read and checked (visible rows only; slices the labels lack, boxes past the slice, a
  recipe that needs the file without it);
- trained on FakeStore's defects, the map singles out the defect's positions (AUC 0.99 against 0.82 from slice labels alone).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.train import FakeStore, fake_labels, tiny_config
from pedetect.data.augment import SliceAugment
from pedetect.data.dataset import SliceDataset, clot_map, slice_items
from pedetect.labels import IMAGE_LABEL, SERIES
from pedetect.recipe import AugmentConfig
from pedetect.train.module import clot_map_loss
from pedetect.train.setup import TrainError, read_clot_boxes, training_inputs


def test_a_clot_map_follows_its_slice_through_the_augmentation():
    # A bright square on a dark slice and the map of the same box, through flips and shifts drawn as in training.
    image = torch.zeros((1, 64, 64), dtype=torch.uint8)
    image[0, 20:26, 40:47] = 255
    box = np.array([[20, 25, 40, 46]])
    augment = SliceAugment(
        48, AugmentConfig(hflip=0.5, vflip=0.5, shift_scale_rotate={"p": 1.0, "shift": 0.1, "scale": 0.1, "rotate": 10})
    )
    rng = np.random.default_rng(0)
    overlaps = []
    for _ in range(20):
        moved, geometry = augment.transform(image, rng)
        placed = augment.place(clot_map((64, 64), box), geometry)
        a, b = moved[0] >= 128, placed[0] >= 128
        overlaps.append(float((a & b).sum() / (a | b).sum()))
    assert min(overlaps) == 1.0  # the same warp of the same pixels, to the bit
    assert clot_map((8, 8), None).sum() == 0


def test_the_dense_loss_weighs_the_few_positive_positions_as_much_as_the_rest():
    maps = torch.zeros((2, 1, 16, 16), dtype=torch.uint8)
    maps[0, 0, 4:8, 4:8] = 255  # one position of a 4 x 4 activation map on the first slice
    right = torch.full((2, 4, 4), -8.0)
    right[0, 1, 1] = 8.0
    wrong = -right
    assert float(clot_map_loss(right, maps)) == pytest.approx(2 * np.log1p(np.exp(-8.0)), rel=1e-3)
    # Wrong everywhere costs about 8 per term; a map that says "nowhere" pays the positive term in full.
    assert float(clot_map_loss(wrong, maps)) == pytest.approx(16.0, abs=0.01)
    assert float(clot_map_loss(torch.full((2, 4, 4), -8.0), maps)) == pytest.approx(8.0, abs=0.01)
    # No positive position in the batch: the negatives alone.
    assert float(clot_map_loss(torch.full((2, 4, 4), -8.0), torch.zeros_like(maps))) < 1e-3


@pytest.fixture
def fake():
    labels = fake_labels(6, slices=10, seed=3)
    store = FakeStore(labels, size=32)
    return labels, store, slice_items(labels, store.slices)


def test_the_visible_boxes_of_each_slice_are_read(fake, tmp_path):
    labels, store, items = fake
    clots = store.clots_frame()
    hidden = clots.iloc[[0]].assign(visible=0, row_min=0, row_max=1, col_min=0, col_max=1)
    path = tmp_path / "clots.csv"
    pd.concat([clots, hidden]).to_csv(path, index=False)
    boxes = read_clot_boxes(path, items, store)
    assert (
        len(boxes) == int(labels[IMAGE_LABEL].sum()) == len(clots)
    )  # one box per positive slice, the hidden row left out
    series, index = clots[SERIES].iloc[0], int(clots["slice_index"].iloc[0])
    assert boxes[(series, index)].tolist() == [list(store.defect_box(series, index))]
    dataset = SliceDataset(store, items, mode="pe", image_size=32, clot_boxes=boxes)
    image, _, _, placed = dataset[int(np.flatnonzero(dataset.positive)[0])]
    # The map marks the defect: its pixels are the dark ones inside the bright artery.
    assert placed.shape == (1, 32, 32) and 0 < int((placed >= 128).sum()) <= 36
    assert float(image[0][placed[0] >= 128].float().mean()) < 120 < float(image[0].float().max())
    assert len(SliceDataset(store, items, mode="pe", image_size=32)[0]) == 3  # no boxes, no fourth item


def test_clot_boxes_that_do_not_fit_the_training_data_are_refused(fake, tmp_path):
    _, store, items = fake
    clots = store.clots_frame()
    path = tmp_path / "clots.csv"
    clots.assign(SeriesInstanceUID="another.series").to_csv(path, index=False)
    with pytest.raises(TrainError, match="name a slice the labels do not have.*another.series"):
        read_clot_boxes(path, items, store)
    clots.assign(row_max=40).to_csv(path, index=False)  # the slices are 32 px: a store prepared smaller
    with pytest.raises(TrainError, match="reach past their slice.*--image-size"):
        read_clot_boxes(path, items, store)
    with pytest.raises(TrainError, match="--clots: clots file not found: .*clots.csv.missing"):
        read_clot_boxes(tmp_path / "clots.csv.missing", items, store)


def test_a_recipe_that_learns_the_boxes_needs_them(fake, tmp_path):
    labels, store, _ = fake
    config = tiny_config("cnn.loss.clot_map_weight=1.0")
    with pytest.raises(TrainError, match="clot_map_weight is set: give .* --clots"):
        training_inputs(config, store=store, labels=labels, out=tmp_path / "model")


MAP_RECIPE = (
    "cnn.backbone.name=pedetect_small_cnn",
    "cnn.backbone.kwargs={widths: [8, 16]}",
    "cnn.input.mode=pe",
    "cnn.epochs=2",
    "cnn.sampling.mode=balanced",
    "cnn.sampling.samples_per_epoch=512",
)


def defect_position_auc(out, store: FakeStore, labels: pd.DataFrame) -> float:
    """On fold 0's positive validation slices, the AUC of the activation map's positions as a
    classifier of the positions on the defect's box (as the loss marks them) against the rest."""
    from pedetect.data.folds import read_folds
    from pedetect.metric.evaluate import roc_auc
    from pedetect.models.slice_classifier import embed_volume, load_slice_classifier
    from pedetect.recipe import load_experiment

    config = load_experiment(out / "config.yaml")
    model = load_slice_classifier(out, 0)
    folds = read_folds(out / "folds.csv")
    validation = labels[labels["StudyInstanceUID"].isin(folds.loc[folds["fold"] == 0, "StudyInstanceUID"])]
    scores, targets = [], []
    for series in validation[SERIES].unique():
        maps = embed_volume(model, store.read_series(series), config.cnn.input, maps=True)[2]
        for index, activation in enumerate(maps):
            box = store.defect_box(series, index)
            if box is not None:
                pooled = torch.nn.functional.adaptive_max_pool2d(
                    clot_map((store.size, store.size), np.array([box])).float(), activation.shape
                )
                targets.append((pooled[0] >= 128).numpy().ravel())
                scores.append(activation.ravel())
    return roc_auc(np.concatenate(targets).astype(float), np.concatenate(scores))


@pytest.mark.slow
def test_the_map_learns_where_the_defects_are(tmp_path):
    from pedetect.train.pipeline import train

    labels = fake_labels(18, slices=10, seed=11)
    store = FakeStore(labels, size=32)
    path = tmp_path / "clots.csv"
    store.clots_frame().to_csv(path, index=False)
    shares = {}
    for name, weight in (("labels", 0.0), ("boxes", 1.0)):
        out = tmp_path / name
        config = tiny_config(*MAP_RECIPE, f"cnn.loss.clot_map_weight={weight}")
        train(config, stage="cnn", fold=0, store=store, labels=labels, out=out, clots=path if weight else None)
        shares[name] = defect_position_auc(out, store, labels)
    print(f"AUC of the map's positions for the defect: {shares}")
    assert shares["boxes"] >= 0.9
    assert shares["boxes"] >= shares["labels"] + 0.1
