"""``pedetect serve`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pedetect.console import fail


def serve_command(
    model: list[Path] = typer.Option(
        ..., "--model", help="Model bundle made by pedetect train; repeat to ensemble several."
    ),
    ae_title: str = typer.Option("PEDETECT", "--ae-title", help="This node's AE title."),
    port: int = typer.Option(11112, "--port", min=1, max=65535, help="TCP port of the DICOM node."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    spool: Path = typer.Option(
        Path("pedetect-spool"),
        "--spool",
        help="Folder for received instances (incoming/), results not yet delivered (outbox/) and answered studies (done/).",
    ),
    settle: float = typer.Option(
        10.0, "--settle", min=0.0, help="A study is complete when no instance of it came for this many seconds."
    ),
    destination: Optional[str] = typer.Option(
        None,
        "--destination",
        help="Where results go: dimse:AE@host:port (C-STORE) or dicomweb:URL (STOW-RS). Without it results stay in SPOOL/outbox/.",
    ),
    min_slices: int = typer.Option(
        20,
        "--min-slices",
        min=1,
        help="A usable series has at least this many slices (series selection: docs/dicom_results.md).",
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    decode_timeout: float = typer.Option(
        60.0,
        "--decode-timeout",
        min=0.0,
        metavar="SECONDS",
        help="Seconds one slice may take to decode; past that its decoder process is stopped and the slice is lost "
        "(logged, the study still answered). 0: no limit.",
    ),
    retry_max: float = typer.Option(
        60.0, "--retry-max", min=0.1, help="Longest wait between delivery retries, seconds (back-off doubles from 1 s)."
    ),
) -> None:
    """A DICOM node (C-STORE and C-ECHO) that predicts each CT study it receives and sends back DICOM
    results (Comprehensive SR, secondary capture, key images; docs/dicom_results.md).

    Each instance is written to the spool as it arrives; a study is predicted when no instance of it
    came for --settle seconds, one study at a time; results are queued on disk and sent with retries.
    Restarted on the same spool it answers what was received but not answered. Logs name UIDs only.
    Stops on Ctrl-C or SIGTERM.
    """
    import signal

    from pedetect.hospital.deliver import parse_destination
    from pedetect.hospital.serve import Server, ServeConfig, configure_logging
    from pedetect.io import FolderLocked, folder_lock
    from pedetect.models.bundle import BundleError, read_bundle

    try:
        if destination:
            parse_destination(destination)
        for path in model:
            read_bundle(path)
    except (ValueError, BundleError) as error:
        raise fail(str(error)) from None
    configure_logging()
    config = ServeConfig(
        model_dirs=list(model),
        spool=spool,
        ae_title=ae_title,
        host=host,
        port=port,
        settle=settle,
        destination=destination,
        device=device,
        retry_max=retry_max,
        min_slices=min_slices,
        decode_timeout=decode_timeout,
    )
    try:
        with folder_lock(spool, command="pedetect serve"):
            server = Server(config)
            try:
                server.start()
            except OSError as error:
                raise fail(f"cannot listen on {host}:{port}: {error}") from None
            signal.signal(signal.SIGTERM, lambda *_: server.stop())
            try:
                server.run()
            except KeyboardInterrupt:
                server.stop()
    except FolderLocked as error:
        raise fail(str(error)) from None
