"""Enhanced CT: the frames of Enhanced CT and Legacy Converted Enhanced CT files are
slices, read one frame at a time with their geometry and rescale from the functional groups.

The data are made here: ``pedetect synth`` writes the same studies as single-frame files and, with
``--enhanced``, as one multi-frame file each (frames in InstanceNumber order, shuffled for one
study; rescale in the shared group for one study and per frame for the others), in every transfer
syntax synth writes; highdicom converts single-frame files into a Legacy Converted Enhanced CT
file (another implementation of the functional groups than ours); pydicom's real multi-frame files
(none of them CT: RT dose, 15 frames, native and RLE) are relabelled to reach the frame decoders.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from helpers.dicom import PYDICOM_FILES
from helpers.processes import run
from helpers.train import tiny_config
from pedetect.dicom import read_files
from pedetect.dicom.frames import split_frame_key
from pedetect.dicom.pixels import window_hu
from pedetect.store import SliceStore

SIZE, SLICES, STUDIES, SEED = 48, 8, 3, 3  # train seed 3: instance orders shuffled, decreasing, decreasing
SYNTAXES = ("explicit", "rle", "jpeg2000")
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def pedetect(*args) -> subprocess.CompletedProcess:
    result = run(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def synth(out: Path, syntax: str, *extra: str, split: str = "train", seed: int = SEED, studies: int = STUDIES) -> Path:
    pedetect(
        "synth",
        out,
        "-n",
        studies,
        "--slices",
        SLICES,
        "--size",
        SIZE,
        "--seed",
        seed,
        "--split",
        split,
        "--transfer-syntax",
        syntax,
        "--no-progress",
        *extra,
    )
    return out


def prepare(dicom: Path, store: Path) -> SliceStore:
    pedetect("prepare", dicom, "--out", store, "--no-progress")
    return SliceStore(store)


def same_slices(enhanced: SliceStore, single: SliceStore, keys: dict[str, str]) -> None:
    """Every series of ``single`` is in ``enhanced`` with the same slices in the same order, the same z
    and the same pixels; ``keys`` maps each single-frame SOPInstanceUID to its frame's key."""
    a, b = enhanced.slices, single.slices
    assert len(a) == len(b) == STUDIES * SLICES
    assert enhanced.failures.empty and single.failures.empty
    for series, want in b.groupby("SeriesInstanceUID"):
        got = a[a["SeriesInstanceUID"] == series].sort_values("slice_index")
        want = want.sort_values("slice_index")
        assert got["SOPInstanceUID"].tolist() == [keys[s] for s in want["SOPInstanceUID"]]
        np.testing.assert_array_equal(got["z"].to_numpy(), want["z"].to_numpy())
        # The same windowed pixels give the same JPEG bytes: equal, not merely close.
        np.testing.assert_array_equal(enhanced.read_series(series), single.read_series(series))
        frames = got["frame"].tolist()
        assert frames == [split_frame_key(k)[1] for k in got["SOPInstanceUID"]]
        assert got["source"].nunique() == 1 and want["frame"].isna().all()
        assert enhanced.series_info(series)["order_by"] == "position"


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_an_enhanced_study_prepares_to_the_same_slices_as_its_single_frame_files(tmp_path, syntax):
    single = synth(tmp_path / "single", syntax)
    enhanced = synth(tmp_path / "enhanced", syntax, "--enhanced")
    files = sorted((enhanced / "train").rglob("*.dcm"))
    assert len(files) == STUDIES  # one file a study
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == ENHANCED_CT and int(ds.NumberOfFrames) == SLICES
        assert "ImagePositionPatient" not in ds and "RescaleSlope" not in ds  # only in the functional groups
    labels_single = pd.read_csv(single / "train.csv", dtype=str)
    labels_enhanced = pd.read_csv(enhanced / "train.csv", dtype=str)
    keys = dict(zip(labels_single["SOPInstanceUID"], labels_enhanced["SOPInstanceUID"]))
    a = prepare(enhanced / "train", tmp_path / "store_enhanced")
    b = prepare(single / "train", tmp_path / "store_single")
    same_slices(a, b, keys)
    # The frame order of the file is the instance order: shuffled for study 0, so sorting by z is real work.
    first = a.slices[a.slices["StudyInstanceUID"] == labels_enhanced["StudyInstanceUID"].iloc[0]].sort_values(
        "slice_index"
    )
    assert sorted(first["frame"]) == list(range(1, SLICES + 1)) and first["frame"].tolist() not in (
        list(range(1, SLICES + 1)),
        list(range(SLICES, 0, -1)),
    )
    # The labels synth writes name the slices as the store does: train.csv joins the store.
    assert set(labels_enhanced["SOPInstanceUID"]) == set(a.slices["SOPInstanceUID"])


