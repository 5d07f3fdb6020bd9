"""Where DICOM bytes come from: files on disk, or members of a zip read in place.

A *source* is either a path (``str`` / ``os.PathLike``) or a :class:`ZipMember`. Zip members are
read into memory from the archive; nothing is ever extracted to a path taken from the archive.
Archives are opened lazily and cached per process (safe after ``fork``).

Inputs come from anywhere, so a source that must not be read raises :class:`SourceError` with the
reason its failure row records (docs/reliability.md lists every case):

- a path that is not a regular file (a FIFO would block the reader forever, a device file could
  act on being opened) is never opened: it is checked with ``stat`` first and again with ``fstat``
  on a non-blocking descriptor, in case it was swapped in between;
- a symlink member, an encrypted member, a member
  whose declared size exceeds :data:`MAX_MEMBER_BYTES` or :data:`MAX_COMPRESSION_RATIO` times its
  compressed size (a zip bomb), a member past :data:`MAX_ARCHIVE_BYTES` of the archive's members
  (in name order), and a member whose data is not the size its header declares.

A member's name is only a label (``archive::name``), never a path: a name that is absolute or
climbs out with ``..`` is read in memory like any other, and cannot place a file anywhere.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

DICM_OFFSET = 128
HEAD_BYTES = 132
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record

# Caps on what one zip may make the reader hold: a member of at most 1 GiB (an Enhanced CT of 2,000
# 512 × 512 frames), inflated at most 200-fold (CT slices deflate 2-10-fold; a zip bomb ~1,000-fold),
# and 64 GiB over the archive's members together (a few thousand studies).
MAX_MEMBER_BYTES = 1 << 30
MAX_COMPRESSION_RATIO = 200
MAX_ARCHIVE_BYTES = 64 << 30


class SourceError(Exception):
    """A source that is not read; ``reason`` is what its failure row records."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, order=True)
class ZipMember:
    """One member of a zip archive, named as ``archive::member`` in reports."""

    archive: str
    name: str

    def __str__(self) -> str:
        return f"{self.archive}::{self.name}"


Source = Union[str, "os.PathLike[str]", ZipMember]


