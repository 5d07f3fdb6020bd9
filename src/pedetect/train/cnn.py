"""Stage 1 runner: train the slice CNN on each cross-validation fold.

``pedetect.train.pipeline.train(config, stage="cnn", store=..., labels=..., out=MODEL_DIR)`` writes::

    MODEL_DIR/config.yaml               the resolved config (every default written out)
    MODEL_DIR/folds.csv                 StudyInstanceUID,fold (given with --folds, or made here)
    MODEL_DIR/cnn/summary.json          per-fold and mean validation AUC and log loss
    MODEL_DIR/cnn/fold<k>/model.safetensors   weights of the exported epoch (best or last)
    MODEL_DIR/cnn/fold<k>/metrics.json  val slice AUC, log loss, exported epoch, per-epoch history
    MODEL_DIR/cnn/fold<k>/metrics.csv   the per-epoch history as a table
    MODEL_DIR/cnn/fold<k>/curves.png    loss and AUC per epoch
    MODEL_DIR/cnn/fold<k>/logs/         Lightning CSV logs (and TensorBoard, W&B, MLflow if configured)
    MODEL_DIR/cnn/fold<k>/COMPLETE      written last: a re-run skips this fold (--force redoes it)

While a fold trains, ``fold<k>/checkpoints/{last,best}.ckpt`` are kept (written atomically); a
killed run resumes from ``last.ckpt``, loaded weights-only. They are deleted when the fold completes
unless ``cnn.keep_checkpoints`` (the bundle never needs pickles).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pedetect.data.folds import (
    FOLD,
    attach_folds,
    check_fold_index,
    fold_summary,
    make_folds,
    n_folds_of,
    read_folds,
    read_labels,
)
from pedetect.io import atomic_path, write_csv_atomic
from pedetect.models.slice_classifier import WEIGHTS_FILE, fold_dir
from pedetect.train.config import ConfigError, ExperimentConfig, config_to_yaml, load_experiment, save_config

COMPLETE = "COMPLETE"
FOLDS_FILE = "folds.csv"
CONFIG_FILE = "config.yaml"
# Sections whose change means a different model; runtime and logging may change between runs.
# A change in MODEL_SECTIONS invalidates every stage (stage 1 and all built on it); a change in
# SEQ_SECTIONS only the sequence heads (stage 2 is redone, stage 1 and the embeddings are kept).
MODEL_SECTIONS = ("seed", "data", "cnn")
SEQ_SECTIONS = ("seq",)
# Settings of the embedding pass that change what it writes (batch size and workers do not): a change
# redoes the embeddings and stage 2, not the CNNs.
EMBEDDING_KEYS = ("embed.location_grid",)
# What each kind of change removes from MODEL_DIR.
STAGE1_OUTPUTS = ("cnn", "embed", "seq", "prior.json", "bundle.json")
EMBED_OUTPUTS = ("embed", "seq", "bundle.json")
SEQ_OUTPUTS = ("seq", "bundle.json")


class TrainError(RuntimeError):
    """A training request that cannot run as asked; the message says why."""


def is_global_zero() -> bool:
    """True in the process that writes shared files (before and during distributed runs)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _echo(message: str) -> None:
    if is_global_zero():
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- set-up


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(a: ExperimentConfig, b: ExperimentConfig, sections: Sequence[str] = MODEL_SECTIONS) -> list[str]:
    """Dotted keys of the given (by default the model-defining) sections where two configs differ."""
    fa, fb = (_flatten({k: c.model_dump(mode="json")[k] for k in sections}) for c in (a, b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def remove_outputs(out: Path, names: Sequence[str]) -> None:
    """Delete the named folders and files of MODEL_DIR (missing ones are fine)."""
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def prepare_model_dir(config: ExperimentConfig, out: Path, *, force: bool, echo: Callable[[str], None]) -> None:
    """Write the resolved config; refuse a folder trained with another stage-1 config unless ``force``.

    A changed ``embed.location_grid`` removes the embeddings and stage 2 (the CNNs stay); a changed
    ``seq`` section alone removes the previous stage-2 results (stage 1 and the embeddings stay).
    """
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            previous = load_experiment(path)
        except ConfigError as error:
            raise TrainError(f"{path} cannot be read ({error}); use another --out") from None
        changed = config_differences(previous, config)
        if changed:
            if not force:
                raise TrainError(
                    f"{out} holds a model trained with another config (differs in {', '.join(changed[:8])}"
                    f"{' …' if len(changed) > 8 else ''}); use another --out, or --force to retrain every fold"
                )
            if is_global_zero():
                echo(f"config changed ({', '.join(changed[:8])}): removing the previous results of every stage")
                remove_outputs(out, STAGE1_OUTPUTS)
        embed_changed = [k for k in config_differences(previous, config, ("embed",)) if k in EMBEDDING_KEYS]
        if embed_changed and is_global_zero():
            echo(f"embedding config changed ({', '.join(embed_changed)}): removing the previous embeddings and sequence heads")
            remove_outputs(out, EMBED_OUTPUTS)
        seq_changed = config_differences(previous, config, SEQ_SECTIONS)
        if seq_changed and is_global_zero():
            echo(f"stage-2 config changed ({', '.join(seq_changed[:8])}): removing the previous sequence heads")
            remove_outputs(out, SEQ_OUTPUTS)
    if is_global_zero():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, path)


def resolve_folds(
    config: ExperimentConfig,
    labels: pd.DataFrame,
    out: Path,
    folds_path: Path | None,
    *,
    force: bool,
    echo: Callable[[str], None],
) -> pd.DataFrame:
    """The folds of this model: ``--folds`` if given, else those already in MODEL_DIR, else new ones.

    They are written to ``MODEL_DIR/folds.csv`` so the bundle records where every study was.
    """
    recorded = out / FOLDS_FILE
    if folds_path is not None:
        folds = read_folds(folds_path)
        if recorded.is_file() and not force and Path(folds_path).resolve() != recorded.resolve():
            previous = read_folds(recorded)
            same = previous.sort_values("StudyInstanceUID").reset_index(drop=True).equals(
                folds.sort_values("StudyInstanceUID").reset_index(drop=True)
            )
            if not same:
                raise TrainError(f"{folds_path} differs from the folds this model was trained on ({recorded}); use --force")
        source = str(folds_path)
    elif recorded.is_file():
        folds = read_folds(recorded)
        source = str(recorded)
    else:
        folds = make_folds(labels, config.data.folds, config.data.fold_seed)
        source = f"{config.data.folds} folds made with seed {config.data.fold_seed}"
        echo(f"folds: {source}\n{fold_summary(labels, folds).to_string()}")
    attach_folds(labels.drop_duplicates("StudyInstanceUID"), folds, source=source)  # every study has a fold
    if is_global_zero() and (not recorded.is_file() or folds_path is not None):
        write_csv_atomic(folds.sort_values([FOLD, "StudyInstanceUID"]), recorded)
    return folds


# --------------------------------------------------------------------------------------- training


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TrainError(f"{what} is configured but the '{module}' package is not installed (pip install {module})")


def build_loggers(config: ExperimentConfig, directory: Path, out: Path, fold: int) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(directory), name="logs")]  # logs/version_<n>: a resumed run keeps the old log
    log = config.logging
    if log.tensorboard:
        from importlib.util import find_spec

        if find_spec("tensorboard") is None and find_spec("tensorboardX") is None:
            raise TrainError("logging.tensorboard is set but neither 'tensorboard' nor 'tensorboardX' is installed")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(directory), name="tensorboard", version=""))
    if log.wandb is not None:
        _require("wandb", "logging.wandb")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=log.wandb.project,
                name=f"{config.name}-cnn-fold{fold}",
                offline=log.wandb.offline,
                save_dir=str(directory),
                config=config.model_dump(mode="json"),
            )
        )
    if log.mlflow is not None:
        _require("mlflow", "logging.mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        uri = log.mlflow.tracking_uri or (out / "mlruns").resolve().as_uri()
        loggers.append(MLFlowLogger(experiment_name=log.mlflow.experiment, run_name=f"{config.name}-cnn-fold{fold}", tracking_uri=uri))
    return loggers


class _DropTips:
    """Drops Lightning's advertising tips from its info log (the rest passes)."""

    def filter(self, record) -> bool:
        return "litlogger" not in str(record.getMessage())


def _quiet_lightning() -> None:
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())


