"""``pedetect split`` and ``pedetect train`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

from pathlib import Path

import typer

from pedetect import options
from pedetect.console import fail
from pedetect.labels import STUDY


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

    try:
        frame = read_labels(labels)
        result = make_folds(frame, folds, seed)
    except FoldsError as error:
        raise fail(str(error)) from None
    write_csv_atomic(result.sort_values([FOLD, STUDY]), out)
    typer.echo(fold_summary(frame, result).to_string())
    typer.echo(f"wrote {out} ({len(result)} studies in {folds} folds, seed {seed})", err=True)


def train_command(
    config: Path = typer.Argument(..., help="Experiment config (YAML), e.g. configs/demo.yaml."),
    store: Path = typer.Option(..., "--store", help="Slice store made by pedetect prepare."),
    labels: Path = typer.Option(..., "--labels", help="Labels in the RSNA train.csv columns."),
    out: Path = typer.Option(..., "--out", help="Model folder (created; a re-run resumes and skips finished folds)."),
    stage: str = typer.Option(
        "all", "--stage", help="cnn (stage 1), embed, seq, heart (recipes with a heart section), or all."
    ),
    fold: int | None = typer.Option(None, "--fold", help="Train this fold only (0 … K−1); default: every fold."),
    folds: Path | None = typer.Option(
        None,
        "--folds",
        help="Folds CSV (pedetect split); default: made from the labels with the config's data.folds and data.fold_seed.",
    ),
    clots: Path | None = typer.Option(
        None,
        "--clots",
        help="The training emboli's boxes (pedetect synth's clots.csv: its visible rows), which a recipe with "
        "cnn.loss.clot_map_weight needs.",
    ),
    overrides: list[str] = options.overrides(),
    force: bool = typer.Option(
        False, "--force", help="Retrain folds that are already complete (and accept a changed config)."
    ),
) -> None:
    """Train the model on cross-validation folds; resumable (a killed run continues where it stopped).

    With no --stage, runs all three stages and leaves a complete model bundle for pedetect predict:

    Stage 1 (--stage cnn) trains a timm slice CNN per fold and writes MODEL_DIR/cnn/fold<k>/
    (model.safetensors, metrics.json, metrics.csv, curves.png), the resolved MODEL_DIR/config.yaml
    and MODEL_DIR/folds.csv. Several GPUs or nodes: set runtime.devices / runtime.num_nodes
    (DDP; across nodes launch one process per node with torchrun or SLURM).

    --stage embed: each fold's CNN embeds the slices of the studies it did not train on
    (MODEL_DIR/embed/fold{k}/, float16, with the CNN's slice logit).

    --stage seq: a sequence head per fold over the out-of-fold embeddings, trained on the
    competition metric (MODEL_DIR/seq/fold{k}/); once every fold is done, the cross-validated
    score with its baselines (MODEL_DIR/seq/cv.json) and the out-of-fold predictions
    (MODEL_DIR/seq/oof_predictions.csv).

    --stage heart (recipes with a heart: section): each series' heart is cropped from its
    Hounsfield units, a small 3D CNN per fold learns RV/LV >= 1 on positive exams, and its logit is
    stacked with stage 2's RV/LV output, fitted out of fold (MODEL_DIR/heart/, heart/cv.json).

    Finished parts are skipped; --force redoes them. A changed seq section redoes stage 2 (and the
    heart's stacking) only; a changed heart section the heart stage only.
    """
    from pedetect.models.layout import STAGES

    if stage not in (*STAGES, "all"):
        raise fail(f"unknown stage '{stage}'; choose {', '.join(STAGES)} or all")

    from pedetect.data.dataset import StoreError
    from pedetect.data.folds import FoldsError
    from pedetect.io import FolderLocked
    from pedetect.models.backbone import BackboneError
    from pedetect.recipe import ConfigError
    from pedetect.runtime import is_global_zero
    from pedetect.train.heart import HeartTrainError
    from pedetect.train.pipeline import train
    from pedetect.train.setup import TrainError, model_dir_lock, read_config_for_training

    try:
        experiment = read_config_for_training(config, overrides)
        with model_dir_lock(out):  # one writer per model folder
            result = train(
                experiment,
                stage=stage,
                store=store,
                labels=labels,
                out=out,
                folds=folds,
                fold=fold,
                force=force,
                clots=clots,
            )
    except (ConfigError, FoldsError, StoreError, BackboneError, TrainError, HeartTrainError, FolderLocked) as error:
        raise fail(str(error)) from None
    if not is_global_zero():
        return
    summary = result.get("cnn")
    for k, metrics in (summary or {}).get("folds", {}).items():
        auc, loss = metrics["val_auc"], metrics["val_loss"]
        shown = f"AUC {auc:.4f}, log loss {loss:.4f}" if auc is not None else "no AUC (one class)"
        typer.echo(f"fold {k}: validation slice {shown} (epoch {metrics['exported_epoch']})")
    if summary and summary["mean_val_auc"] is not None:
        typer.echo(f"mean validation slice AUC {summary['mean_val_auc']:.4f} over folds {summary['folds_complete']}")
    if "embed" in result:
        typer.echo(f"embeddings: folds {result['embed']['folds_complete']} complete")
    cv = result.get("seq")
    if cv is not None:
        base = cv["baselines"]
        typer.echo(
            f"cross-validated score {cv['score']:.4f} ({cv['score_consistent']:.4f} after consistency fixing, "
            f"{cv['exams_fixed']} exams fixed) over {cv['n_studies']} studies; "
            f"prior {base['prior']['score']:.4f}, stage 1 alone {base['stage1_alone']['score']:.4f}"
        )
    elif "seq" in result:
        typer.echo("stage 2: not every fold is trained yet; no cross-validated score", err=True)
    heart = result.get("heart")
    if heart is not None:
        auc = heart["rv_lv_auc_given_positive"]
        typer.echo(
            f"with the heart model: cross-validated score {heart['score']:.4f} ({heart['score_consistent']:.4f} after consistency "
            f"fixing; stage 2 alone {heart['without_heart']['score']:.4f}); RV/LV >= 1 AUC on positive exams: "
            f"stage 2 {_number(auc['sequence_head'])}, heart model {_number(auc['heart_model'])}, stacked {_number(auc['stacked'])}"
        )
    timing = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["seconds"].items())
    typer.echo(f"time: {timing}" + (f"; bundle complete: {out}" if result.get("bundle") else ""), err=True)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
