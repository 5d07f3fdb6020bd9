"""A per-file time limit in prepare: a slice whose decoding takes longer than
``--decode-timeout`` becomes a failure row with that reason, its decoder process is killed and
replaced, and the batch goes on.

The slow case is real: a 2048 x 2048 slice of noise in JPEG 2000 Lossless, which OpenJPEG takes
about a second to decode (noise does not compress, so every code block is decoded in full), under
a limit of a fraction of that; the synthetic slices beside it decode in milliseconds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from helpers.dicom import make_ct
from helpers.processes import run
from pedetect.dicom.guard import DecodeGuard
from pedetect.dicom.header import DicomError
from pedetect.dicom.read import read_slice, scan_files

SIZE, SLICES, STUDIES = 48, 8, 2
LIMIT = 0.25
# predict's limit: its quick 2048² neighbours travel back windowed (12 MB through the pipe), which on
# a machine loaded by other jobs took over 0.25 s; the slow slice alone takes about 1 s.
PREDICT_LIMIT = 0.5
SLOW_SERIES = "1.2.826.0.1.3680043.8.498.99.1"


def slow_slice(path: Path, **where) -> Path:
    """A real, valid CT slice that takes about a second to decode (``where``: make_ct's UIDs and position)."""
    from pydicom.uid import JPEG2000Lossless

    noise = np.random.default_rng(0).integers(0, 4000, size=(2048, 2048)).astype(np.int16)
    make_ct(path, noise, **{"study": "1.2.826.0.1.3680043.8.498.99", "series": SLOW_SERIES, **where})
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def dicom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    result = run(
        "synth", root / "synth", "-n", STUDIES, "--slices", SLICES, "--size", SIZE, "--no-progress", "--seed", 4
    )
    assert result.returncode == 0, result.stderr
    slow_slice(root / "synth" / "train" / "slow.dcm")
    return root / "synth" / "train"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slice_that_decodes_past_the_limit_is_a_failure_and_the_batch_goes_on(dicom, tmp_path, workers):
    started = time.monotonic()
    result = run(
        "prepare", dicom, "--out", tmp_path / "store", "--decode-timeout", LIMIT, "--workers", workers, "--no-progress"
    )
    assert result.returncode == 1, result.stdout + result.stderr  # 1: something was lost
    assert "Traceback" not in result.stderr
    failures = pd.read_parquet(tmp_path / "store" / "failures.parquet")
    assert failures["path"].tolist() == [str(dicom / "slow.dcm")]
    assert failures["reason"].tolist() == [
        f"decoding took longer than {LIMIT:g} s (the per-file time limit, --decode-timeout): stopped"
    ]
    slices = pd.read_parquet(tmp_path / "store" / "slices.parquet")
    assert len(slices) == STUDIES * SLICES and SLOW_SERIES not in set(slices["SeriesInstanceUID"])
    assert "1 × decoding took longer than" in result.stdout
    assert time.monotonic() - started < 120


def test_the_same_slice_is_stored_without_the_tight_limit(dicom, tmp_path):
    """The slice is valid: under the default limit it is read like any other."""
    result = run("prepare", dicom, "--out", tmp_path / "store", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    slices = pd.read_parquet(tmp_path / "store" / "slices.parquet")
    assert len(slices) == STUDIES * SLICES + 1 and SLOW_SERIES in set(slices["SeriesInstanceUID"])


def test_the_guard_stops_the_decoder_rather_than_waiting_for_it_and_starts_a_new_one(dicom, tmp_path):
    from pydicom.uid import RLELossless

    native = sorted(dicom.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(native)
    ds.compress(RLELossless)  # a slice that needs a decoder, and decodes in milliseconds
    ds.save_as(tmp_path / "rle.dcm")
    headers, failures = scan_files([str(dicom / "slow.dcm"), str(tmp_path / "rle.dcm")])
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


def test_the_guard_reads_uncompressed_slices_in_its_own_process(dicom):
    """No decoder runs on uncompressed 16-bit data: the guard reads it without its child (no pipe to
    copy each slice through), the same pixels, and a file cut short fails with the child's reason."""
    (header,), failures = scan_files([str(sorted(dicom.rglob("*.dcm"))[0])])
    assert failures == [] and "native" in header.extra
    with DecodeGuard(LIMIT) as guard:
        np.testing.assert_array_equal(guard.read(header, image_size=32), read_slice(header, image_size=32))
        assert guard._child is None and guard.restarts == 0
        size = header.extra["native"]["offset"] + 100  # the same size as scanned, its pixels cut short
        short = dataclasses.replace(header, size=size, extra={**header.extra, "native": {**header.extra["native"]}})
        data = Path(header.source).read_bytes()[:size]
        cut = Path(header.source).with_name("cut.dcm")
        cut.write_bytes(data)
        try:
            short = dataclasses.replace(short, source=str(cut))
            with pytest.raises(DicomError, match=r"pixel data unreadable \(truncated: 100 of \d+ bytes\)"):
                guard.read(short)
        finally:
            cut.unlink()
        assert guard._child is None


SLOW_STUDY = "1.2.826.0.1.3680043.8.498.98"


@pytest.fixture(scope="module")
def predict_input(dicom, tmp_path_factory) -> Path:
    """The synthetic studies, and a study of three 2048 x 2048 slices whose middle one is the slow
    slice (its neighbours uncompressed: they decode at once), so the lost slice has a place and a row."""
    import shutil

    root = tmp_path_factory.mktemp("limits_predict") / "input"
    shutil.copytree(dicom, root, ignore=shutil.ignore_patterns("slow.dcm"))
    series = SLOW_SERIES + ".2"
    quick = np.random.default_rng(1).integers(0, 2000, size=(2048, 2048)).astype(np.int16)
    for k, z in ((1, 0.0), (3, 5.0)):
        make_ct(
            root / SLOW_STUDY / f"{k}.dcm", quick, study=SLOW_STUDY, series=series, position=(0.0, 0.0, z), instance=k
        )
    slow_slice(root / SLOW_STUDY / "2.dcm", study=SLOW_STUDY, series=series, position=(0.0, 0.0, 2.5), instance=2)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from helpers.train import tiny_config
    from pedetect.testing import write_random_bundle

    return write_random_bundle(tiny_config(), tmp_path_factory.mktemp("limits_model") / "model", folds=2)


def test_predict_loses_a_slice_that_decodes_past_the_limit_and_answers_every_study(predict_input, model, tmp_path):
    """predict decodes through the same guard: the slow slice is lost with the limit's reason, still
    gets its row (placed between its decoded neighbours), and every study is predicted."""
    started = time.monotonic()
    result = run(
        "predict",
        predict_input,
        "--model",
        model,
        "--out",
        tmp_path / "sub.csv",
        "--decode-timeout",
        PREDICT_LIMIT,
        "--device",
        "cpu",
        "--no-progress",
    )
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr  # 1: something was lost
    assert "Traceback" not in result.stderr
    reason = f"decoding took longer than {PREDICT_LIMIT:g} s (the per-file time limit, --decode-timeout): stopped"
    slow = predict_input / SLOW_STUDY / "2.dcm"
    assert result.stderr.splitlines()[-1] == f"  {slow}: {reason} (study {SLOW_STUDY})", result.stderr
    assert f"predicted {STUDIES + 1} studies, {STUDIES * SLICES + 2} slices read" in result.stderr, result.stderr
    rows = pd.read_csv(tmp_path / "sub.csv")
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in predict_input.rglob("*.dcm")}
    assert len(sops) == STUDIES * SLICES + 3
    assert sops <= set(rows["id"]) and len(rows) == len(sops) + 9 * (
        STUDIES + 1
    )  # every slice, the lost one too, and nine exam rows a study
    assert seconds < 120


def test_predict_without_a_limit_reads_the_slow_slice(predict_input, model, tmp_path):
    """--decode-timeout 0 decodes in the process itself, as long as it takes: nothing is lost."""
    result = run(
        "predict",
        predict_input,
        "--model",
        model,
        "--out",
        tmp_path / "sub.csv",
        "--decode-timeout",
        0,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{STUDIES * SLICES + 3} slices read" in result.stderr and "lost: nothing" in result.stderr
