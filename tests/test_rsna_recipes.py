"""Each RSNA recipe end to end on a few small synthetic studies: cnn → embed → seq → predict → a
consistent submission, and the models built are the recipe's (backbone, head layers, stage-2 layers).

Only sizes and lengths are overridden (``--set``): image size, epochs, folds, batch and worker counts,
and random backbone weights (``cnn.backbone.weights=null``: tests never download). Everything else —
heads, pooling, augmentation, sampling, losses, schedules, the lung crop, stage-2 encoders — is the
recipe's own.
"""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
from torch import nn

from helpers.processes import ROOT, pedetect_command, run_pedetect
from pedetect.labels import EXAM_LABELS, SERIES
from pedetect.models.sequence import load_sequence_head
from pedetect.models.slice_classifier import GeM, load_slice_classifier
from pedetect.recipe import load_experiment

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

SIZE = 64  # pixels of the synthetic slices and of the CNN input
SHRINK = [
    "cnn.backbone.weights=null",
    f"cnn.input.image_size={SIZE}",
    "cnn.epochs=1",
    "cnn.batch_size=16",
    "data.folds=2",
    "data.num_workers=0",
    "embed.num_workers=0",
    "embed.batch_size=32",
    "seq.epochs=2",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    common = ["--slices", 14, "--size", SIZE, "--positive-fraction", "0.6", "--no-progress"]
    run_pedetect("synth", root / "synth", "--studies", 6, "--seed", 21, *common)
    run_pedetect("synth", root / "test", "--studies", 2, "--seed", 22, "--split", "test", *common)
    run_pedetect("prepare", root / "synth" / "train", "--out", root / "store", "--workers", 1)
    return root


def _train_and_predict(data, recipe: str, tmp_path, *extra: str, train_options: tuple = ()):
    out = tmp_path / "model"
    overrides = [arg for item in (*SHRINK, *extra) for arg in ("--set", item)]
    run_pedetect(
        "train",
        ROOT / "configs" / recipe,
        "--store",
        data / "store",
        "--labels",
        data / "synth" / "train.csv",
        "--out",
        out,
        *train_options,
        *overrides,
    )
    submission = tmp_path / "submission.csv"
    run_pedetect(
        "predict",
        data / "test" / "test",
        "--model",
        out,
        "--out",
        submission,
        "--sample",
        data / "test" / "sample_submission.csv",
        "--device",
        "cpu",
    )
    sample = pd.read_csv(data / "test" / "sample_submission.csv")
    rows = pd.read_csv(submission)
    assert list(rows["id"]) == list(sample["id"]) and rows["label"].between(0, 1).all()
    check = subprocess.run(
        pedetect_command("check", submission, "--studies", data / "test" / "test.csv"),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert check.returncode == 0, check.stdout + check.stderr  # the label rules hold
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["folds"] == [0, 1] and bundle["starting_weights"]["weights"] == "random"
    return out, load_slice_classifier(out, 0), load_sequence_head(out, 0)


def _drop_path_rates(model: nn.Module) -> list[float]:
    return [float(m.drop_prob) for m in model.modules() if type(m).__name__ == "DropPath"]


def test_4th_place_recipe(data, tmp_path):
    out, cnn, head = _train_and_predict(data, "rsna_4th_rexnet200.yaml", tmp_path)
    assert type(cnn.backbone).__name__ == "RexNet" and cnn.feature_dim == 2560
    # GeM → dropout 0.5 → 256 → BatchNorm → ReLU → 1
    assert isinstance(cnn.gem, GeM) and cnn.dropout.p == 0.5
    linear, norm, relu = cnn.hidden
    assert (linear.in_features, linear.out_features, type(norm), type(relu)) == (2560, 256, nn.BatchNorm1d, nn.ReLU)
    assert (cnn.head.in_features, cnn.head.out_features) == (256, 1)
    # Two stacked 3-layer BiLSTM-128, the second on the first's outputs; attention per LSTM; 256-unit outputs.
    for lstm, width in ((head.encoder, 2560 + 1), (head.encoder2, 256)):
        assert (type(lstm), lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional) == (
            nn.LSTM,
            width,
            128,
            3,
            True,
        )
    assert head.attention.out_features == head.attention2.out_features == 1 and head.exam_pool == "attention"
    assert head.slice_head[0].out_features == 256 and head.exam_head[0].in_features == 256
    assert head.exam_head[-1].out_features == len(EXAM_LABELS)


FIFTH = ["cnn.batch_size=40"]  # the recipe's own batch: per-study sampling draws few slices here


@pytest.fixture(scope="module")
def fifth(data, tmp_path_factory):
    """The 5th-place recipe trained once: its test and the ensemble test below share it."""
    return _train_and_predict(data, "rsna_5th_effnetb5.yaml", tmp_path_factory.mktemp("fifth"), *FIFTH)


def test_5th_place_recipe(fifth):
    out, cnn, head = fifth
    assert type(cnn.backbone).__name__ == "EfficientNet" and cnn.feature_dim == 2048
    assert max(_drop_path_rates(cnn.backbone)) == pytest.approx(0.4, abs=0.02)
    config = load_experiment(out / "config.yaml")
    assert isinstance(cnn.dropout, nn.Identity) and isinstance(cnn.hidden, nn.Identity)
    assert cnn.head.out_features == 1 + len(config.cnn.targets.exam_labels) == 9
    assert (type(head.encoder), head.encoder.hidden_size, head.encoder.num_layers) == (nn.LSTM, 512, 2)
    assert head.exam_pool == "mean_max" and head.exam_head.in_features == 2 * 1024
    assert config.cnn.sampling.mode == "per_study" and config.cnn.loss.slice_weight == 2.5


def test_5th_place_transformer_variant_on_the_same_cnns(data, fifth, tmp_path):
    """The ensemble's other members: the same CNNs, a transformer head trained into a copy."""
    import shutil

    out = fifth[0]
    copy = tmp_path / "tf1"
    shutil.copytree(out, copy)
    transformer = [
        "seq.encoder=transformer",
        "seq.hidden=2048",
        "seq.layers=1",
        "seq.heads=8",
        "seq.feedforward=2048",
        "seq.position=none",
    ]
    # The same stage-1 settings as the model copied (else train refuses the folder), then stage 2's.
    overrides = [arg for item in (*SHRINK, *FIFTH, *transformer) for arg in ("--set", item)]
    result = run_pedetect(
        "train",
        ROOT / "configs" / "rsna_5th_effnetb5.yaml",
        "--store",
        data / "store",
        "--labels",
        data / "synth" / "train.csv",
        "--out",
        copy,
        "--stage",
        "seq",
        *overrides,
    )
    said = result.stdout + result.stderr
    assert "removing the previous sequence heads" in said and "embed fold" not in said  # stage 2 alone retrained
    head = load_sequence_head(copy, 0)
    layer = head.encoder.layers[0]
    assert (
        len(head.encoder.layers) == 1 and layer.linear1.out_features == 2048 and isinstance(head.position, nn.Identity)
    )
    assert layer.self_attn.num_heads == 8 and layer.self_attn.embed_dim == 2048
    submission = tmp_path / "ensemble.csv"
    run_pedetect(
        "predict", data / "test" / "test", "--model", out, "--model", copy, "--out", submission, "--device", "cpu"
    )
    assert len(pd.read_csv(submission)) == len(pd.read_csv(data / "test" / "sample_submission.csv"))


def test_1st_place_recipe(data, tmp_path):
    out, cnn, head = _train_and_predict(data, "rsna_1st_seresnext50.yaml", tmp_path, "cnn.batch_size=8")
    assert type(cnn.backbone).__name__ == "SENet" and cnn.feature_dim == 2048
    assert cnn.backbone.layer0.conv1.in_channels == 3  # slices z-1, z, z+1 in the PE window
    assert (cnn.head.in_features, cnn.head.out_features) == (2048, 1)
    # BiGRU-512 over [f, f - prev, f - next]; tanh attention; only series longer than 192 resized.
    assert (type(head.encoder), head.encoder.input_size, head.encoder.hidden_size, head.encoder.num_layers) == (
        nn.GRU,
        3 * 2048,
        512,
        1,
    )
    assert (head.attention_kind, head.fixed_length, head.resize, head.exam_pool) == (
        "tanh",
        192,
        "longer",
        "attention_max",
    )
    # The lung boxes of every training series, recorded in the bundle, each a crop of the slice.
    boxes = json.loads((out / "lung_boxes.json").read_text())
    store_series = set(pd.read_parquet(data / "store" / "slices.parquet")[SERIES])
    assert set(boxes["boxes"]) == store_series and boxes["settings"]["margin"] == 0.05
    assert all((y1 - y0) * (x1 - x0) < 0.9 for y0, x0, y1, x1 in boxes["boxes"].values())
    seq_metrics = json.loads((out / "seq" / "fold0" / "metrics.json").read_text())
    assert seq_metrics["exported_epoch"] == 1  # the last of seq.epochs=2 (export: last)


def test_realistic_recipe(data, tmp_path):
    # The demo's CNN with the dense loss on its activation map: it needs the training emboli's boxes.
    refused = subprocess.run(
        pedetect_command(
            "train",
            ROOT / "configs" / "realistic.yaml",
            "--store",
            data / "store",
            "--labels",
            data / "synth" / "train.csv",
            "--out",
            tmp_path / "refused",
            *[a for s in SHRINK for a in ("--set", s)],
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        refused.returncode != 0
        and "clot_map_weight is set: give the training emboli's boxes with --clots" in refused.stderr
    )
    clots = data / "synth" / "clots.csv"
    assert (pd.read_csv(clots)["visible"] == 1).any()  # boxes to learn from
    # Without the heart model: these 6 studies hold too few positive exams to learn RV/LV from.
    out, cnn, _ = _train_and_predict(data, "realistic.yaml", tmp_path, "heart=null", train_options=("--clots", clots))
    assert type(cnn.backbone).__name__ == "SmallSliceCNN" and cnn.feature_dim == 64
    assert load_experiment(out / "config.yaml").cnn.loss.clot_map_weight == 1.0
