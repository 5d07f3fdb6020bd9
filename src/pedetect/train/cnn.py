"""Stage 1: train the slice CNN on each cross-validation fold.

``pedetect.train.pipeline.train(config, stage="cnn", store=..., labels=..., out=MODEL_DIR)`` writes,
in the layout of :mod:`pedetect.models.layout`::

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

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from pedetect.console import echo as console_echo
from pedetect.data.dataset import SliceDataset, open_store, side_target_columns, single_threaded_opencv
from pedetect.data.folds import FOLD
from pedetect.data.sampler import EpochSampler, ShardSampler
from pedetect.io import read_json, write_json_atomic
from pedetect.labels import IMAGE_LABEL, SERIES, STUDY
from pedetect.models.backbone import check_backbone_name, read_state_dict, weights_provenance
from pedetect.models.layout import (
    CHECKPOINTS_DIR,
    COMPLETE,
    METRICS_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    cnn_dir,
    is_complete,
    stage_root,
    write_complete,
)
from pedetect.models.slice_classifier import build_slice_classifier
from pedetect.models.weights import save_weights
from pedetect.recipe import ExperimentConfig
from pedetect.runtime import is_global_zero
from pedetect.train.boxes import training_lung_boxes
from pedetect.train.parallel import processes_for, run_folds
from pedetect.train.reporting import finite, write_fold_report
from pedetect.train.setup import TrainError, TrainingInputs, resolve_paths
from pedetect.train.trainer import (
    build_loggers,
    load_checkpoint_state,
    quiet_lightning,
    resolve_precision,
    safe_checkpoint_io,
    uses_gpu,
)

# Lightning (and pedetect.train.module, built on it) is imported where stage 1 trains: it takes
# seconds to import, and pedetect.train.pipeline imports this module whatever the stage.


def make_loaders(
    config: ExperimentConfig,
    store: Path,
    train_items: pd.DataFrame,
    val_items: pd.DataFrame,
    seed: int,
    boxes: dict | None = None,
    clot_boxes: dict | None = None,
):
    cnn = config.cnn
    common: dict[str, Any] = dict(
        mode=cnn.input.mode,
        image_size=cnn.input.image_size,
        crop=cnn.input.crop,
        exam_labels=tuple(cnn.targets.exam_labels),
        whole_exam_labels=tuple(cnn.targets.whole_exam_labels),
        boxes=boxes,
    )
    # The clot maps are a training target only: validation scores the slice label.
    train_set = SliceDataset(
        store,
        train_items,
        augment=cnn.augment,
        clot_boxes=clot_boxes if cnn.loss.clot_map_weight > 0 else None,
        **common,
    )
    val_set = SliceDataset(store, val_items, augment=None, **common)
    sampler = EpochSampler(
        train_set.positive,
        mode=cnn.sampling.mode,
        positive_share=cnn.sampling.positive_share,
        samples_per_epoch=cnn.sampling.samples_per_epoch,
        seed=seed,
        studies=train_items[STUDY].to_numpy() if cnn.sampling.mode == "per_study" else None,
        study_slices=cnn.sampling.study_slices,
        study_positives=cnn.sampling.study_positives,
    )
    workers = config.data.num_workers
    loader_args: dict[str, Any] = dict(num_workers=workers, pin_memory=uses_gpu(config), persistent_workers=workers > 0)
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
        val_set,
        batch_size=config.data.val_batch_size or 2 * cnn.batch_size,
        sampler=ShardSampler(len(val_set)),
        **loader_args,
    )
    return train_loader, val_loader


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
    history = module.history
    monitor = config.cnn.monitor
    chosen: dict[str, Any] | None = None
    if (
        config.cnn.export == "best"
        and checkpoint_callback.best_model_path
        and Path(checkpoint_callback.best_model_path).is_file()
    ):
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
        "val_auc": finite(chosen.get("val_auc")),
        "val_loss": finite(chosen.get("val_loss")),
        "exported_epoch": chosen_epoch,
        "export": config.cnn.export,
        "monitor": monitor,
        "backbone": config.cnn.backbone.name,
        "input": config.cnn.input.mode,
        "image_size": config.cnn.input.image_size,
        "embedding_dim": module.model.embedding_dim,
        **extra,
    }
    return write_fold_report(
        directory, metrics, history, f"{config.name} — CNN fold {fold} ({config.cnn.backbone.name})"
    )


def checkpoint_callback(config: ExperimentConfig, directory: Path):
    """Keeps ``checkpoints/last.ckpt`` (resume) and ``best.ckpt`` (the monitored metric's best epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if config.cnn.validation == "last_epoch":
        # Only the last epoch is validated, so it is the exported one: one checkpoint, written after
        # every training epoch (Lightning would otherwise save only after a validation), for resume.
        return ModelCheckpoint(
            dirpath=str(directory / CHECKPOINTS_DIR),
            filename="last",
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    return ModelCheckpoint(
        dirpath=str(directory / CHECKPOINTS_DIR),
        filename="best",
        monitor=config.cnn.monitor,
        mode="max" if config.cnn.monitor == "val_auc" else "min",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )


def build_trainer(
    config: ExperimentConfig, directory: Path, out: Path, fold: int, callbacks: Sequence, steps_per_epoch: int
):
    """The Lightning trainer of one fold, from the recipe's runtime, logging and cnn sections."""
    import lightning as L

    runtime = config.runtime
    return L.Trainer(
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        strategy=runtime.strategy,
        precision=resolve_precision(config),
        deterministic=runtime.deterministic,
        max_epochs=config.cnn.epochs,
        check_val_every_n_epoch=config.cnn.epochs if config.cnn.validation == "last_epoch" else 1,
        accumulate_grad_batches=config.cnn.accumulate_grad_batches,
        gradient_clip_val=config.cnn.gradient_clip_norm,
        gradient_clip_algorithm="norm" if config.cnn.gradient_clip_norm else None,
        limit_train_batches=config.cnn.limit_train_batches,
        limit_val_batches=config.cnn.limit_val_batches,
        logger=build_loggers(config, directory, out, fold),
        callbacks=list(callbacks),
        plugins=[safe_checkpoint_io()],
        use_distributed_sampler=False,  # the samplers shard by rank themselves
        num_sanity_val_steps=0,
        enable_progress_bar=config.logging.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(config.logging.log_every_n_steps, steps_per_epoch)),
        default_root_dir=str(directory),
    )


def split_fold(items: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold k's training slices (every other fold) and validation slices (fold k)."""
    train_items = items[items[FOLD] != fold].reset_index(drop=True)
    val_items = items[items[FOLD] == fold].reset_index(drop=True)
    if train_items.empty or val_items.empty:
        raise TrainError(f"fold {fold} leaves no {'training' if train_items.empty else 'validation'} slices")
    return train_items, val_items


def split_counts(train_items: pd.DataFrame, val_items: pd.DataFrame) -> dict[str, int]:
    """Slices, positive slices and studies on each side of a fold (recorded in metrics.json)."""
    return {
        "train_slices": len(train_items),
        "train_positive": int(train_items[IMAGE_LABEL].sum()),
        "val_slices": len(val_items),
        "val_positive": int(val_items[IMAGE_LABEL].sum()),
        "train_studies": int(train_items[STUDY].nunique()),
        "val_studies": int(val_items[STUDY].nunique()),
    }


def train_fold(
    config: ExperimentConfig,
    items: pd.DataFrame,
    fold: int,
    *,
    store: Path,
    out: Path,
    callbacks: Sequence = (),
    echo: Callable[[str], None] = console_echo,
    clot_boxes: dict | None = None,
) -> dict[str, Any] | None:
    """Train one fold (resuming from its last.ckpt); returns its metrics on the writing process.
    ``clot_boxes``: :attr:`TrainingInputs.clot_boxes`, for ``cnn.loss.clot_map_weight``."""
    import lightning as L

    from pedetect.train.module import SliceModule

    quiet_lightning()
    directory = cnn_dir(out, fold)
    seed = config.seed + fold
    L.seed_everything(seed, workers=True, verbose=False)
    train_items, val_items = split_fold(items, fold)
    boxes = None
    if config.cnn.input.lung_crop is not None:
        source = open_store(store) if isinstance(store, (str, Path)) else store
        boxes = training_lung_boxes(config, source, sorted(items[SERIES].unique()), out, echo=echo)
    train_loader, val_loader = make_loaders(config, store, train_items, val_items, seed, boxes, clot_boxes)
    # Every fold starts from the same weights, as it would from one pretrained file: the folds'
    # embedding spaces stay comparable, which stage 2 needs (it trains on out-of-fold embeddings made
    # by the other folds' CNNs). The data order still differs per fold (seeded above).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_slice_classifier(config.cnn)
    module = SliceModule(model, config.cnn)
    checkpoint = checkpoint_callback(config, directory)
    trainer = build_trainer(config, directory, out, fold, [checkpoint, *callbacks], len(train_loader))
    last = directory / CHECKPOINTS_DIR / "last.ckpt"
    resume = last if last.is_file() else None
    resumed_from = int(load_checkpoint_state(last)["epoch"]) if resume else None
    counts = split_counts(train_items, val_items)
    echo(
        f"fold {fold}: {counts['train_slices']} training slices ({counts['train_positive']} positive), "
        f"{counts['val_slices']} validation slices" + (f"; resuming from {last}" if resume else "")
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.interrupted:
        raise TrainError(f"fold {fold} was interrupted; run again to resume from {last}")
    if not trainer.is_global_zero:
        return None
    extra = {
        **counts,
        "resumed_after_epoch": resumed_from,
        "devices": int(trainer.world_size),
        "precision": str(trainer.precision),
    }
    metrics = export_fold(config, module, directory, checkpoint, fold=fold, extra=extra)
    if not config.cnn.keep_checkpoints:
        shutil.rmtree(directory / CHECKPOINTS_DIR, ignore_errors=True)
    starting = weights_provenance(config.cnn.backbone.weights, config.cnn.backbone.name)
    write_complete(
        directory, {"val_auc": metrics["val_auc"], "val_loss": metrics["val_loss"], "starting_weights": starting}
    )
    auc = metrics["val_auc"]
    echo(
        f"fold {fold}: validation slice AUC {auc:.4f}, log loss {metrics['val_loss']:.4f}"
        if auc is not None
        else f"fold {fold} done"
    )
    return metrics


def write_summary(out: Path, n_folds: int) -> dict[str, Any]:
    folds = {}
    for k in range(n_folds):
        path = cnn_dir(out, k) / METRICS_FILE
        if is_complete(cnn_dir(out, k)) and path.is_file():
            m = read_json(path)
            folds[k] = {
                "val_auc": m.get("val_auc"),
                "val_loss": m.get("val_loss"),
                "exported_epoch": m.get("exported_epoch"),
            }
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
        write_json_atomic(stage_root(out, "cnn") / SUMMARY_FILE, summary)
    return summary


def check_cnn_config(config: ExperimentConfig) -> None:
    """The backbone exists in timm, its weights file (if any) is there, and the augmentation keeps
    the side labels right (:func:`~pedetect.data.dataset.side_target_columns`), before any work."""
    try:
        side_target_columns(config.cnn.targets.head_labels, config.cnn.augment)
    except ValueError as error:
        raise TrainError(str(error)) from None
    if config.cnn.loss.clot_map_weight > 0 and config.cnn.head.hidden:
        # The map is the head on every position: a hidden layer's BatchNorm would learn the statistics
        # of positions, not of pooled slices.
        raise TrainError("cnn.loss.clot_map_weight needs a head without a hidden layer (cnn.head.hidden: 0)")
    check_backbone_name(config.cnn.backbone.name)
    weights = resolve_paths(config).cnn.backbone.weights
    if isinstance(weights, Path) and not weights.is_file():
        read_state_dict(weights)  # the clear missing-file error


def run_cnn(
    inputs: TrainingInputs, *, force: bool = False, callbacks: Sequence = (), echo: Callable[[str], None] = console_echo
) -> dict[str, Any]:
    """Stage 1 on the folds of ``inputs``, finished folds skipped unless ``force``; returns ``cnn/summary.json``."""
    out = inputs.out
    if force and is_global_zero():
        # Before any training starts, so processes of a distributed run all see the same folders.
        for k in inputs.todo:
            shutil.rmtree(cnn_dir(out, k), ignore_errors=True)
    pending = []
    for k in inputs.todo:
        directory = cnn_dir(out, k)
        if is_complete(directory):
            echo(f"fold {k}: already complete ({directory / COMPLETE}); --force retrains it")
            continue
        pending.append(k)
    # Callbacks (tests, integrations) live in this process: with them the folds train here.
    processes = 1 if callbacks else processes_for(inputs, pending, device="cuda" if uses_gpu(inputs.config) else "cpu")
    run_folds(
        inputs,
        pending,
        processes,
        in_process=_train_fold_in_process,
        stage="cnn",
        echo=echo,
        in_turn=lambda k: train_fold(
            inputs.config,
            inputs.items,
            k,
            store=inputs.store,
            out=out,
            callbacks=callbacks,
            echo=echo,
            clot_boxes=inputs.clot_boxes,
        ),
    )
    return write_summary(out, inputs.n_folds)


def _train_fold_in_process(inputs: TrainingInputs, fold: int) -> dict[str, Any] | None:
    """One fold's CNN in a process of its own (``runtime.parallel_folds``); a line per epoch stands in
    for the progress bar."""
    import lightning as L

    class EpochLines(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            # Runs before the module records the epoch, after its validation (if any) recorded it.
            record: dict[str, Any] = next((h for h in module.history if h["epoch"] == trainer.current_epoch), {})
            auc = record.get("val_auc")
            shown = f", validation AUC {auc:.4f}" if auc is not None and np.isfinite(auc) else ""
            console_echo(
                f"fold {fold}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, "
                f"train loss {module.epoch_train_loss:.4f}{shown}"
            )

    return train_fold(
        inputs.config,
        inputs.items,
        fold,
        store=inputs.store,
        out=inputs.out,
        callbacks=[EpochLines()],
        clot_boxes=inputs.clot_boxes,
    )
