"""Where DICOM bytes come from: files on disk, or members of a zip read in place.

A *source* is either a path (``str`` / ``os.PathLike``) or a :class:`ZipMember`. Zip members are
read into memory from the archive; nothing is ever extracted to a path taken from the archive.
Archives are opened lazily and cached per process (safe after ``fork``).
"""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

DICM_OFFSET = 128
HEAD_BYTES = 132


@dataclass(frozen=True, order=True)
class ZipMember:
    """One member of a zip archive, named as ``archive::member`` in reports."""

    archive: str
    name: str

    def __str__(self) -> str:
        return f"{self.archive}::{self.name}"


Source = Union[str, "os.PathLike[str]", ZipMember]

_ARCHIVES: dict[str, tuple[int, zipfile.ZipFile]] = {}


def _archive(path: str) -> zipfile.ZipFile:
    pid = os.getpid()
    cached = _ARCHIVES.get(path)
    if cached is None or cached[0] != pid:
        _ARCHIVES[path] = (pid, zipfile.ZipFile(path))
    return _ARCHIVES[path][1]


def source_label(source: Source) -> str:
    """How a source is named in failures and logs."""
    return str(source) if isinstance(source, ZipMember) else os.fspath(source)


def read_bytes(source: Source) -> bytes:
    """The whole content of a source."""
    if isinstance(source, ZipMember):
        return _archive(source.archive).read(source.name)
    with open(source, "rb") as f:
        return f.read()


def read_head(source: Source, n: int = HEAD_BYTES) -> bytes:
    """The first ``n`` bytes of a source (fewer when it is shorter)."""
    if isinstance(source, ZipMember):
        with _archive(source.archive).open(source.name) as f:
            return f.read(n)
    with open(source, "rb") as f:
        return f.read(n)


def source_stat(source: Source) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a source; for zip members the stored size and the archive's mtime."""
    if isinstance(source, ZipMember):
        info = _archive(source.archive).getinfo(source.name)
        return int(info.file_size), int(os.stat(source.archive).st_mtime_ns) ^ (info.CRC or 0)
    st = os.stat(source)
    return int(st.st_size), int(st.st_mtime_ns)


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
    """Every candidate file under a folder (any nesting, any names, sorted) or every member of a zip.

    Directories, symlinks to directories and special files are skipped; everything else is a
    candidate, recognised as DICOM (or not) by content later.
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if is_zip(path):
            archive = os.fspath(path.resolve())
            names = [info.filename for info in zipfile.ZipFile(archive).infolist() if not info.is_dir()]
            return [ZipMember(archive, name) for name in sorted(names)]
        return [os.fspath(path)]
    return sorted(_walk(path))


def _walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                mode = os.stat(full).st_mode
            except OSError:
                yield full  # a dangling link: reported as unreadable later
                continue
            if stat.S_ISREG(mode):
                yield full
