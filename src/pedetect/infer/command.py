"""``pedetect predict`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pedetect.console import fail


def predict_command(
    input_path: Path = typer.Argument(..., help="A folder (any layout, e.g. the RSNA test folder) or a zip of DICOM files: one or many studies."),
    model: list[Path] = typer.Option(..., "--model", help="Model bundle made by pedetect train; repeat to ensemble several (averaged)."),
    out: Path = typer.Option(..., "--out", help="Submission CSV to write: id,label (one row per slice, nine per study)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for the report: index.html, and per study a viewer page (the series, the slice curve, where the model looks), a JSON and a PNG."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    tta: bool = typer.Option(False, "--tta", help="Also predict each series flipped left-right and average (the flipped view's left and right exchanged back)."),
    sample: Optional[Path] = typer.Option(
        None, "--sample", help="Sample submission: write its ids in its order (ids the input lacks get the training prior)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per CNN batch."),
    runtime: str = typer.Option(
        "auto", "--runtime",
        help="auto, torch, onnx or onnx-int8. auto: PyTorch on a GPU; on a CPU the fastest runtime that pedetect export "
        "made and found exact enough (int8, then ONNX fp32), else PyTorch.",
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the models (default: every core)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    dicom_out: Optional[Path] = typer.Option(
        None, "--dicom-out",
        help="Folder for DICOM results: per study DIR/<StudyInstanceUID>/sr.dcm (Comprehensive SR, TID 1500), sc.dcm "
        "(the report picture) and ko.dcm (key slices); docs/dicom_results.md.",
    ),
) -> None:
    """Predict PE from raw DICOM: every fold's CNN and sequence head of every bundle, averaged, with
    the label rules enforced (the repair of pedetect check --fix).

    Studies are read one at a time with the settings of the slice store the model was trained on;
    the next study is decoded while the models work. A slice that cannot be read still gets a row
    (interpolated from its neighbours); a study with no readable slice gets the training prior. The
    summary names everything lost; the exit status is 1 when anything was, 2 on unusable arguments.
    """
    from pedetect.infer.predict import predict
    from pedetect.metric.submission import InputError
    from pedetect.models.bundle import BundleError

    try:
        summary = predict(input_path, list(model), out, report_dir=report, device=device, tta=tta, sample=sample,
                          batch_size=batch_size, runtime=runtime, threads=threads, progress=progress,
                          dicom_out=dicom_out)
    except (BundleError, InputError, FileNotFoundError, ValueError) as error:
        raise fail(str(error)) from None
    typer.echo(summary.text(), err=True)
    if report is not None:
        typer.echo(f"report: {report / 'index.html'}", err=True)
    if not summary.ok:
        raise typer.Exit(1)