class _Archive:
    """An open zip and, from its central directory alone, why each member must not be read."""

    def __init__(self, path: str):
        self.zip = zipfile.ZipFile(path)
        self.refused: dict[str, str] = {}
        total = 0
        for info in sorted(self.zip.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            total += info.file_size
            reason = _member_problem(info) or (
                f"zip member refused: the archive's members exceed {MAX_ARCHIVE_BYTES} bytes together"
                if total > MAX_ARCHIVE_BYTES
                else None
            )
            if reason:
                self.refused[info.filename] = reason

    def info(self, name: str) -> zipfile.ZipInfo:
        if name in self.refused:
            raise SourceError(self.refused[name])
        return self.zip.getinfo(name)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member must not be read, from its directory entry; None when it may be."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return "zip member refused: a symbolic link"
    if info.flag_bits & 0x1:
        return "zip member refused: encrypted"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"zip member refused: declares {info.file_size} bytes (at most {MAX_MEMBER_BYTES})"
    if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        return (
            f"zip member refused: inflates {info.file_size} bytes from {info.compress_size} "
            f"(more than {MAX_COMPRESSION_RATIO} times: a zip bomb?)"
        )
    return None


_ARCHIVES: dict[str, tuple[int, _Archive]] = {}


def _archive(path: str) -> _Archive:
    pid = os.getpid()
    cached = _ARCHIVES.get(path)
    if cached is None or cached[0] != pid:
        _ARCHIVES[path] = (pid, _Archive(path))
    return _ARCHIVES[path][1]


def source_label(source: Source) -> str:
    """How a source is named in failures and logs."""
    return str(source) if isinstance(source, ZipMember) else os.fspath(source)


def _not_a_file(path: str, mode: int) -> str:
    """The reason a path that is not a regular file is not read."""
    if stat.S_ISDIR(mode):
        if os.path.islink(path):
            return "a symbolic link to a folder: not followed"
        try:
            os.scandir(path).close()
        except OSError as error:
            return f"a folder that could not be listed ({type(error).__name__}: {error.strerror or error})"
        return "a folder, not a file"
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device file"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"{kind}: never opened"


class BoundedFile:
    """A file whose ``read(n)`` never asks for more than the bytes it has left: CPython allocates
    ``n`` bytes up front, so a header declaring a 4 GB element in a 2 kB file would cost 4 GB."""

    def __init__(self, file: BinaryIO, size: int):
        self.file = file
        self.size = size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.size - self.file.tell())
        return self.file.read(left if n is None or n < 0 or n > left else n)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> BoundedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def open_path(path: str | os.PathLike[str]) -> BoundedFile:
    """A regular file opened for reading; anything else raises :class:`SourceError` without being
    opened for real (the descriptor is non-blocking, and checked again before it is used)."""
    path = os.fspath(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise SourceError(_not_a_file(path, mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for something else since the stat
            raise SourceError(_not_a_file(path, st.st_mode))
        return BoundedFile(os.fdopen(fd, "rb"), st.st_size)
    except BaseException:
        os.close(fd)
        raise


def _read_member(source: ZipMember, n: int | None = None) -> bytes:
    archive = _archive(source.archive)
    info = archive.info(source.name)
    try:
        with archive.zip.open(info) as f:
            data = f.read(info.file_size if n is None else min(n, info.file_size))
    except zipfile.BadZipFile as error:  # the data inflates to more than declared (CRC), or is damaged
        raise SourceError(f"zip member damaged or its declared size is wrong ({error})") from None
    except RuntimeError as error:  # zipfile's own refusals (encryption, unknown methods)
        raise SourceError(f"zip member unreadable ({error})") from None
    if n is None and len(data) != info.file_size:
        raise SourceError(f"zip member's declared size is wrong: {info.file_size} bytes declared, {len(data)} inflated")
    return data


def read_bytes(source: Source) -> bytes:
    """The whole content of a source."""
    if isinstance(source, ZipMember):
        return _read_member(source)
    with open_path(source) as f:
        return f.read()


def read_head(source: Source, n: int = HEAD_BYTES) -> bytes:
    """The first ``n`` bytes of a source (fewer when it is shorter)."""
    if isinstance(source, ZipMember):
        return _read_member(source, n)
    with open_path(source) as f:
        return f.read(n)


def source_stat(source: Source) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a source; for zip members the stored size and the archive's mtime.
    Raises :class:`SourceError` for a source that must not be read."""
    if isinstance(source, ZipMember):
        info = _archive(source.archive).info(source.name)
        return int(info.file_size), int(os.stat(source.archive).st_mtime_ns) ^ (info.CRC or 0)
    try:
        st = os.stat(source)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise SourceError(f"path too long to open ({len(os.fspath(source))} characters)") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(_not_a_file(os.fspath(source), st.st_mode))
    return int(st.st_size), int(st.st_mtime_ns)


def is_zip_data(head: bytes) -> bool:
    """True when bytes start like a zip archive."""
    return head[:4] in ZIP_MAGIC


def looks_like_dicom(head: bytes) -> bool:
    """True when the first bytes are a DICOM file: the ``DICM`` marker after the 128-byte preamble,
    or (older files without preamble) a first element of group 0x0002 or 0x0008 that parses."""
    if len(head) >= HEAD_BYTES and head[DICM_OFFSET:HEAD_BYTES] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR little endian
    (length,) = struct.unpack("<I", head[4:8])
    return length < 1 << 16  # implicit VR little endian: a short first value


def is_zip(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


def discover(input_path: str | Path) -> list[Source]:
    """Every candidate under a folder (any nesting, any names, sorted) or every member of a zip.

    Folders are walked without following symbolic links (so a link loop cannot trap the walk) and
    without recursion (so depth is no limit). Everything that is not a folder is a candidate, links
    and special files included: :func:`source_stat` gives each that is not a readable regular file
    its failure, and a folder that cannot be listed is a candidate for the same reason. Files are
    recognised as DICOM (or not) by content later.
    """
    path = Path(input_path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if is_zip(path):
            archive = os.fspath(path.resolve())
            names = [info.filename for info in zipfile.ZipFile(archive).infolist() if not info.is_dir()]
            return [ZipMember(archive, name) for name in sorted(names)]
        return [os.fspath(path)]
    files: list[Source] = []
    files.extend(sorted(_walk(os.fspath(path))))
    return files


def _walk(root: str) -> Iterator[str]:
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            yield folder  # not listable (permissions, a path too long): its own failure
            continue
        for entry in entries:
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            if is_folder:
                folders.append(entry.path)
            else:
                yield entry.path
