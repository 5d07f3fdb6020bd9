"""``pedetect predict`` and ``pedetect serve`` (Typer and pathlib only at import: ``--help`` stays fast).

``predict`` lives here, above :mod:`pedetect.infer`, because its ``--dicom-out`` and ``--dicomweb``
answer studies with DICOM results (:mod:`pedetect.hospital.answer`): nothing in ``infer`` imports
``hospital``.
"""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer

from pedetect import options
from pedetect.console import fail, fail_disk_full


def serve_command(
    model: list[Path] | None = options.models(None, note="or models: in --config"),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="YAML with any of the settings below (models, spool, ae_title, host, port, settle, destination, device, "
        "runtime, threads, min_slices, decode_timeout, retry_max, alerts, workers, http_host, http_port); flags given "
        "here override it.",
    ),
    ae_title: str | None = typer.Option(None, "--ae-title", help="This node's AE title. [default: PEDETECT]"),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="TCP port of the DICOM node. [default: 11112]"
    ),
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on (127.0.0.1: this machine only). [default: 0.0.0.0]"
    ),
    spool: Path | None = typer.Option(
        None,
        "--spool",
        help="Folder for received instances (incoming/), results not yet delivered (outbox/) and answered studies "
        "(done/). [default: pedetect-spool]",
    ),
    settle: float | None = typer.Option(
        None,
        "--settle",
        min=0.0,
        help="A study is complete when no instance of it came for this many seconds. [default: 10]",
    ),
    destination: str | None = typer.Option(
        None,
        "--destination",
        help="Where results go: dimse:AE@host:port (C-STORE) or dicomweb:URL (STOW-RS). Without it results stay in SPOOL/outbox/.",
    ),
    min_slices: int | None = typer.Option(
        None,
        "--min-slices",
        min=1,
        help="A usable series has at least this many slices (series selection: docs/dicom_results.md). [default: 20]",
    ),
    device: str | None = options.device(None),
    runtime: str | None = options.runtime(None),
    threads: int | None = options.threads(of="each worker's models"),
    decode_timeout: float | None = options.decode_timeout(
        None, then="the slice is lost (logged, the study still answered). 0: no limit."
    ),
    retry_max: float | None = typer.Option(
        None,
        "--retry-max",
        min=0.1,
        help="Longest wait between delivery retries, seconds (back-off doubles from 1 s). [default: 60]",
    ),
    alerts: Path | None = typer.Option(
        None,
        "--alerts",
        help="YAML of alert receivers (HL7 v2 ORU^R01 over MLLP, FHIR R4, JSON webhook) told of each answered study, "
        "queued on disk and retried (docs/alerts.md).",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        max=64,
        help="Prediction worker processes, each with the models loaded once, sharing only the spool (each takes its "
        "own memory: docs/serve.md). [default: 1]",
    ),
    http_host: str | None = typer.Option(
        None, "--http-host", help="Address of /healthz and /metrics. [default: 127.0.0.1]"
    ),
    http_port: int | None = typer.Option(
        None, "--http-port", min=0, max=65535, help="Port of /healthz and /metrics; 0: none. [default: 9110]"
    ),
) -> None:
    """A DICOM node (C-STORE and C-ECHO) that predicts each CT study it receives and sends back DICOM
    results (Comprehensive SR, secondary capture, key images, segmentation; docs/dicom_results.md).

    Each instance is written to the spool as it arrives; reception never waits on a prediction. A study
    is predicted when no instance of it came for --settle seconds, oldest first, by one of --workers
    workers that loaded the models once; results and alerts are queued on disk and sent with retries.
    Restarted on the same spool it answers what was received but not answered. /healthz and /metrics
    (Prometheus) on loopback. Logs name UIDs only. Stops on Ctrl-C or SIGTERM. docs/serve.md.
    """
    from pedetect.config import ConfigError, read_yaml, validate_config
    from pedetect.hospital.deliver import parse_destination
    from pedetect.hospital.serve import Server, ServeSettings, configure_logging
    from pedetect.io import FolderLocked, folder_lock
    from pedetect.models.bundle import BundleError, read_bundle

    flags = {
        "models": model or None,
        "spool": spool,
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "settle": settle,
        "destination": destination,
        "device": device,
        "runtime": runtime,
        "threads": threads,
        "min_slices": min_slices,
        "decode_timeout": decode_timeout,
        "retry_max": retry_max,
        "alerts": alerts,
        "workers": workers,
        "http_host": http_host,
        "http_port": http_port,
    }
    try:
        values: dict[str, Any] = {}
        if config is not None:
            values = read_yaml(config) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{config}: expected a mapping of settings, got {type(values).__name__}")
            for key in ("models", "spool", "alerts"):  # paths in the file are relative to the file
                if key in values and values[key] is not None:
                    relative = values[key] if isinstance(values[key], list) else [values[key]]
                    resolved = [
                        str((config.parent / str(v)).resolve()) if not Path(str(v)).is_absolute() else v
                        for v in relative
                    ]
                    values[key] = resolved if isinstance(values[key], list) else resolved[0]
        values.update({key: value for key, value in flags.items() if value is not None})
        if not values.get("models"):
            raise ConfigError("no model: give --model (or models: in --config)")
        settings = validate_config(values, ServeSettings, source=str(config) if config else "pedetect serve")
        if settings.destination:
            parse_destination(settings.destination)
        for path in settings.models:
            read_bundle(path)
        if settings.alerts is not None:
            from pedetect.hospital.alerts import AlertConfig

            AlertConfig.from_yaml(settings.alerts)  # a bad file stops the node before it listens
    except (ValueError, BundleError) as error:
        raise fail(str(error)) from None
    configure_logging()
    serve_config = settings.serve_config()
    try:
        with folder_lock(serve_config.spool, command="pedetect serve"):
            server = Server(serve_config)
            try:
                server.start()
            except OSError as error:
                raise fail(
                    f"cannot listen on {serve_config.host}:{serve_config.port} "
                    f"(or /healthz on {serve_config.http_host}:{serve_config.http_port}): {error}"
                ) from None
            signal.signal(signal.SIGTERM, lambda *_: server.stop())
            try:
                server.run()
            except KeyboardInterrupt:
                server.stop()
    except FolderLocked as error:
        raise fail(str(error)) from None