def _uses_gpu(config: ExperimentConfig) -> bool:
    import torch

    accelerator = config.runtime.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(config: ExperimentConfig) -> str:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on other GPUs, 32-true on CPU."""
    import torch

    if config.runtime.precision != "auto":
        return config.runtime.precision
    if _uses_gpu(config):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def safe_checkpoint_io():
    """Lightning checkpoint I/O that writes atomically (a kill never leaves half a last.ckpt) and
    reads weights-only (a checkpoint is a pickle: only tensors and plain containers are accepted)."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class SafeCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            if not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint not found: {path}")
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    return SafeCheckpointIO()


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def make_loaders(config: ExperimentConfig, store: Path, train_items: pd.DataFrame, val_items: pd.DataFrame, seed: int):
    from torch.utils.data import DataLoader

    from pedetect.data.dataset import SliceDataset, single_threaded_opencv
    from pedetect.data.sampler import EpochSampler, ShardSampler

    cnn = config.cnn
    common = dict(
        mode=cnn.input.mode,
        image_size=cnn.input.image_size,
        crop=cnn.input.crop,
        exam_labels=tuple(cnn.targets.exam_labels),
        whole_exam_labels=tuple(cnn.targets.whole_exam_labels),
    )
    train_set = SliceDataset(store, train_items, augment=cnn.augment, **common)
    val_set = SliceDataset(store, val_items, augment=None, **common)
    sampler = EpochSampler(
        train_set.positive,
        mode=cnn.sampling.mode,
        positive_share=cnn.sampling.positive_share,
        samples_per_epoch=cnn.sampling.samples_per_epoch,
        seed=seed,
    )
    workers = config.data.num_workers
    loader_args = dict(num_workers=workers, pin_memory=_uses_gpu(config), persistent_workers=workers > 0)
    if workers > 0:
        loader_args["prefetch_factor"] = 4
        single_threaded_opencv()
    train_loader = DataLoader(
        train_set,
        batch_size=cnn.batch_size,
        sampler=sampler,
        drop_last=len(sampler) > cnn.batch_size,  # never a 1-slice batch for BatchNorm
        **loader_args,
    )
    val_loader = DataLoader(
        val_set, batch_size=config.data.val_batch_size or 2 * cnn.batch_size, sampler=ShardSampler(len(val_set)), **loader_args
    )
    return train_loader, val_loader


