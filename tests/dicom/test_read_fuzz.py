"""The read path under fuzzing: a bounded, seeded pass of the mutation loop in
tests/fuzz/read_fuzz.py (``make fuzz`` runs atheris for longer), every earlier finding replayed
from tests/data/fuzz_regressions, and the declared-size checks on inputs built here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from helpers.dicom import make_ct, phantom
from pedetect.dicom import read_files

TESTS = Path(__file__).resolve().parents[1]
HARNESS = TESTS / "fuzz" / "read_fuzz.py"
REGRESSIONS = TESTS / "data" / "fuzz_regressions"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_a_bounded_seeded_fuzz_pass_finds_nothing():
    """3,000 inputs (the 21 seeds, then mutations) in a process of its own (capped address space,
    a 5 s limit per input): each ends as a slice or a failure with a reason."""
    run = subprocess.run(
        [sys.executable, str(HARNESS), "--runs", "3000", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-3000:]
    inputs, slices, failures, findings = map(
        int, re.fullmatch(r"(\d+) inputs in [\d.]+ s: (\d+) slices, (\d+) failures, (\d+) findings", summary).groups()
    )
    assert (inputs, findings) == (3000, 0) and slices + failures == 3000
    assert slices >= 21  # every seed reads as a slice, and some mutations still do


def test_every_earlier_finding_is_now_a_failure_with_its_reason():
    run = subprocess.run(
        [sys.executable, str(HARNESS), "--replay", str(REGRESSIONS)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert run.returncode == 0, run.stdout
    outcomes = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
    assert outcomes == {
        # a 4 GB element length in a 2 kB file: CPython's file read allocated 4 GB up front
        "element_length_4gb.dcm": "failure: DICOM without pixel data (CT Image Storage (1.2.840.10008.5.1.4.1.1.2): truncated before the pixels?)",
        # a 32 x 32 slice whose JPEG 2000 frame says 40000 x 40000: decoded at 1.6 GB before pydicom noticed
        "j2k_frame_larger_than_header.dcm": "failure: pixel data unreadable (ValueError: the compressed frame is 40000x40000, the header says 32x32)",
        # a damaged JPEG 2000 frame on which gdcm (pydicom's first choice) aborted the process; OpenJPEG raises
        "j2k_gdcm_abort.dcm": "failure: pixel data unreadable (RuntimeError: Unable to decode as exceptions were raised by all available plugins: "
        "pylibjpeg: Error decoding the J2K data: failed to read the header)",
        # the Rust RLE decoder panics; pyo3's PanicException is a BaseException and escaped the read path
        "rle_decoder_panic.dcm": "failure: pixel data unreadable (PanicException: index out of bounds: the len is 2048 but the index is 2048)",
    }


def test_a_header_declaring_65535x65535x1000_frames_in_2kb_is_a_failure(tmp_path):
    path = make_ct(
        tmp_path / "liar", phantom(16, 16), study="1.2.826.0.1.3680043.8.498.3", series="1.2.826.0.1.3680043.8.498.3.1"
    )
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.save_as(path)
    assert path.stat().st_size < 2048
    series, failures = read_files([str(path)])
    assert series == [] and [f.reason for f in failures] == [
        "image too large: declared size 65535x65535 (1000 frame(s), 1 sample(s)) is over 16777216 values per slice"
    ]


def test_declared_pixels_longer_than_the_file_fail_before_decoding(tmp_path):
    """Native (uncompressed) data shorter than Rows x Columns: the slice fails, read or decoded."""
    path = make_ct(
        tmp_path / "short", phantom(64, 64), study="1.2.826.0.1.3680043.8.498.4", series="1.2.826.0.1.3680043.8.498.4.1"
    )
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 4000  # 32 MB declared, 8 kB present
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path)
    series, failures = read_files([str(path)])
    assert failures == [] and len(series) == 1 and len(series[0]) == 0
    assert [f.reason for f in series[0].failures] == ["pixel data unreadable (truncated: 8192 of 32000000 bytes)"]
