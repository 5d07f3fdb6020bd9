"""A per-file time limit in prepare (issue #22): a slice whose decoding takes longer than
``--decode-timeout`` becomes a failure row with that reason, its decoder process is killed and
replaced, and the batch goes on.

The slow case is real: a 2048 x 2048 slice of noise in JPEG 2000 Lossless, which OpenJPEG takes
about a second to decode (noise does not compress, so every code block is decoded in full), under
a limit of a fraction of that; the synthetic slices beside it decode in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from dicom_fixtures import make_ct
from train_fixtures import ROOT, pedetect_command

from pedetect.dicom.guard import DecodeGuard
from pedetect.dicom.header import DicomError
from pedetect.dicom.read import read_slice, scan_files

SIZE, SLICES, STUDIES = 48, 8, 2
LIMIT = 0.25
SLOW_SERIES = "1.2.826.0.1.3680043.8.498.99.1"


def pedetect(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(pedetect_command(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def slow_slice(path: Path) -> Path:
    """A real, valid CT slice that takes about a second to decode."""
    from pydicom.uid import JPEG2000Lossless

    noise = np.random.default_rng(0).integers(0, 4000, size=(2048, 2048)).astype(np.int16)
    make_ct(path, noise, study="1.2.826.0.1.3680043.8.498.99", series=SLOW_SERIES)
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def dicom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    result = pedetect("synth", root / "synth", "-n", STUDIES, "--slices", SLICES, "--size", SIZE, "--no-progress", "--seed", 4)
    assert result.returncode == 0, result.stderr
    slow_slice(root / "synth" / "train" / "slow.dcm")
    return root / "synth" / "train"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slice_that_decodes_past_the_limit_is_a_failure_and_the_batch_goes_on(dicom, tmp_path, workers):
    started = time.monotonic()
    result = pedetect("prepare", dicom, "--out", tmp_path / "store", "--decode-timeout", LIMIT, "--workers", workers, "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr  # 1: something was lost
    assert "Traceback" not in result.stderr
    failures = pd.read_parquet(tmp_path / "store" / "failures.parquet")
    assert failures["path"].tolist() == [str(dicom / "slow.dcm")]
    assert failures["reason"].tolist() == [f"decoding took longer than {LIMIT:g} s (the per-file time limit, --decode-timeout): stopped"]
    slices = pd.read_parquet(tmp_path / "store" / "slices.parquet")
    assert len(slices) == STUDIES * SLICES and SLOW_SERIES not in set(slices["SeriesInstanceUID"])
    assert "1 × decoding took longer than" in result.stdout
    assert time.monotonic() - started < 120


def test_the_same_slice_is_stored_without_the_tight_limit(dicom, tmp_path):
    """The slice is valid: under the default limit it is read like any other."""
    result = pedetect("prepare", dicom, "--out", tmp_path / "store", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    slices = pd.read_parquet(tmp_path / "store" / "slices.parquet")
    assert len(slices) == STUDIES * SLICES + 1 and SLOW_SERIES in set(slices["SeriesInstanceUID"])


def test_the_guard_stops_the_decoder_rather_than_waiting_for_it_and_starts_a_new_one(dicom):
    headers, failures = scan_files([str(dicom / "slow.dcm"), *sorted(map(str, dicom.rglob("*.dcm")))[:1]])
    assert failures == []
    slow, quick = (headers[0], headers[1]) if headers[0].series == SLOW_SERIES else (headers[1], headers[0])
    t = time.monotonic()
    read_slice(slow)  # in this process: as long as it takes
    unguarded = time.monotonic() - t
    with DecodeGuard(LIMIT) as guard:
        np.testing.assert_array_equal(guard.read(quick), read_slice(quick))  # the child is started (not timed)
        first_child = guard._child
        t = time.monotonic()
        with pytest.raises(DicomError, match=r"decoding took longer than 0.25 s"):
            guard.read(slow)
        guarded = time.monotonic() - t
        assert first_child.returncode == -9  # killed (SIGKILL), not waited for
        assert guard.restarts == 1 and guard._child is None
        np.testing.assert_array_equal(guard.read(quick), read_slice(quick))  # a fresh child
        assert guard._child is not first_child
    assert guarded < unguarded / 2, (guarded, unguarded)
