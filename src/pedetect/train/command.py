"""``pedetect split`` and ``pedetect train`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def split_command(
    labels: Path = typer.Argument(..., help="Labels in the RSNA train.csv columns (one row per slice)."),
    folds: int = typer.Option(5, "--folds", "-k", min=2, help="Number of folds."),
    out: Path = typer.Option(..., "--out", help="Folds CSV to write: StudyInstanceUID,fold."),
    seed: int = typer.Option(42, "--seed", help="Seed of the split."),
) -> None:
    """Split studies into K cross-validation folds, grouped by study and stratified on the exam labels.

    No study is in two folds; each fold gets an equal share of studies and of every exam label (and
    of PE-positive studies). Prints the distribution per fold.
    """
    from pedetect.data.folds import FOLD, FoldsError, fold_summary, make_folds, read_labels
    from pedetect.io import write_csv_atomic
    from pedetect.labels import STUDY

    try:
        frame = read_labels(labels)
        result = make_folds(frame, folds, seed)
    except FoldsError as error:
        raise _fail(str(error)) from None
    write_csv_atomic(result.sort_values([FOLD, STUDY]), out)
    typer.echo(fold_summary(frame, result).to_string())
    typer.echo(f"wrote {out} ({len(result)} studies in {folds} folds, seed {seed})", err=True)


def train_command(
    config: Path = typer.Argument(..., help="Experiment config (YAML), e.g. configs/demo.yaml."),
    store: Path = typer.Option(..., "--store", help="Slice store made by pedetect prepare."),
    labels: Path = typer.Option(..., "--labels", help="Labels in the RSNA train.csv columns."),
    out: Path = typer.Option(..., "--out", help="Model folder (created; a re-run resumes and skips finished folds)."),
    stage: str = typer.Option("all", "--stage", help="cnn (stage 1), embed, seq, or all."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Train this fold only (0 … K−1); default: every fold."),
    folds: Optional[Path] = typer.Option(
        None, "--folds", help="Folds CSV (pedetect split); default: made from the labels with the config's data.folds and data.fold_seed."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override one config value, e.g. --set cnn.epochs=2 --set runtime.devices=2 (value read as YAML)."
    ),
    force: bool = typer.Option(False, "--force", help="Retrain folds that are already complete (and accept a changed config)."),
) -> None:
    """Train the model on cross-validation folds; resumable (a killed run continues from its last epoch).

    Stage 1 (--stage cnn) trains a timm slice CNN per fold and writes MODEL_DIR/cnn/fold<k>/
    (model.safetensors, metrics.json, metrics.csv, curves.png), the resolved MODEL_DIR/config.yaml
    and MODEL_DIR/folds.csv. Several GPUs or nodes: set runtime.devices / runtime.num_nodes
    (DDP; across nodes launch one process per node with torchrun or SLURM).
    """
    if stage not in ("all", "cnn", "embed", "seq"):
        raise _fail(f"unknown stage '{stage}'; choose cnn, embed, seq or all")
    if stage in ("embed", "seq"):
        raise _fail(f"stage '{stage}' is not available in this version; only stage 1 (--stage cnn) is")

    from pedetect.data.dataset import StoreError
    from pedetect.data.folds import FoldsError
    from pedetect.models.backbone import BackboneError
    from pedetect.train.cnn import TrainError, is_global_zero, read_config_for_training, train_cnn
    from pedetect.train.config import ConfigError

    try:
        experiment = read_config_for_training(config, overrides)
        summary = train_cnn(experiment, store=store, labels=labels, out=out, folds=folds, fold=fold, force=force)
    except (ConfigError, FoldsError, StoreError, BackboneError, TrainError) as error:
        raise _fail(str(error)) from None
    if not is_global_zero():
        return
    for k, metrics in summary["folds"].items():
        auc, loss = metrics["val_auc"], metrics["val_loss"]
        shown = f"AUC {auc:.4f}, log loss {loss:.4f}" if auc is not None else "no AUC (one class)"
        typer.echo(f"fold {k}: validation slice {shown} (epoch {metrics['exported_epoch']})")
    if summary["mean_val_auc"] is not None:
        typer.echo(f"mean validation slice AUC {summary['mean_val_auc']:.4f} over folds {summary['folds_complete']}")
    if stage == "all":
        typer.echo("stage 2 (embed, seq) is not available in this version: trained stage 1 only", err=True)
