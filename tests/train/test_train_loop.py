"""The stage-1 training loop on a small in-memory store: outputs, resume, skip/force, errors."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.train import FakeStore, fake_labels, fold_slice_auc, tiny_config
from pedetect.data.dataset import StoreError, training_targets
from pedetect.data.folds import FoldsError
from pedetect.labels import IMAGE_LABEL
from pedetect.models.layout import COMPLETE
from pedetect.models.slice_classifier import load_slice_classifier
from pedetect.recipe import CnnConfig, SchedulerConfig, load_experiment
from pedetect.train.module import LrSchedule, focal_loss, slice_loss
from pedetect.train.pipeline import train
from pedetect.train.setup import TrainError

pytestmark = [
    pytest.mark.xdist_group("train"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]


@pytest.fixture(scope="module")
def data():
    labels = fake_labels(9, slices=10, seed=1)
    return labels, FakeStore(labels, size=32)


class Crash(L.Callback):
    """Stands in for a kill: fails when the given epoch starts (after the previous one's checkpoint)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated kill")


def test_focal_loss_matches_bce_without_focusing():
    logits, targets = torch.randn(20), (torch.rand(20) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(focal_loss(logits, targets, gamma=0.0, alpha=None), bce)
    assert (focal_loss(logits, targets, gamma=2.0, alpha=None) <= bce + 1e-7).all()


def test_exam_labels_count_on_positive_slices_and_whole_exam_labels_on_positive_exams():
    cnn = CnnConfig.model_validate(
        {"targets": {"exam_labels": ["central_pe"], "whole_exam_labels": ["rv_lv_ratio_gte_1"]}}
    )
    assert cnn.targets.head_labels == ("central_pe", "rv_lv_ratio_gte_1")
    items = pd.DataFrame(
        {
            IMAGE_LABEL: [1, 0, 0],
            "central_pe": [1, 1, 0],
            "rv_lv_ratio_gte_1": [1, 1, 0],
            "negative_exam_for_pe": [0, 0, 1],
            "indeterminate": [0, 0, 0],
        }
    )  # a positive slice and a negative slice of a positive exam, a slice of a negative exam
    targets = torch.from_numpy(training_targets(items, ("central_pe",), ("rv_lv_ratio_gte_1",)))
    assert torch.equal(
        torch.isnan(targets), torch.tensor([[False, False, False], [False, True, False], [False, True, True]])
    )
    logits = torch.tensor([[5.0, 5.0, 5.0], [-5.0, 5.0, -5.0], [-5.0, 5.0, 5.0]])
    # Untrained entries add nothing whatever their logits: the middle slice's rv_lv logit is wrong.
    bce = torch.nn.functional.softplus(torch.tensor(-5.0))
    wrong = torch.nn.functional.softplus(torch.tensor(5.0))
    expected = bce + (bce + bce + wrong) / 3  # slice term (all right) + mean of the three trained exam entries
    assert torch.isclose(slice_loss(cnn, logits, targets), expected)
    # A batch with nothing trained: the slice term alone, with gradients defined.
    none = targets.clone()
    none[:, 1:] = float("nan")
    logits.requires_grad_(True)
    loss = slice_loss(cnn, logits, none)
    loss.backward()
    assert torch.isclose(loss, bce) and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="in both exam_labels and whole_exam_labels"):
        CnnConfig.model_validate({"targets": {"exam_labels": ["central_pe"], "whole_exam_labels": ["central_pe"]}})


@pytest.mark.parametrize("name", ["cosine", "linear", "step", "constant"])
def test_lr_schedule_warms_up_then_decays(name):
    schedule = LrSchedule(
        SchedulerConfig(name=name, warmup_epochs=1, min_lr_ratio=0.1, step_epochs=1, gamma=0.5), 40, 10
    )
    factors = [schedule(step) for step in range(40)]
    assert factors[0] < factors[5] < factors[9] <= 1.0  # warm-up over the first epoch
    assert max(factors) <= 1.0
    if name == "constant":
        assert factors[-1] == 1.0
    else:
        assert factors[-1] < 0.6


def test_train_writes_the_fold_bundle(data, tmp_path):
    labels, store = data
    cfg = tiny_config(
        "cnn.epochs=2",
        "cnn.keep_checkpoints=true",
        "cnn.targets.exam_labels=[rightsided_pe]",
        "cnn.sampling.mode=balanced",
    )
    summary = train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=1)["cnn"]
    fold = tmp_path / "cnn" / "fold1"
    for name in (
        "model.safetensors",
        "metrics.json",
        "metrics.csv",
        "curves.png",
        COMPLETE,
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (fold / name).is_file(), name
    assert load_experiment(tmp_path / "config.yaml") == cfg
    folds = pd.read_csv(tmp_path / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1, 2] and len(folds) == 9
    metrics = json.loads((fold / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    # The recorded AUC is the exported model's on the fold's 3 validation studies (30 slices, 9
    # positive), computed afresh; a near-tie falling the other way in other batches would move it 1/189.
    assert metrics["val_auc"] == pytest.approx(fold_slice_auc(tmp_path, 1, store, labels), abs=0.006)
    assert metrics["val_loss"] > 0
    assert metrics["val_studies"] == 3 and metrics["train_studies"] == 6
    assert summary["folds_complete"] == [1]
    model = load_slice_classifier(tmp_path, 1)
    embedding, logit = model.embed(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert embedding.shape == (2, model.embedding_dim) and logit.shape == (2,)
    assert model.head.out_features == 2  # slice label + rightsided_pe


def test_the_weight_average_is_validated_and_exported(data, tmp_path):
    labels, store = data
    cfg = tiny_config("cnn.epochs=2", "cnn.keep_checkpoints=true", "cnn.ema_decay=0.9", "cnn.export=last")
    train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0)
    state = torch.load(tmp_path / "cnn" / "fold0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = load_slice_classifier(tmp_path, 0).state_dict()
    average = {k[len("ema.module.") :]: v for k, v in state.items() if k.startswith("ema.module.")}
    trained = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    # One update per optimiser step: 60 training slices in batches of 16 (the last one dropped), two epochs.
    assert set(average) == set(trained) and state["ema.n_averaged"] == 2 * 3
    weight = "head.weight"
    assert torch.equal(exported[weight], average[weight]) and not torch.equal(exported[weight], trained[weight])
    # BatchNorm statistics are averaged too (they are what the exported model normalises with).
    stats = [k for k in average if k.endswith("running_mean")]
    assert stats and all(torch.equal(exported[k], average[k]) for k in stats)
    assert not all(torch.equal(trained[k], average[k]) for k in stats)


class CountValidations(L.Callback):
    def __init__(self):
        self.epochs: list[int] = []

    def on_validation_epoch_end(self, trainer, module):
        self.epochs.append(int(trainer.current_epoch))


def test_validating_only_the_last_epoch_still_checkpoints_every_epoch(data, tmp_path):
    labels, store = data
    cfg = tiny_config("cnn.epochs=3", "cnn.validation=last_epoch", "cnn.keep_checkpoints=true")
    first = CountValidations()
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0, callbacks=[Crash(2), first])
    fold = tmp_path / "cnn" / "fold0"
    assert first.epochs == []  # two epochs trained, none validated
    saved = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and [h["epoch"] for h in saved["pedetect_history"]] == [0, 1]

    second = CountValidations()
    train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0, callbacks=[second])
    assert second.epochs == [2]
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["resumed_after_epoch"] == 1 and metrics["exported_epoch"] == 2
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert [e["val_auc"] is None for e in epochs] == [True, True, False]  # NaN is written as null
    assert all(e["train_loss"] > 0 and e["train_seconds"] > 0 for e in epochs)
    assert metrics["val_auc"] == pytest.approx(fold_slice_auc(tmp_path, 0, store, labels), abs=0.006)


def test_resume_after_a_kill_and_skip_when_complete(data, tmp_path):
    labels, store = data
    cfg = tiny_config("cnn.epochs=3", "cnn.ema_decay=0.9")  # the weight average is part of what resumes
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0, callbacks=[Crash(2)])
    fold = tmp_path / "cnn" / "fold0"
    assert (fold / "checkpoints" / "last.ckpt").is_file() and not (fold / COMPLETE).exists()
    saved = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)  # our checkpoints are weights-only
    assert saved["epoch"] == 1

    train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0)
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["resumed_after_epoch"] == 1
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]  # the history survived the kill
    assert not (fold / "checkpoints").exists()  # pickles do not stay in the bundle
    stamp = (fold / "model.safetensors").stat().st_mtime_ns

    train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0)  # complete: skipped
    assert (fold / "model.safetensors").stat().st_mtime_ns == stamp
    train(cfg, stage="cnn", store=store, labels=labels, out=tmp_path, fold=0, force=True)  # --force: redone
    assert (fold / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((fold / "metrics.json").read_text())["resumed_after_epoch"] is None


def test_a_changed_config_needs_force(data, tmp_path):
    labels, store = data
    train(tiny_config("cnn.epochs=1"), stage="cnn", store=store, labels=labels, out=tmp_path, fold=2)
    with pytest.raises(TrainError, match=r"another config \(differs in cnn.epochs\)"):
        train(tiny_config("cnn.epochs=2"), stage="cnn", store=store, labels=labels, out=tmp_path, fold=2)
    # runtime and logging may change between runs (e.g. more devices on resume)
    train(
        tiny_config("cnn.epochs=1", "logging.log_every_n_steps=5"),
        stage="cnn",
        store=store,
        labels=labels,
        out=tmp_path,
        fold=2,
    )


def test_errors_are_clear(data, tmp_path):
    labels, store = data
    with pytest.raises(FoldsError, match="fold 3 is out of range: there are 3 folds"):
        train(tiny_config(), stage="cnn", store=store, labels=labels, out=tmp_path / "a", fold=3)
    extra = fake_labels(1, slices=4, seed=9, prefix="other")
    with pytest.raises(StoreError, match="the store lacks 4 of 94 slices"):
        train(tiny_config(), stage="cnn", store=store, labels=pd.concat([labels, extra]), out=tmp_path / "b", fold=0)
    with pytest.raises(Exception, match="unknown timm backbone 'resnet10x'"):
        train(
            tiny_config("cnn.backbone.name=resnet10x"),
            stage="cnn",
            store=store,
            labels=labels,
            out=tmp_path / "c",
            fold=0,
        )
    with pytest.raises(Exception, match="pretrained weights file not found"):
        train(
            tiny_config("cnn.backbone.weights=nowhere/w.safetensors"),
            stage="cnn",
            store=store,
            labels=labels,
            out=tmp_path / "d",
            fold=0,
        )


def test_missing_logger_package_is_a_clear_error(data, tmp_path, monkeypatch):
    import importlib.util

    labels, store = data
    real_find_spec = importlib.util.find_spec
    # Runs whether or not mlflow is installed here: the package is hidden from the lookup.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a)
    )
    with pytest.raises(TrainError, match="logging.mlflow is configured but the 'mlflow' package is not installed"):
        train(tiny_config("logging.mlflow={}"), stage="cnn", store=store, labels=labels, out=tmp_path, fold=0)


def test_given_folds_file_is_recorded(data, tmp_path):
    labels, store = data
    studies = labels["StudyInstanceUID"].unique()
    given = pd.DataFrame({"StudyInstanceUID": studies, "fold": np.arange(len(studies)) % 2})
    given.to_csv(tmp_path / "given.csv", index=False)
    summary = train(
        tiny_config("cnn.epochs=1"),
        stage="cnn",
        store=store,
        labels=labels,
        out=tmp_path / "m",
        folds=tmp_path / "given.csv",
        fold=1,
    )["cnn"]
    recorded = pd.read_csv(tmp_path / "m" / "folds.csv").sort_values("StudyInstanceUID").reset_index(drop=True)
    assert recorded.equals(given.sort_values("StudyInstanceUID").reset_index(drop=True))
    assert summary["n_folds"] == 2
