"""Atomic file writes, the one implementation every stage uses.

A reader never sees a half-written file: each writer fills a temporary file beside the target and
renames it over the target (``os.replace`` is atomic within a folder). A killed process leaves at
most a temporary file, whose name contains :data:`TMP_MARK` so that a resumed job can recognise and
remove it (the prepare job does).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """A unique name beside ``path`` (hidden, marked with :data:`TMP_MARK`, unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, rename it
    over ``path`` (after flushing it to disk when ``fsync``: a power cut keeps the old or the new).

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, and paths, as JSON values."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, fsync: bool = False) -> None:
    """``obj`` as JSON (``indent=None``: compact, one line), ending with a newline."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(obj, indent=indent, separators=separators, default=_json_default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, "rb") as handle:
        return json.loads(handle.read())


def write_csv_atomic(frame, path: str | os.PathLike[str], **to_csv_kwargs) -> Path:
    """A pandas DataFrame as CSV (no index unless asked)."""
    to_csv_kwargs.setdefault("index", False)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        frame.to_csv(handle, **to_csv_kwargs)
    return Path(path)


def write_parquet_atomic(path: str | os.PathLike[str], frame) -> None:
    """A pandas DataFrame as Parquet (no index)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read a megabyte at a time: what a later output was made from."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
