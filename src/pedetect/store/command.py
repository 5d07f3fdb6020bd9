"""``pedetect prepare``: DICOM (folder or zip) → slice store.

Only Typer and pathlib at import time; the job is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pedetect import options
from pedetect.console import fail, fail_disk_full


def prepare_command(
    input_path: Path = typer.Argument(
        ...,
        metavar="INPUT",
        help="A folder of DICOM files in any layout (nesting and file names do not matter: DICOM is recognised by content), "
        "or a zip archive, read in place (never extracted).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Slice store folder to create, or to finish: a rerun skips the series already done."
    ),
    workers: int = typer.Option(
        1, "--workers", "-w", min=1, help="Worker processes on this machine (one per core is a good start)."
    ),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        min=16,
        max=4096,
        help="Store slices as PX × PX, resizing other sizes with aspect kept (padding is air). Default: keep each series' own size.",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="YAML with prepare settings: image_size, windows (three of name/level/width: R,G,B), jpeg_quality, jpeg_sampling. "
        "Command-line options win.",
    ),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        help="Run on a Dask distributed cluster at this address (e.g. tcp://host:8786) instead of local processes; "
        "INPUT and --out must be visible to every worker at the same paths.",
    ),
    progress: bool = options.progress(),
    decode_timeout: float = options.decode_timeout(
        60.0, then="the slice is a failure (the batch goes on). 0: no limit (decode in the worker itself)."
    ),
) -> None:
    """Read DICOM CT series into a slice store: slices ordered by position, three windows as uint8 channels.

    Writes OUT/slices.parquet (one row per slice: UIDs, slice_index in position order, z in mm, …), OUT/series.parquet (geometry, spacing, irregularities), OUT/failures.parquet (every file or slice that could not be used, with the reason) and the image data (OUT/series/).

    Safe to kill and run again: finished series are kept, the rest are done. Exit status 1 when anything could not be read (see failures.parquet), 2 on a usage error.
    """
    from pedetect.config import ConfigError, load_config
    from pedetect.io import FolderLocked, is_disk_full
    from pedetect.store.config import PrepareConfig
    from pedetect.store.job import StoreSettingsError, prepare

    if not input_path.exists():
        raise fail(f"INPUT not found: {input_path}")
    try:
        settings = load_config(config, PrepareConfig) if config is not None else PrepareConfig()
    except ConfigError as error:
        raise fail(str(error)) from None
    try:
        summary = prepare(
            input_path,
            out,
            workers=workers,
            image_size=image_size,
            config=settings,
            scheduler=scheduler,
            progress=progress,
            decode_timeout=decode_timeout,
        )
    except (StoreSettingsError, FolderLocked) as error:
        raise fail(str(error)) from None
    except OSError as error:
        if not is_disk_full(error):
            raise
        advice = (
            "the series finished so far are kept and no file was left half-written: free space and run the same "
            "command again to finish"
        )
        raise fail_disk_full(error, f"the slice store {out}", advice) from None
    typer.echo(summary.text())
    if not summary.ok:
        raise typer.Exit(1)
