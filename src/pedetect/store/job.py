"""The prepare job: DICOM (folder or zip) → slice store, resumable, on processes or a Dask cluster.

1. discover: every file under INPUT (or member of the zip);
2. scan: read each file's header (pixel data not decoded) → UIDs, geometry; unusable files are failures;
3. group by SeriesInstanceUID (duplicate SOPInstanceUIDs are failures); a series whose marker exists
   and whose file fingerprint (paths, sizes, mtimes) and settings match is already done;
4. per series (one task): order, decode, window, encode and append each slice to a temporary data
   file, rename it into place, then write the marker (the series' metadata, slice table and failures);
5. assemble slices.parquet, series.parquet and failures.parquet from the markers.

Scanning, grouping, ordering, decoding and windowing are the DICOM read path of
:mod:`pedetect.dicom.read`, which ``pedetect predict`` reads through too; this module adds the tasks,
the runner, the markers and the store's tables. Killed at any point, a rerun redoes only series
without a valid marker.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import as_completed as completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pedetect.dicom.guard import DEFAULT_DECODE_TIMEOUT_S, DecodeGuard
from pedetect.dicom.header import SliceHeader, describe_error
from pedetect.dicom.order import plan_series
from pedetect.dicom.read import SCAN_CHUNK, decode_series, scan_files, series_size, slice_failure
from pedetect.dicom.series import FAILURE_COLUMNS, Failure, group_headers, series_metadata
from pedetect.dicom.source import discover
from pedetect.io import (
    TMP_MARK,
    atomic_path,
    folder_lock,
    is_disk_full,
    read_json,
    write_json_atomic,
    write_parquet_atomic,
)
from pedetect.labels import SERIES, SOP, STUDY
from pedetect.store.config import PrepareConfig
from pedetect.store.format import (
    FAILURES_FILE,
    FORMAT_VERSION,
    MARKER_SUFFIX,
    SERIES_DIR,
    SERIES_FILE,
    SETTINGS_FILE,
    SLICES_FILE,
    data_path,
    encode_frame,
    jpeg_params,
    marker_path,
    series_name,
)

# SOPInstanceUID is the slice's key: the UID of a single-frame file, ``<SOPInstanceUID>#<frame>`` for a
# frame of an Enhanced CT file, whose frame number (from 1) is also in ``frame`` (null otherwise).
SLICE_COLUMNS = (
    STUDY,
    SERIES,
    SOP,
    "slice_index",
    "z",
    "instance_number",
    "frame",
    "height",
    "width",
    "file",
    "offset",
    "length",
    "source",
)


class StoreSettingsError(ValueError):
    """The store was made with other settings."""


@dataclass
class PrepareSummary:
    store: Path
    series_total: int = 0
    series_done_before: int = 0
    series_prepared: int = 0
    series_failed: int = 0  # tasks that crashed (retried on the next run)
    slices_total: int = 0
    slices_prepared: int = 0
    failures: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    files_seen: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.series_failed == 0

    def text(self) -> str:
        rate = self.slices_prepared / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"slice store {self.store}: {self.series_total} series, {self.slices_total} slices "
            f"({self.series_prepared} series / {self.slices_prepared} slices prepared now in {self.seconds:.1f} s, {rate:.1f} slices/s; "
            f"{self.series_done_before} series already done)",
        ]
        if self.failures or self.series_failed:
            lines.append(
                f"lost: {self.failures} file(s) or slice(s) in {FAILURES_FILE}"
                + (f", {self.series_failed} series crashed (rerun to retry)" if self.series_failed else "")
            )
            for reason, count in self.failure_reasons.most_common(10):
                lines.append(f"  {count:>7} × {reason}")
            if len(self.failure_reasons) > 10:
                lines.append(f"  … {len(self.failure_reasons) - 10} other reasons")
        else:
            lines.append("lost: nothing")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Tasks (run in worker processes or on Dask workers: plain picklable arguments, no shared state)


@dataclass
class SeriesTask:
    store: str
    name: str
    headers: list[SliceHeader]
    settings: dict
    fingerprint: str
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S  # seconds per slice; 0: decode in this process, no limit


# One decoding child per process that runs series tasks (pedetect.dicom.guard), kept between tasks.
_GUARDS: dict[tuple[int, float], DecodeGuard] = {}


def _decoder(limit: float) -> Callable[..., Any] | None:
    """What decodes this task's slices: the process's :class:`DecodeGuard` for ``limit`` seconds, or
    None (in process) when there is no limit."""
    if not limit or limit <= 0:
        return None
    key = (os.getpid(), float(limit))  # a forked worker must not share its parent's child
    guard = _GUARDS.get(key)
    if guard is None:
        if not _GUARDS:
            atexit.register(_close_guards)
        guard = _GUARDS[key] = DecodeGuard(limit)
    return guard.read


def _close_guards() -> None:
    for (pid, _), guard in list(_GUARDS.items()):
        if pid == os.getpid():
            guard.close()


def prepare_series(task: SeriesTask) -> dict:
    """Write one series (data file, then marker); returns a short result for the progress report."""
    try:
        return _prepare_series(task)
    except Exception as error:  # the series stays unfinished (no marker) and is retried on the next run
        if isinstance(error, OSError) and is_disk_full(error):
            raise  # every later series would fail the same way: stop the job, say so
        return {
            "series": task.headers[0].series,
            "name": task.name,
            "error": describe_error(error, 300),
            "n_slices": 0,
            "failures": [],
            "n_headers": len(task.headers),
        }


def _prepare_series(task: SeriesTask) -> dict:
    store = Path(task.store)
    settings = task.settings
    windows = settings["windows"]
    image_size = settings["image_size"]
    params = jpeg_params(settings["jpeg_quality"], settings["jpeg_sampling"])
    plan = plan_series(task.headers)
    failures = [Failure.of(h, reason) for h, reason in plan.rejected]
    final = data_path(store, task.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    marker_path(store, task.name).unlink(missing_ok=True)  # a stale marker must never describe new data
    kept: list[SliceHeader] = []
    z: list[float] = []
    offsets: list[int] = []
    lengths: list[int] = []
    with atomic_path(final, fsync=True) as tmp, open(tmp, "wb") as f:
        position = 0
        for i, image, failure in decode_series(
            plan, windows, image_size, bgr=True, reader=_decoder(task.decode_timeout)
        ):  # B,G,R for the JPEG encoder
            header = plan.slices[i]
            if failure is None:
                assert image is not None  # decode_series yields an image whenever there is no failure
                try:
                    frame = encode_frame(image, params)
                except Exception as error:  # this slice only
                    failure = slice_failure(header, error)
            if failure is not None:
                failures.append(failure)
                continue
            f.write(frame)
            offsets.append(position)
            lengths.append(len(frame))
            position += len(frame)
            kept.append(header)
            z.append(float(plan.z[i]))
    height, width = series_size(plan, image_size)
    meta = series_metadata(plan, kept, z, height=height, width=width, n_failed=len(plan.slices) - len(kept))
    marker = {
        "format": FORMAT_VERSION,
        "settings": settings_key(settings),
        "fingerprint": task.fingerprint,
        "file": f"{SERIES_DIR}/{final.name}",
        "meta": meta,
        "slices": {
            SOP: [h.sop for h in kept],
            "instance_number": [h.instance_number for h in kept],
            "frame": [h.extra["frame"]["number"] if "frame" in h.extra else None for h in kept],
            "offset": offsets,
            "length": lengths,
            "source": [h.label for h in kept],
        },
        "failures": [failure.as_record() for failure in failures],
    }
    write_json_atomic(marker_path(store, task.name), marker, indent=None)
    return {
        "series": meta[SERIES],
        "name": task.name,
        "n_slices": len(kept),
        "failures": marker["failures"],
        "n_headers": len(task.headers),
    }


# --------------------------------------------------------------------------------------------------
# Running tasks: in process, on local processes, or on a Dask cluster


class Runner:
    """``imap(fn, items)`` yields results as tasks finish (any order)."""

    def __init__(self, workers: int = 1, scheduler: str | None = None):
        self.workers = max(1, int(workers))
        self.scheduler = scheduler
        self._pool: Any = None
        self._client: Any = None

    def __enter__(self) -> Runner:
        if self.scheduler:
            from distributed import Client  # Dask (slow to import) only with --scheduler

            self._client = Client(self.scheduler)
        elif self.workers > 1:
            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    @property
    def description(self) -> str:
        if self.scheduler:
            return f"Dask cluster at {self.scheduler}"
        return f"{self.workers} worker process(es)" if self.workers > 1 else "1 worker (in process)"

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        if not items:
            return
        if self._client is not None:
            from distributed import as_completed

            futures = self._client.map(fn, list(items), pure=False)
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                self._client.cancel(futures)
        elif self._pool is not None:
            futures = [self._pool.submit(fn, item) for item in items]
            try:
                for future in completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()
        else:
            for item in items:
                yield fn(item)


# --------------------------------------------------------------------------------------------------
# The job


def settings_key(settings: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        **{k: settings[k] for k in ("image_size", "windows", "jpeg_quality", "jpeg_sampling")},
    }


def fingerprint(headers: Iterable[SliceHeader]) -> str:
    digest = hashlib.sha1()
    for header in sorted(headers, key=lambda h: h.label):
        digest.update(
            f"{header.label}\0{header.size}\0{header.mtime_ns}\0{header.sop}\n".encode("utf-8", "surrogateescape")
        )
    return digest.hexdigest()


def _settings(config: PrepareConfig) -> dict:
    return {
        "image_size": config.image_size,
        "windows": [list(w) for w in config.window_tuples()],
        "window_names": [w.name for w in config.windows],
        "jpeg_quality": config.jpeg_quality,
        "jpeg_sampling": config.jpeg_sampling,
    }


def _check_settings(store: Path, settings: dict) -> None:
    path = store / SETTINGS_FILE
    wanted = settings_key(settings)
    if path.exists():
        have = read_json(path)
        if settings_key(have) != wanted:
            changed = sorted(k for k in wanted if settings_key(have).get(k) != wanted[k])
            raise StoreSettingsError(
                f"{store} was prepared with other settings ({', '.join(f'{k}: {have.get(k)!r} there, {settings.get(k)!r} now' for k in changed)}); "
                "prepare into a new --out folder, or delete this one"
            )
        return
    write_json_atomic(
        path,
        {
            **settings,
            "format": FORMAT_VERSION,
            "channels": "R,G,B = windows in order",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _clean_tmp(store: Path) -> None:
    for folder in (store, store / SERIES_DIR):
        if folder.is_dir():
            for entry in os.scandir(folder):
                if TMP_MARK in entry.name and entry.is_file():
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass


def _progress(total: int, unit: str, desc: str, enabled: bool) -> Any:
    return tqdm(
        total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True, smoothing=0.05
    )


def _valid_marker(store: Path, name: str, fp: str, settings: dict) -> dict | None:
    path = marker_path(store, name)
    if not path.exists():
        return None
    try:
        marker = read_json(path)
    except (OSError, ValueError):
        return None
    if marker.get("fingerprint") != fp or marker.get("settings") != settings_key(settings):
        return None
    if not (store / marker["file"]).exists():
        return None
    return marker


def prepare(
    input_path: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    image_size: int | None = None,
    config: PrepareConfig | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S,
) -> PrepareSummary:
    """Prepare (or finish preparing) the slice store ``out`` from the DICOM files in ``input_path``.

    ``decode_timeout``: seconds one slice may take to decode before its decoder process is killed
    and the slice is a failure (:mod:`pedetect.dicom.guard`); 0 decodes in the worker, without a limit."""
    started = time.perf_counter()
    config = (config or PrepareConfig()).model_copy()
    if image_size is not None:
        config.image_size = image_size
    settings = _settings(config)
    store = Path(out)
    store.mkdir(parents=True, exist_ok=True)
    # One writer per store: a second run would delete the first's temporary files and rewrite its tables.
    with folder_lock(store, command="pedetect prepare", echo=echo):
        return _prepare_locked(
            input_path,
            store,
            config,
            settings,
            workers=workers,
            scheduler=scheduler,
            progress=progress,
            echo=echo,
            started=started,
            decode_timeout=decode_timeout,
        )


def _prepare_locked(
    input_path: str | Path,
    store: Path,
    config: PrepareConfig,
    settings: dict,
    *,
    workers: int,
    scheduler: str | None,
    progress: bool,
    echo: Callable[[str], None],
    started: float,
    decode_timeout: float,
) -> PrepareSummary:
    _check_settings(store, settings)
    (store / SERIES_DIR).mkdir(exist_ok=True)
    _clean_tmp(store)
    summary = PrepareSummary(store=store)

    sources = discover(input_path)
    summary.files_seen = len(sources)
    with Runner(workers, scheduler) as runner:
        echo(f"prepare: {len(sources)} file(s) in {input_path}, on {runner.description}")
        headers: list[SliceHeader] = []
        scan_failures: list[dict] = []
        chunk = max(16, min(SCAN_CHUNK, len(sources) // (runner.workers * 4) + 1))
        chunks = [sources[i : i + chunk] for i in range(0, len(sources), chunk)]
        with _progress(len(sources), "file", "scan", progress) as bar:
            for found, failed in runner.imap(scan_files, chunks):
                headers.extend(found)
                scan_failures.extend(failure.as_record() for failure in failed)
                bar.update(len(found) + len(failed))
        headers.sort(key=lambda h: h.label)  # results arrive in any order; keep runs deterministic
        groups, duplicates = group_headers(headers)
        scan_failures.extend(f.as_record() for f in duplicates)

        tasks: list[SeriesTask] = []
        names: list[str] = []
        for series_uid, group in groups.items():
            name = series_name(series_uid)
            names.append(name)
            fp = fingerprint(group)
            if _valid_marker(store, name, fp, settings) is not None:
                summary.series_done_before += 1
                continue
            tasks.append(SeriesTask(os.fspath(store), name, group, settings, fp, decode_timeout))
        tasks.sort(key=lambda t: -len(t.headers))  # longest first: better balance at the end
        if (
            tasks
        ):  # the tables are rewritten below; until then the store is not readable (a full disk stops it in between)
            (store / SLICES_FILE).unlink(missing_ok=True)
        summary.series_total = len(groups)
        todo = sum(len(t.headers) for t in tasks)
        crashed: list[dict] = []
        if summary.series_done_before:
            echo(f"prepare: {summary.series_done_before} of {len(groups)} series already done; {len(tasks)} to go")
        with _progress(todo, "slice", "prepare", progress) as bar:
            for result in runner.imap(prepare_series, tasks):
                if "error" in result:
                    summary.series_failed += 1
                    crashed.append(result)
                else:
                    summary.series_prepared += 1
                    summary.slices_prepared += result["n_slices"]
                bar.update(result["n_headers"])

    for result in crashed:
        group = groups[result["series"]]
        scan_failures.append(
            Failure.of(group[0], f"series not prepared ({result['error']}); rerun to retry").as_record()
            | {"path": os.path.dirname(group[0].label) or group[0].label}
        )
    _assemble(store, names, scan_failures, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _assemble(store: Path, names: list[str], extra_failures: list[dict], summary: PrepareSummary) -> None:
    """Write slices.parquet, series.parquet and failures.parquet from every marker in the store."""
    slice_frames, series_rows, failures = [], [], list(extra_failures)
    marker_names = sorted(
        entry.name[: -len(MARKER_SUFFIX)]
        for entry in os.scandir(store / SERIES_DIR)
        if entry.name.endswith(MARKER_SUFFIX) and TMP_MARK not in entry.name
    )
    for name in marker_names:
        try:
            marker = read_json(marker_path(store, name))
        except (OSError, ValueError):
            continue
        meta, table = marker["meta"], marker["slices"]
        failures.extend(marker["failures"])
        n = len(table[SOP])
        series_rows.append({**meta, "file": marker["file"]})
        if n == 0:
            continue
        slice_frames.append(
            pd.DataFrame(
                {
                    STUDY: [meta[STUDY]] * n,
                    SERIES: [meta[SERIES]] * n,
                    SOP: table[SOP],
                    "slice_index": np.arange(n, dtype=np.int32),
                    "z": np.asarray(meta["z"], dtype=np.float64),
                    "instance_number": pd.array(table["instance_number"], dtype="Int64"),
                    "frame": pd.array(table.get("frame", [None] * n), dtype="Int64"),
                    "height": np.full(n, meta["height"], dtype=np.int32),
                    "width": np.full(n, meta["width"], dtype=np.int32),
                    "file": [marker["file"]] * n,
                    "offset": np.asarray(table["offset"], dtype=np.int64),
                    "length": np.asarray(table["length"], dtype=np.int64),
                    "source": table["source"],
                }
            )
        )
    if slice_frames:
        slices = pd.concat(slice_frames, ignore_index=True)
    else:
        slices = pd.DataFrame(
            {
                c: pd.Series(
                    dtype="int64"
                    if c in ("slice_index", "offset", "length", "height", "width")
                    else "Int64"
                    if c == "frame"
                    else ("float64" if c == "z" else "object")
                )
                for c in SLICE_COLUMNS
            }
        )
    series = (
        pd.DataFrame(series_rows)
        if series_rows
        else pd.DataFrame(columns=[STUDY, SERIES, "n_slices", "height", "width", "file"])
    )
    failure_frame = (
        pd.DataFrame(failures, columns=list(FAILURE_COLUMNS))
        if failures
        else pd.DataFrame({c: pd.Series(dtype="object") for c in FAILURE_COLUMNS})
    )
    write_parquet_atomic(store / SERIES_FILE, series)
    write_parquet_atomic(store / FAILURES_FILE, failure_frame)
    write_parquet_atomic(store / SLICES_FILE, slices)  # last: its presence means the store is readable
    summary.series_total = len(series)
    summary.slices_total = len(slices)
    summary.failures = len(failure_frame)
    summary.failure_reasons = Counter(_reason_kind(r) for r in failure_frame["reason"].tolist())


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary (drop the variable detail in parentheses)."""
    head = reason.split(" (", 1)[0]
    return head if len(head) > 8 else reason
