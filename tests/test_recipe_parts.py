"""The winners' parts that the RSNA recipes switch on, each on numbers worked out by hand:
GeM pooling, grid dropout, per-study sampling, the metric-weighted exam loss, LR steps counted in
optimiser steps, and the new sequence heads (a series alone gives what it gives in a padded batch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pedetect.config import ConfigError
from pedetect.data.augment import SliceAugment, grid_boxes
from pedetect.data.sampler import EpochSampler
from pedetect.labels import EXAM_WEIGHTS
from pedetect.models.sequence import SequenceHead
from pedetect.models.slice_classifier import GeM
from pedetect.recipe import AugmentConfig, CnnConfig, ExperimentConfig, SchedulerConfig, apply_overrides
from pedetect.train.module import LrSchedule, slice_loss


def test_gem_between_average_and_max():
    x = torch.rand(2, 5, 4, 4) + 0.1
    gem = GeM()
    with torch.no_grad():
        gem.p.fill_(1.0)
        assert torch.allclose(gem(x)[..., 0, 0], x.mean(dim=(2, 3)), atol=1e-6)
        gem.p.fill_(3.0)
        expected = (x**3).mean(dim=(2, 3)) ** (1 / 3)
        assert torch.allclose(gem(x)[..., 0, 0], expected, atol=1e-6)
        gem.p.fill_(60.0)
        assert torch.allclose(gem(x)[..., 0, 0], x.amax(dim=(2, 3)), rtol=0.05)


def test_grid_dropout_drops_a_quarter_with_ratio_half():
    boxes = grid_boxes(64, 16, 8, (0, 0))
    assert len(boxes) == 16 and boxes[0] == (0, 0, 8, 8) and boxes[-1] == (48, 48, 56, 56)
    config = AugmentConfig(grid_dropout={"p": 1.0, "ratio": 0.5, "unit_min": 0.125, "unit_max": 0.25})
    augment = SliceAugment(128, config)
    rng = np.random.default_rng(0)
    image = torch.full((3, 128, 128), 200, dtype=torch.uint8)
    dropped = [float((augment(image, rng)[0] == 0).float().mean()) for _ in range(20)]
    assert 0.18 < np.mean(dropped) < 0.32  # (ratio)² = 0.25 of each unit, less where the grid is cut by the edge


def test_one_of_never_applies_both_and_probabilities_must_fit():
    config = AugmentConfig(
        dropout_one_of=True,
        cutout={"p": 0.5, "holes": 1, "size": 0.9, "fixed_size": True},
        grid_dropout={"p": 0.5, "ratio": 0.5, "unit_min": 0.25, "unit_max": 0.25},
    )
    augment = SliceAugment(32, config)
    rng = np.random.default_rng(1)
    image = torch.full((1, 32, 32), 9, dtype=torch.uint8)
    zero_fractions = [float((augment(image, rng) == 0).float().mean()) for _ in range(200)]
    cut = sum(abs(f - (29 / 32) ** 2) < 1e-6 for f in zero_fractions)  # one fixed 29 px hole
    grid = sum(abs(f - 0.25) < 1e-6 for f in zero_fractions)  # 8 px units, 4 px holes: a quarter
    assert cut + grid == 200 and 70 < cut < 130  # always exactly one of the two, about half each
    with pytest.raises(ConfigError, match="more than 1"):
        apply_overrides(
            ExperimentConfig(),
            ["cnn.augment.dropout_one_of=true", "cnn.augment.cutout.p=0.7", "cnn.augment.grid_dropout.p=0.5"],
        )


def test_per_study_sampling_two_slices_per_study_plus_capped_positives():
    studies = np.repeat(np.arange(40), 30)
    positive = np.zeros(len(studies), dtype=bool)
    for s in range(0, 40, 2):
        positive[s * 30 + 5 : s * 30 + 25] = True  # 20 positive slices in every other study
    sampler = EpochSampler(
        positive, mode="per_study", positive_share=0.25, studies=studies, study_slices=2, study_positives=8, seed=3
    )
    order = sampler.epoch_order(0)
    assert len(order) == len(sampler) == len(sampler.epoch_order(5))
    per_study = np.bincount(studies[order], minlength=40)
    assert per_study.min() >= 2 and np.bincount(studies[order][positive[order]], minlength=40).max() <= 8 + 2
    negatives_in_base = 80 - positive[order].sum()  # at most: the base draw holds 80 slices
    assert positive[order].sum() >= 0.25 * negatives_in_base * 0.9
    assert not np.array_equal(order, sampler.epoch_order(1))


def test_metric_weighted_exam_loss_and_slice_weight():
    cnn = CnnConfig(
        targets={"exam_labels": ["central_pe", "rv_lv_ratio_gte_1"], "exam_label_weights": "metric"},
        loss={"slice_weight": 2.5},
    )
    logits = torch.zeros(3, 3)  # p = 0.5 everywhere: every BCE is log 2
    nan = float("nan")
    # Two positive slices with both exam targets, a negative slice without (NaN: not trained).
    targets = torch.tensor([[1, 1, 0], [1, 0, 1], [0, nan, nan]], dtype=torch.float32)
    expected = (
        2.5 * math.log(2) + (2 * (EXAM_WEIGHTS["central_pe"] + EXAM_WEIGHTS["rv_lv_ratio_gte_1"]) * math.log(2)) / 2
    )
    assert float(slice_loss(cnn, logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_step_decay_every_500_optimiser_steps():
    schedule = LrSchedule(
        SchedulerConfig(name="step", step_steps=500, gamma=0.99), total_steps=5000, steps_per_epoch=300
    )
    assert [schedule(s) for s in (0, 499, 500, 1000, 1499)] == pytest.approx([1, 1, 0.99, 0.9801, 0.9801])


@pytest.mark.parametrize(
    "settings",
    [
        dict(encoder="double_lstm", layers=3, hidden=16, exam_pool="attention", head_hidden=8, dropout=0.5),
        dict(
            encoder="transformer",
            hidden=32,
            heads=8,
            layers=2,
            feedforward=16,
            position="none",
            exam_pool="mean_max",
            dropout=0.0,
        ),
        dict(
            encoder="gru",
            hidden=16,
            layers=1,
            neighbour_diffs=True,
            attention="tanh",
            fixed_length=12,
            resize="longer",
            use_cnn_logit=False,
            dropout=0.0,
        ),
    ],
    ids=["4th double_lstm", "5th transformer", "1st gru resize longer"],
)
def test_new_heads_give_a_series_alone_what_they_give_it_in_a_batch(settings):
    torch.manual_seed(0)
    head = SequenceHead(10, **settings).eval()
    x, cnn = torch.randn(3, 20, 10), torch.randn(3, 20)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for b, n in enumerate((20, 8, 15)):  # shorter and longer than fixed_length 12
        mask[b, :n] = True
    with torch.no_grad():
        slices, exams = head(x, mask, cnn)
        assert slices.shape == (3, 20) and exams.shape == (3, 9) and float(slices[1, 8:].abs().sum()) == 0
        for b, n in enumerate((20, 8, 15)):
            alone_slices, alone_exams = head(x[b : b + 1, :n], None, cnn[b : b + 1, :n])
            assert torch.allclose(slices[b, :n], alone_slices[0], atol=1e-5) and torch.allclose(
                exams[b], alone_exams[0], atol=1e-5
            )


def test_double_lstm_exports_exactly_and_resize_longer_is_refused(tmp_path):
    """predict's ONNX runtime (pedetect export): the 4th place's head exports exactly; the 1st place's
    resize-only-long-series is a branch on the length that a traced graph cannot keep."""
    import onnxruntime

    from pedetect.models.onnx import export_sequence_head

    torch.manual_seed(0)
    head = SequenceHead(10, encoder="double_lstm", hidden=8, layers=2, exam_pool="attention", head_hidden=8).eval()
    export_sequence_head(head, tmp_path / "head.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "head.onnx"))
    embeddings, logits = (
        np.random.default_rng(0).normal(size=(1, 30, 10)).astype(np.float32),
        np.zeros((1, 30), np.float32),
    )
    got = session.run(None, {"embeddings": embeddings, "cnn_logits": logits})
    with torch.no_grad():
        want = head(torch.from_numpy(embeddings), None, torch.from_numpy(logits))
    assert not head.training  # the export leaves the head as it found it (a fresh wrapper once put it in training mode)
    assert [float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)] == pytest.approx([0, 0], abs=1e-5)
    with pytest.raises(ValueError, match="not exportable"):
        export_sequence_head(
            SequenceHead(10, encoder="gru", hidden=8, layers=1, fixed_length=12, resize="longer"), tmp_path / "x.onnx"
        )