def test_a_legacy_converted_enhanced_ct_from_highdicom_reads_as_its_single_frame_files(tmp_path):
    """highdicom's converter (not our writer) makes the Legacy Converted Enhanced CT file."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    single = synth(tmp_path / "single", "explicit", studies=1)
    files = sorted((single / "train").rglob("*.dcm"))
    legacy = [pydicom.dcmread(p) for p in files]
    converted = LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=legacy[0].SeriesInstanceUID,
        series_number=1,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    out = tmp_path / "legacy"
    out.mkdir()
    converted.save_as(out / "converted.dcm")
    assert str(converted.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2.2" and int(converted.NumberOfFrames) == SLICES
    a, failures = read_files([str(out / "converted.dcm")])
    b, failures_single = read_files([str(p) for p in files])
    assert failures == failures_single == []
    np.testing.assert_array_equal(a[0].images, b[0].images)
    np.testing.assert_allclose(a[0].z, b[0].z, atol=1e-6)
    assert a[0].meta["order_by"] == "position" and a[0].meta["pixel_spacing"] == b[0].meta["pixel_spacing"]
    assert all(split_frame_key(k)[0] == converted.SOPInstanceUID for k in a[0].sop_uids)


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_rle.dcm"])
def test_real_multi_frame_files_decode_frame_by_frame_like_pydicom(tmp_path, name):
    """pydicom ships no multi-frame CT; its real RT dose files (15 frames of 32-bit values, native
    and RLE) relabelled as Enhanced CT reach the frame reader, and every frame equals pydicom's own
    decoding of the whole file, windowed by the reference windowing."""
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    truth = ds.pixel_array.astype(np.float64)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.Modality = "CT"
    path = tmp_path / "dose_as_ct.dcm"
    ds.save_as(path)
    series, failures = read_files([str(path)], windows=[(truth.mean(), 2 * truth.std() + 1)] * 3)
    assert failures == [] and len(series) == 1 and len(series[0]) == 15
    s = series[0]
    assert [split_frame_key(k)[1] for k in s.sop_uids] == list(range(1, 16))  # no positions: the file's order
    for k in range(15):
        np.testing.assert_array_equal(s.images[k], window_hu(truth[k], [(truth.mean(), 2 * truth.std() + 1)] * 3))


def _enhanced_file(tmp_path: Path, syntax: str) -> Path:
    root = synth(tmp_path / f"one_{syntax}", syntax, "--enhanced", studies=1)
    return next((root / "train").rglob("*.dcm"))


@pytest.mark.parametrize("syntax", ["explicit", "rle"])
def test_a_frame_count_the_file_cannot_hold_is_a_failure_not_an_allocation(tmp_path, syntax):
    path = _enhanced_file(tmp_path, syntax)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2_000_000_000  # 4.6 PB of 48 x 48 frames declared in a few kB
    ds.save_as(path)
    series, failures = read_files([str(path)])
    assert series == [] and len(failures) == 1
    reason = failures[0].reason
    if syntax == "explicit":
        assert (
            reason
            == f"multi-frame image unreadable (pixel data holds {SLICES * SIZE * SIZE * 2} bytes, 2000000000 frame(s) of {SIZE * SIZE * 2} bytes need {2_000_000_000 * SIZE * SIZE * 2}: the file cannot hold its frames)"
        )
    else:
        assert (
            reason
            == f"multi-frame image unreadable (NumberOfFrames is 2000000000 but the encapsulated pixel data holds {SLICES} fragment(s): the file cannot hold its frames)"
        )


def test_fewer_per_frame_groups_than_frames_and_a_huge_frame_are_failures(tmp_path):
    path = _enhanced_file(tmp_path, "explicit")
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:3]
    ds.save_as(tmp_path / "short_groups.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.save_as(tmp_path / "huge_frames.dcm")
    series, failures = read_files([str(tmp_path / "short_groups.dcm"), str(tmp_path / "huge_frames.dcm")])
    assert series == []
    assert sorted(f.reason for f in failures) == [
        "image too large: declared size 65535x65535 (1 frame(s), 1 sample(s)) is over 16777216 values per slice",
        f"multi-frame image unreadable (NumberOfFrames is {SLICES} but PerFrameFunctionalGroupsSequence holds 3 item(s))",
    ]


def test_a_truncated_enhanced_file_is_a_failure_naming_the_damage(tmp_path):
    """Cut 200 bytes short: RLE (the last frame's item runs past the end of the file) and native data
    (the frames need more bytes than the file holds) both fail the file before any frame is read."""
    rle, native = _enhanced_file(tmp_path, "rle"), _enhanced_file(tmp_path, "explicit")
    for path in (rle, native):
        path.write_bytes(path.read_bytes()[:-200])
    series, failures = read_files([str(rle), str(native)])
    assert series == []
    assert [f.reason for f in failures] == [
        "multi-frame image unreadable (encapsulated pixel data damaged or truncated (an item of "
        f"{_last_item_length(rle)} bytes past the end of the file))",
        f"multi-frame image unreadable (pixel data holds {SLICES * SIZE * SIZE * 2 - 200} bytes, {SLICES} frame(s) of "
        f"{SIZE * SIZE * 2} bytes need {SLICES * SIZE * SIZE * 2}: the file cannot hold its frames)",
    ]


def _last_item_length(path: Path) -> int:
    import struct

    data = path.read_bytes()
    at = data.rfind(b"\xfe\xff\x00\xe0")
    return struct.unpack("<I", data[at + 4 : at + 8])[0]


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory) -> Path:
    from pedetect.testing import write_random_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    return write_random_bundle(
        tiny_config(),
        out,
        folds=1,
        store_settings={"windows": [[-600, 1500], [100, 700], [40, 400]], "image_size": SIZE},
    )


def test_predict_on_an_enhanced_study_names_each_frame_and_agrees_with_single_frame_files(tmp_path, random_bundle):
    """End to end: the submission's slice rows are the frames' keys (the sample submission synth
    writes names them so), each with the probability the same slice gets from single-frame files."""
    single = synth(tmp_path / "single", "rle", split="test", seed=0, studies=2)
    enhanced = synth(tmp_path / "enhanced", "rle", "--enhanced", split="test", seed=0, studies=2)
    for root in (single, enhanced):
        result = pedetect(
            "predict",
            root / "test",
            "--model",
            random_bundle,
            "--out",
            root / "sub.csv",
            "--sample",
            root / "sample_submission.csv",
            "--report",
            root / "report",
            "--device",
            "cpu",
            "--no-progress",
        )
        assert "Traceback" not in result.stderr
    got = pd.read_csv(enhanced / "sub.csv", dtype={"id": str})
    want = pd.read_csv(single / "sub.csv", dtype={"id": str})
    sample = pd.read_csv(enhanced / "sample_submission.csv", dtype={"id": str})
    assert got["id"].tolist() == sample["id"].tolist()
    keys = dict(
        zip(
            pd.read_csv(single / "test.csv", dtype=str)["SOPInstanceUID"],
            pd.read_csv(enhanced / "test.csv", dtype=str)["SOPInstanceUID"],
        )
    )
    assert all("#" in keys[s] for s in keys)
    by_id = dict(zip(got["id"], got["label"]))
    for row_id, value in zip(want["id"], want["label"]):
        assert by_id[keys.get(row_id, row_id)] == pytest.approx(value, abs=1e-6), row_id
    # The report's per-slice table names the frames too.
    reports = list((enhanced / "report").rglob("*.json"))
    assert reports and any("#" in text for text in (p.read_text() for p in reports))
    shutil.rmtree(tmp_path / "single")