def write_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val log loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_auc.plot(epochs, [h["val_auc"] for h in history], "o-", color="tab:green")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation slice AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def export_fold(
    config: ExperimentConfig,
    module,
    directory: Path,
    checkpoint_callback,
    *,
    fold: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write the fold's weights, metrics and curves from the chosen checkpoint."""
    from pedetect.models.slice_classifier import save_weights

    history = module.history
    monitor = config.cnn.monitor
    chosen: dict[str, Any] | None = None
    if config.cnn.export == "best" and checkpoint_callback.best_model_path and Path(checkpoint_callback.best_model_path).is_file():
        state = load_checkpoint_state(Path(checkpoint_callback.best_model_path))
        chosen_epoch = int(state["epoch"])
        prefix = next(name for name, m in module.named_modules() if m is module.evaluated_model) + "."
        weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
        module.evaluated_model.load_state_dict(weights)
    else:
        chosen_epoch = int(history[-1]["epoch"]) if history else -1
    for record in history:
        if record["epoch"] == chosen_epoch:
            chosen = record
    chosen = chosen or (history[-1] if history else {})
    save_weights(module.evaluated_model, directory / WEIGHTS_FILE)

    metrics = {
        "fold": fold,
        "val_auc": _finite(chosen.get("val_auc")),
        "val_loss": _finite(chosen.get("val_loss")),
        "exported_epoch": chosen_epoch,
        "export": config.cnn.export,
        "monitor": monitor,
        "backbone": config.cnn.backbone.name,
        "input": config.cnn.input.mode,
        "image_size": config.cnn.input.image_size,
        "embedding_dim": module.model.embedding_dim,
        **extra,
        "epochs": [{k: _finite(v) for k, v in h.items()} for h in history],
    }
    with atomic_path(directory / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    write_csv_atomic(pd.DataFrame(history), directory / "metrics.csv")
    write_curves(history, directory / "curves.png", f"{config.name} — CNN fold {fold} ({config.cnn.backbone.name})")
    return metrics


def train_fold(
    config: ExperimentConfig,
    items: pd.DataFrame,
    fold: int,
    *,
    store: Path,
    out: Path,
    callbacks: Sequence = (),
    echo: Callable[[str], None] = _echo,
) -> dict[str, Any] | None:
    """Train one fold (resuming from its last.ckpt); returns its metrics on the writing process."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pedetect.models.slice_classifier import build_slice_classifier
    from pedetect.train.module import SliceModule

    _quiet_lightning()
    import warnings

    # Noise from Lightning's own internals, not about this run.
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
    directory = fold_dir(out, fold)
    seed = config.seed + fold
    L.seed_everything(seed, workers=True, verbose=False)
    train_items = items[items[FOLD] != fold].reset_index(drop=True)
    val_items = items[items[FOLD] == fold].reset_index(drop=True)
    if train_items.empty or val_items.empty:
        raise TrainError(f"fold {fold} leaves no {'training' if train_items.empty else 'validation'} slices")
    train_loader, val_loader = make_loaders(config, store, train_items, val_items, seed)
    # Every fold starts from the same weights, as it would from one pretrained file: the folds'
    # embedding spaces stay comparable, which stage 2 needs (it trains on out-of-fold embeddings made
    # by the other folds' CNNs). The data order still differs per fold (seeded above).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_slice_classifier(config.cnn)
    module = SliceModule(model, config.cnn)

    mode = "max" if config.cnn.monitor == "val_auc" else "min"
    checkpoints = directory / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=str(checkpoints),
        filename="best",
        monitor=config.cnn.monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    runtime = config.runtime
    trainer = L.Trainer(
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        strategy=runtime.strategy,
        precision=resolve_precision(config),
        deterministic=runtime.deterministic,
        max_epochs=config.cnn.epochs,
        accumulate_grad_batches=config.cnn.accumulate_grad_batches,
        gradient_clip_val=config.cnn.gradient_clip_norm,
        gradient_clip_algorithm="norm" if config.cnn.gradient_clip_norm else None,
        limit_train_batches=config.cnn.limit_train_batches,
        limit_val_batches=config.cnn.limit_val_batches,
        logger=build_loggers(config, directory, out, fold),
        callbacks=[checkpoint, *callbacks],
        plugins=[safe_checkpoint_io()],
        use_distributed_sampler=False,  # the samplers shard by rank themselves
        num_sanity_val_steps=0,
        enable_progress_bar=config.logging.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(config.logging.log_every_n_steps, len(train_loader))),
        default_root_dir=str(directory),
    )
    last = checkpoints / "last.ckpt"
    resume = last if last.is_file() else None
    resumed_from = int(load_checkpoint_state(last)["epoch"]) if resume else None
    n_pos = int(train_items["pe_present_on_image"].sum())
    echo(
        f"fold {fold}: {len(train_items)} training slices ({n_pos} positive), {len(val_items)} validation slices"
        + (f"; resuming from {last}" if resume else "")
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.interrupted:
        raise TrainError(f"fold {fold} was interrupted; run again to resume from {last}")
    if not trainer.is_global_zero:
        return None
    extra = {
        "train_slices": len(train_items),
        "train_positive": n_pos,
        "val_slices": len(val_items),
        "val_positive": int(val_items["pe_present_on_image"].sum()),
        "train_studies": int(train_items["StudyInstanceUID"].nunique()),
        "val_studies": int(val_items["StudyInstanceUID"].nunique()),
        "resumed_after_epoch": resumed_from,
        "devices": int(trainer.world_size),
        "precision": str(trainer.precision),
    }
    metrics = export_fold(config, module, directory, checkpoint, fold=fold, extra=extra)
    if not config.cnn.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    with atomic_path(directory / COMPLETE) as tmp:
        tmp.write_text(json.dumps({"val_auc": metrics["val_auc"], "val_loss": metrics["val_loss"]}) + "\n")
    auc = metrics["val_auc"]
    echo(f"fold {fold}: validation slice AUC {auc:.4f}, log loss {metrics['val_loss']:.4f}" if auc is not None else f"fold {fold} done")
    return metrics


def write_summary(out: Path, n_folds: int) -> dict[str, Any]:
    folds = {}
    for k in range(n_folds):
        path = fold_dir(out, k) / "metrics.json"
        if (fold_dir(out, k) / COMPLETE).is_file() and path.is_file():
            m = json.loads(path.read_text())
            folds[k] = {"val_auc": m.get("val_auc"), "val_loss": m.get("val_loss"), "exported_epoch": m.get("exported_epoch")}
    aucs = [f["val_auc"] for f in folds.values() if f["val_auc"] is not None]
    losses = [f["val_loss"] for f in folds.values() if f["val_loss"] is not None]
    summary = {
        "folds_complete": sorted(folds),
        "n_folds": n_folds,
        "mean_val_auc": float(np.mean(aucs)) if aucs else None,
        "mean_val_loss": float(np.mean(losses)) if losses else None,
        "folds": {str(k): v for k, v in folds.items()},
    }
    if is_global_zero():
        with atomic_path(out / "cnn" / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary


def resolve_paths(config: ExperimentConfig) -> ExperimentConfig:
    """The config with relative file paths made absolute (as saved in MODEL_DIR/config.yaml)."""
    weights = config.cnn.backbone.weights
    if weights is not None and not weights.is_absolute():
        config = config.model_copy(deep=True)
        config.cnn.backbone.weights = weights.resolve()
    return config


@dataclass
class TrainingInputs:
    """What every stage starts from: the resolved config, the store, labelled slices with their fold."""

    config: ExperimentConfig
    store: Any  # a Path, or a store object (tests)
    source: Any  # the opened store
    out: Path
    labels: pd.DataFrame
    items: pd.DataFrame  # slice_items + fold
    n_folds: int
    todo: list[int]  # the folds asked for


def training_inputs(
    config: ExperimentConfig,
    *,
    store: str | Path | Any,
    labels: str | Path | pd.DataFrame,
    out: str | Path,
    folds: str | Path | None = None,
    fold: int | None = None,
    force: bool = False,
    echo: Callable[[str], None] = _echo,
) -> TrainingInputs:
    """Open the store and labels, check the model folder's config (:func:`prepare_model_dir`) and
    resolve the folds: the common set-up of every stage."""
    from pedetect.data.dataset import open_store, slice_items

    out = Path(out)
    source = open_store(store) if isinstance(store, (str, Path)) else store  # a path, or a store object (tests)
    if isinstance(store, str):
        store = Path(store)
    config = resolve_paths(config)
    label_frame = labels if isinstance(labels, pd.DataFrame) else read_labels(labels)
    items = slice_items(label_frame, source.slices, source="the labels" if isinstance(labels, pd.DataFrame) else str(labels))
    prepare_model_dir(config, out, force=force, echo=echo)
    fold_frame = resolve_folds(config, label_frame, out, Path(folds) if folds else None, force=force, echo=echo)
    n_folds = n_folds_of(fold_frame)
    items = attach_folds(items, fold_frame, source=str(folds or out / FOLDS_FILE))
    if fold is not None:
        check_fold_index(fold, n_folds)
    todo = [fold] if fold is not None else list(range(n_folds))
    return TrainingInputs(config, store, source, out, label_frame, items, n_folds, todo)


def check_cnn_config(config: ExperimentConfig) -> None:
    """The backbone exists in timm and its weights file (if any) is there, before any work."""
    from pedetect.models.backbone import check_backbone_name, read_state_dict

    check_backbone_name(config.cnn.backbone.name)
    weights = resolve_paths(config).cnn.backbone.weights
    if weights is not None and not weights.is_file():
        read_state_dict(weights)  # the clear missing-file error


def run_cnn(
    inputs: TrainingInputs, *, force: bool = False, callbacks: Sequence = (), echo: Callable[[str], None] = _echo
) -> dict[str, Any]:
    """Stage 1 on the folds of ``inputs``, finished folds skipped unless ``force``; returns ``cnn/summary.json``."""
    out = inputs.out
    if force and is_global_zero():
        # Before any training starts, so processes of a distributed run all see the same folders.
        for k in inputs.todo:
            shutil.rmtree(fold_dir(out, k), ignore_errors=True)
    for k in inputs.todo:
        directory = fold_dir(out, k)
        if (directory / COMPLETE).is_file():
            echo(f"fold {k}: already complete ({directory / COMPLETE}); --force retrains it")
            continue
        train_fold(inputs.config, inputs.items, k, store=inputs.store, out=out, callbacks=callbacks, echo=echo)
    return write_summary(out, inputs.n_folds)


def read_config_for_training(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    from pedetect.train.config import apply_overrides

    return apply_overrides(load_experiment(path), list(overrides))


__all__ = ["train_fold", "TrainError", "COMPLETE", "config_to_yaml", "read_config_for_training"]
