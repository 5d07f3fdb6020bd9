"""Atomic file writes, the one implementation every stage uses.

A reader never sees a half-written file: each writer fills a temporary file beside the target and
renames it over the target (``os.replace`` is atomic within a folder). A killed process leaves at
most a temporary file, whose name contains :data:`TMP_MARK` so that a resumed job can recognise and
remove it (the prepare job does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TMP_MARK = ".tmp-"
# A write that failed for want of room: no space, over quota, over the process's file size limit (RLIMIT_FSIZE).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    """True for an ``OSError`` of a write that found no room (:data:`DISK_FULL_ERRNOS`)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ locks
LOCK_FILE = "pedetect.lock"


class FolderLocked(RuntimeError):
    """Another run holds the folder's lock; the message names it (pid, host, command, since when)."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe_holder(record: dict[str, Any]) -> str:
    parts = [f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"]
    if record.get("command"):
        parts.append(f"({record['command']})")
    if record.get("started"):
        parts.append(f"since {record['started']}")
    return " ".join(parts)


def _read_lock_record(fd: int) -> dict[str, Any] | None:
    """The JSON a lock file holds (None: empty or unreadable, e.g. a holder between open and write)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    try:
        record = json.loads(data) if data.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str],
    *,
    command: str,
    echo: Any = None,
    name: str = LOCK_FILE,
    what: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Hold ``FOLDER/pedetect.lock`` for the block: one writer per store or model folder.
    (``name``: another lock file in FOLDER, and ``what`` the output it guards, as messages name it;
    :func:`output_lock` locks one output this way.)

    The lock is ``fcntl.flock`` on the file (taken without waiting, released by the kernel when the
    process ends, however it ends), and the file records the holder: pid, host, command, start time.
    A second run raises :class:`FolderLocked` naming the holder before it touches anything. A lock
    file whose flock is free was left by a process that died: on this host it is taken over (and
    ``echo`` says so); one left by another host is refused (its process cannot be checked from here,
    and a network file system may not carry flock): the message says which file to delete.
    The file is removed when the block ends (and the folder, when this call made it and it is still empty).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    host = socket.gethostname()
    fd = -1
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a live holder
            record = _read_lock_record(fd) or {}
            os.close(fd)
            raise FolderLocked(
                f"{what or folder} is in use by another pedetect run: {_describe_holder(record)} holds {path}; "
                "wait for it to finish (two runs writing one folder would corrupt it)"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our flock: take the new one
            os.close(fd)
            continue
        break
    try:
        previous = _read_lock_record(fd)
        if previous is not None:
            if previous.get("host") != host:
                os.close(fd)
                fd = -1
                raise FolderLocked(
                    f"{path} was left by {_describe_holder(previous)}, another host, whose process cannot be checked "
                    f"from here: if that run is over, delete {path} and run again"
                )
            pid = previous.get("pid")
            state = (
                "no longer running"
                if not (isinstance(pid, int) and _process_alive(pid))
                else "its pid now belongs to another process"
            )
            if echo is not None:
                echo(f"note: took over the stale lock {path} of {_describe_holder(previous)} ({state})")
        record = {
            "pid": os.getpid(),
            "host": host,
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(fd)
        yield path
    finally:
        if fd >= 0:
            try:
                os.unlink(path)  # before unlocking: a waiting opener then sees another inode and retries
            except FileNotFoundError:
                pass
            os.close(fd)
        if created:  # a run that stopped before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def output_lock(
    target: str | os.PathLike[str], *, command: str, echo: Any = None
) -> contextlib.AbstractContextManager[Path]:
    """Hold a lock for one output, a file or a folder that must stay as its writer leaves it (a
    submission CSV, an export's ``--out`` copy, which must be empty when the copy starts): the lock
    file is ``.<name>.pedetect.lock`` beside it, so nothing is added inside the output itself."""
    target = Path(target)
    return folder_lock(target.parent, command=command, echo=echo, name=f".{target.name}.{LOCK_FILE}", what=target)