def predict_command(
    input_path: Path | None = typer.Argument(
        None,
        help="A folder (any layout, e.g. the RSNA test folder) or a zip of DICOM files: one or many studies (or --dicomweb).",
    ),
    model: list[Path] = options.models(..., note="averaged"),
    out: Path = typer.Option(
        ..., "--out", help="Submission CSV to write: id,label (one row per slice, nine per study)."
    ),
    report: Path | None = typer.Option(
        None,
        "--report",
        help="Folder for the report: index.html, and per study a viewer page (the series, the slice curve, where the model looks), a JSON and a PNG.",
    ),
    device: str = options.device("auto"),
    tta: bool = typer.Option(
        False,
        "--tta",
        help="Also predict each series flipped left-right and average (the flipped view's left and right exchanged back).",
    ),
    sample: Path | None = typer.Option(
        None,
        "--sample",
        help="Sample submission: write its ids in its order (ids the input lacks get the training prior).",
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per CNN batch."),
    runtime: str = options.runtime("auto"),
    threads: int | None = options.threads(of="the models"),
    progress: bool = options.progress(),
    dicom_out: Path | None = typer.Option(
        None,
        "--dicom-out",
        help="Folder for DICOM results: per study DIR/<StudyInstanceUID>/sr.dcm (Comprehensive SR, TID 1500), sc.dcm "
        "(the report picture) and ko.dcm (key slices); docs/dicom_results.md.",
    ),
    clots: Path | None = typer.Option(
        None,
        "--clots",
        help="CSV of clot candidates: one row per candidate (StudyInstanceUID, candidate, score, side, key slice "
        "SOPInstanceUID and slice_index, row and col of its point in that image's pixel grid, slice range, patient mm, "
        "outline); found where the slice CNN's activation maps peak (docs/localisation.md). Score it with "
        "pedetect evaluate --clots TRUTH --candidates FILE.",
    ),
    dicomweb: str | None = typer.Option(
        None,
        "--dicomweb",
        help="Instead of INPUT: a DICOMweb server (e.g. http://pacs:8042/dicom-web); studies from --study "
        "and --qido are retrieved with WADO-RS, their CTPA series chosen (docs/dicom_results.md) and answered with DICOM results.",
    ),
    study: list[str] = typer.Option(
        [], "--study", help="With --dicomweb: a StudyInstanceUID to predict; repeat for more."
    ),
    qido: list[str] = typer.Option(
        [],
        "--qido",
        help="With --dicomweb: a QIDO-RS filter KEY=VALUE selecting studies (e.g. StudyDate=20200101-20201231); repeatable.",
    ),
    min_slices: int = typer.Option(
        20, "--min-slices", min=1, help="With --dicomweb: a usable series has at least this many slices."
    ),
    decode_timeout: float = options.decode_timeout(
        60.0,
        then="the slice is lost (its row interpolated, as for any slice that cannot be read). 0: no limit (decode in "
        "this process).",
    ),
    destination: str | None = typer.Option(
        None,
        "--destination",
        help="With --dicomweb: store each study's DICOM results at dicomweb:URL (STOW-RS) or dimse:AE@host:port (C-STORE).",
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

    if (input_path is None) == (dicomweb is None):
        raise fail("give one of INPUT (a folder or a zip) and --dicomweb URL")
    if dicomweb is None and (study or qido or destination):
        raise fail("--study, --qido and --destination go with --dicomweb")
    predict_options: dict[str, Any] = dict(
        report_dir=report,
        device=device,
        tta=tta,
        sample=sample,
        batch_size=batch_size,
        runtime=runtime,
        threads=threads,
        progress=progress,
        decode_timeout=decode_timeout,
        clots=clots,
    )

    from pedetect.io import FolderLocked, folder_lock, output_lock

    locks = ExitStack()  # one writer per output: the submission, the report and the DICOM results folders
    try:
        locks.enter_context(output_lock(out, command="pedetect predict"))
        if clots is not None:
            locks.enter_context(output_lock(clots, command="pedetect predict"))
        for folder in (report, dicom_out):
            if folder is not None:
                locks.enter_context(folder_lock(folder, command="pedetect predict"))
    except FolderLocked as error:
        locks.close()
        raise fail(str(error)) from None
    try:
        if dicomweb is not None:
            from pedetect.hospital.dicomweb import parse_filters, predict_dicomweb

            summary = predict_dicomweb(
                dicomweb,
                study,
                parse_filters(qido),
                list(model),
                out,
                dicom_out=dicom_out,
                destination=destination,
                min_slices=min_slices,
                **predict_options,
            )
        else:
            from pedetect.hospital.answer import DicomAnswer

            assert input_path is not None  # checked above: exactly one of INPUT and --dicomweb
            answer = DicomAnswer(dicom_out) if dicom_out is not None else None
            summary = predict(input_path, list(model), out, on_prediction=answer, **predict_options)
    except (BundleError, InputError, FileNotFoundError, ValueError) as error:
        raise fail(str(error)) from None
    except OSError as error:
        from pedetect.io import is_disk_full

        if not is_disk_full(error):
            raise
        advice = (
            "no file was left half-written and no submission was written: free space and run the same command again"
        )
        raise fail_disk_full(error, str(error.filename or out), advice) from None
    finally:
        locks.close()
    typer.echo(summary.text(), err=True)
    if report is not None:
        typer.echo(f"report: {report / 'index.html'}", err=True)
    if not summary.ok:
        raise typer.Exit(1)
