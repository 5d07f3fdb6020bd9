"""Hostile inputs: zips with unsafe member names, links, encryption, nested archives,
lying sizes and bombs; folders with link loops, special files, unreadable files and very deep
trees. Each case is built here, and each must end as a failure row with its reason while the rest
of the input is prepared and nothing is written outside the output folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

import pedetect.dicom.source as source_module
from helpers.dicom import ct_series
from pedetect.dicom import read_files
from pedetect.dicom.source import discover
from pedetect.store import SliceStore, prepare

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.22", "1.2.826.0.1.3680043.8.498.22.1"


def _files_under(root: Path) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def _prepare(source: Path, store: Path) -> tuple[list[str], dict[str, str]]:
    """Prepare ``source`` into ``store`` in process; the stored SOPInstanceUIDs and failure reasons by path."""
    prepare(source, store, progress=False, echo=lambda m: None)
    failures = pd.read_parquet(store / "failures.parquet")
    return SliceStore(store).slices["SOPInstanceUID"].tolist(), dict(zip(failures["path"], failures["reason"]))


def _another_slice(good: Path, z: float) -> bytes:
    """A valid slice of the same series at another position (a new SOPInstanceUID)."""
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, z]
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _headers_of(data: bytearray, name: str) -> tuple[int, int]:
    """Offsets of member ``name``'s central directory entry and local header in a zip's bytes."""
    encoded = name.encode()
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        if data[central + 46 : central + 46 + len(encoded)] == encoded:
            return central, struct.unpack_from("<I", data, central + 42)[0]
        central = data.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{name} not in the archive")


def _patch_sizes(data: bytearray, name: str, declared: int) -> None:
    """Make both headers of member ``name`` declare ``declared`` uncompressed bytes."""
    central, local = _headers_of(data, name)
    struct.pack_into("<I", data, central + 24, declared)
    struct.pack_into("<I", data, local + 22, declared)


def _set_encrypted(data: bytearray, name: str) -> None:
    """Set the 'encrypted' flag bit of member ``name`` in both headers."""
    central, local = _headers_of(data, name)
    data[central + 8] |= 1
    data[local + 6] |= 1


@pytest.fixture()
def good_series(tmp_path) -> list[Path]:
    return ct_series(tmp_path / "good", 3, rows=16, cols=16, study=STUDY, series=SERIES)


def test_hostile_zip_members_are_refused_and_nothing_is_extracted(tmp_path, good_series):
    zip_path = tmp_path / "work" / "in.zip"
    zip_path.parent.mkdir()
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as inner:
        inner.writestr("inner.dcm", _another_slice(good_series[0], 77.0))
    bomb = bytes(100 << 20)  # 100 MiB of zeros: deflates about 1,000-fold
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in good_series:
            archive.write(path, f"study/{path.name}")
        archive.writestr("../escape.dcm", _another_slice(good_series[0], 50.0))
        archive.writestr("/tmp/absolute.dcm", _another_slice(good_series[0], 51.0))
        archive.writestr("study/../../up.dcm", _another_slice(good_series[0], 52.0))
        link = zipfile.ZipInfo("study/link.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        archive.writestr("study/encrypted.dcm", _another_slice(good_series[0], 53.0))
        archive.write(nested, "study/nested.zip")
        archive.writestr(
            "study/shrunk.dcm", _another_slice(good_series[0], 54.0)
        )  # declares fewer bytes than it inflates to
        archive.writestr("study/swollen.dcm", _another_slice(good_series[0], 55.0))  # declares more
        archive.writestr("study/bomb.dcm", bomb)
    data = bytearray(zip_path.read_bytes())
    real = len(_another_slice(good_series[0], 54.0))
    _patch_sizes(data, "study/shrunk.dcm", real - 100)
    _patch_sizes(data, "study/swollen.dcm", real + 100)
    _set_encrypted(data, "study/encrypted.dcm")
    zip_path.write_bytes(bytes(data))
    before = _files_under(tmp_path)

    sops, reasons = _prepare(zip_path, tmp_path / "work" / "store")

    # The good series, with the three slices whose names climb out or are absolute: a member's name
    # is only a label, never a path (tests/dicom/test_read.py keeps that too), so they are read in memory.
    assert len(sops) == 6
    archive = str(zip_path.resolve())
    assert reasons == {
        f"{archive}::study/link.dcm": "zip member refused: a symbolic link",
        f"{archive}::study/encrypted.dcm": "zip member refused: encrypted",
        f"{archive}::study/nested.zip": "not DICOM: a zip archive (archives inside the input are not opened)",
        f"{archive}::study/shrunk.dcm": "zip member damaged or its declared size is wrong (Bad CRC-32 for file 'study/shrunk.dcm')",
        f"{archive}::study/swollen.dcm": f"zip member's declared size is wrong: {real + 100} bytes declared, {real} inflated",
        f"{archive}::study/bomb.dcm": reasons[f"{archive}::study/bomb.dcm"],
    }
    assert reasons[f"{archive}::study/bomb.dcm"].startswith(f"zip member refused: inflates {100 << 20} bytes from ")
    assert reasons[f"{archive}::study/bomb.dcm"].endswith("(more than 200 times: a zip bomb?)")
    new = _files_under(tmp_path) - before
    assert new and all(path.startswith(str(tmp_path / "work" / "store") + os.sep) for path in new), new
    assert (
        not Path("/tmp/absolute.dcm").exists()
        and not (tmp_path / "escape.dcm").exists()
        and not (tmp_path / "work" / "up.dcm").exists()
    )


def test_an_archive_past_its_total_size_cap_refuses_the_members_beyond(tmp_path, good_series, monkeypatch):
    sizes = [p.stat().st_size for p in good_series]
    monkeypatch.setattr(source_module, "MAX_ARCHIVE_BYTES", sizes[0] + sizes[1])  # room for two of the three
    zip_path = tmp_path / "in.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for k, path in enumerate(good_series):
            archive.write(path, f"{k}.dcm")
    sops, reasons = _prepare(zip_path, tmp_path / "store")
    assert len(sops) == 2
    assert reasons == {
        f"{zip_path.resolve()}::2.dcm": f"zip member refused: the archive's members exceed {sizes[0] + sizes[1]} bytes together"
    }


def _run_with_deadline(fn, seconds: float):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it has not returned in time."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a special file was opened?"
    return result["value"]


def test_special_files_and_link_loops_are_never_opened(tmp_path, good_series):
    root = tmp_path / "in"
    root.mkdir()
    for path in good_series:
        os.link(path, root / path.name)
    os.mkfifo(root / "fifo")
    os.mknod(root / "null_device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers (root)
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")
    (root / "folder_loop").symlink_to(".")
    (root / "dangling").symlink_to("nowhere")
    sops, reasons = _run_with_deadline(lambda: _prepare(root, tmp_path / "store"), 60)
    assert len(sops) == 3
    assert {Path(p).name: r for p, r in reasons.items()} == {
        "fifo": "a FIFO: never opened",
        "null_device": "a device file: never opened",
        "folder_loop": "a symbolic link to a folder: not followed",
        "loop_a": f"unreadable (OSError: [Errno 40] Too many levels of symbolic links: '{root / 'loop_a'}')",
        "loop_b": f"unreadable (OSError: [Errno 40] Too many levels of symbolic links: '{root / 'loop_b'}')",
        "dangling": f"unreadable (FileNotFoundError: [Errno 2] No such file or directory: '{root / 'dangling'}')",
    }


def test_a_fifo_given_as_the_input_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    series, failures = _run_with_deadline(lambda: read_files(discover(tmp_path / "fifo")), 30)
    assert series == [] and [(f.path, f.reason) for f in failures] == [(str(tmp_path / "fifo"), "a FIFO: never opened")]


def test_very_deep_trees(tmp_path, good_series):
    """A slice 1,200 folders down (deeper than Python's recursion limit) is read; a folder whose
    path is longer than the system's limit (4,096 bytes) is a failure, not a crash."""
    root = tmp_path / "in"
    root.mkdir()
    chain = [os.open(root, os.O_RDONLY)]  # a descriptor per level: past PATH_MAX only they reach the folders
    try:
        for depth in range(1, 1200 + 1500 + 1):
            os.mkdir("d", dir_fd=chain[-1])
            chain.append(os.open("d", os.O_RDONLY, dir_fd=chain[-1]))
            if depth in (1200, 2700):
                slice_file = os.open("slice.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=chain[-1])
                os.write(slice_file, good_series[0 if depth == 1200 else 1].read_bytes())
                os.close(slice_file)
        series, failures = read_files(discover(root))
    finally:  # removed here, bottom up: pytest's clean-up (shutil.rmtree) recurses and would overflow
        for parent, child in zip(chain[-2::-1], chain[:0:-1]):
            for entry in os.listdir(child):
                os.unlink(entry, dir_fd=child)
            os.close(child)
            os.rmdir("d", dir_fd=parent)
        os.close(chain[0])
    assert [len(s) for s in series] == [1]
    assert len(failures) == 1
    assert (
        failures[0].reason == f"path too long to open ({len(failures[0].path)} characters)"
        and len(failures[0].path) >= 4096
    )


def _read_as_nobody(folder: Path) -> tuple[list[int], dict[str, str]]:
    """``read_files(discover(folder))`` in a forked child that runs as user 'nobody' when this is root
    (so that permissions apply), as the series' lengths and the failures' reasons by path."""
    read_files(discover(folder))  # import everything lazily imported while it still can be read
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            series, failures = read_files(discover(folder))
            os.write(writer, json.dumps([[len(s) for s in series], {f.path: f.reason for f in failures}]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    assert output, "the child read nothing"
    lengths, reasons = json.loads(output)
    return lengths, reasons


def test_an_unreadable_file_and_folder(good_series):
    """chmod 000 stops every user but root, so when the suite runs as root the read runs in a child
    process demoted to user 'nobody': a real permission failure either way, never skipped."""
    shared = Path(tempfile.mkdtemp(prefix="pedetect_perm_"))  # outside root's private pytest folder
    locked_file, locked_folder = shared / "locked.dcm", shared / "locked_folder"
    try:
        shared.chmod(0o755)
        for path in good_series:
            (shared / path.name).write_bytes(path.read_bytes())
            (shared / path.name).chmod(0o644)
        locked_file.write_bytes(_another_slice(good_series[0], 60.0))
        locked_file.chmod(0)
        locked_folder.mkdir()
        (locked_folder / "inside.dcm").write_bytes(_another_slice(good_series[0], 61.0))
        locked_folder.chmod(0)
        lengths, reasons = _read_as_nobody(shared)
        assert lengths == [3]
        assert reasons == {
            str(locked_file): f"unreadable (PermissionError: [Errno 13] Permission denied: '{locked_file}')",
            str(locked_folder): "a folder that could not be listed (PermissionError: Permission denied)",
        }
    finally:
        locked_file.chmod(0o600)
        locked_folder.chmod(0o700)
        shutil.rmtree(shared)
