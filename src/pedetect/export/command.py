"""``pedetect export`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

from pathlib import Path

import typer

from pedetect import options
from pedetect.console import fail


def export_command(
    model: Path = typer.Argument(..., help="Model bundle made by pedetect train."),
    store: Path = typer.Option(
        ...,
        "--store",
        help="A slice store (pedetect prepare): the real slices every exported model is checked on, and the int8 CNN calibrated on. "
        "The bundle's own training store, with --labels, also measures the score.",
    ),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="Labels of the store's studies (train.csv columns): measure each runtime's score and slice AUC on each fold's "
        "validation studies. Without them int8 is exported but never the default.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Export into a copy of the bundle here (what predict needs; no checkpoints or embeddings)."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="Also quantize each CNN to int8 (static, calibrated on the store's slices)."
    ),
    calibration_slices: int = typer.Option(
        512, "--calibration-slices", min=1, help="Slices per fold that calibrate the int8 ranges."
    ),
    check_series: int = typer.Option(40, "--check-series", min=1, help="Series per fold the runtimes are compared on."),
    threads: int | None = options.threads(of="the models"),
) -> None:
    """Export a bundle's models for ONNX Runtime: each fold's CNN and sequence head (and, with --int8,
    an int8 CNN), checked against PyTorch on real slices.

    Writes MODEL_DIR/onnx/fold<k>/ and MODEL_DIR/onnx/export.json: the largest difference of every
    output, the score and slice AUC of each runtime (with --labels), and which runtimes are exact
    enough to be pedetect predict's default (ONNX fp32: no probability moves by more than 1e-4;
    int8: the score moves by at most 0.005 and the slice AUC by at most 0.002). Retraining a fold
    makes its export stale; predict then falls back to PyTorch.
    """
    from pedetect.data.dataset import StoreError
    from pedetect.data.folds import FoldsError
    from pedetect.export.job import ExportError, export_bundle
    from pedetect.io import FolderLocked, folder_lock, output_lock
    from pedetect.metric.submission import InputError
    from pedetect.models.bundle import BundleError

    try:
        # One writer per output: MODEL_DIR (its onnx/ is replaced; train holds the same lock), or the --out copy.
        with (
            folder_lock(model, command="pedetect export")
            if out is None
            else output_lock(out, command="pedetect export")
        ):
            record = export_bundle(
                model,
                store,
                labels=labels,
                out=out,
                int8=int8,
                calibration_slices=calibration_slices,
                check_series=check_series,
                threads=threads,
            )
    except (
        ExportError,
        BundleError,
        StoreError,
        FoldsError,
        InputError,
        FileNotFoundError,
        ValueError,
        FolderLocked,
    ) as error:
        raise fail(str(error)) from None
    where = out or model
    for name, check in record["check"].items():
        if name == "torch":
            continue
        quality = (
            f", score {check['score']:.4f} ({check['score_change']:+.4f}), slice AUC {check['slice_auc']:.4f} ({check['slice_auc_change']:+.4f})"
            if "score" in check
            else ""
        )
        verdict = "default" if record["default_ok"].get(name) else "not the default"
        typer.echo(
            f"{name}: largest probability change {check['max_abs_probability']:.2g}{quality}: {verdict} ({record['why'][name]})",
            err=True,
        )
    typer.echo(f"exported {len(record['folds'])} fold(s) to {where / 'onnx'} in {record['seconds']:.0f} s", err=True)
