"""Only CT images enter the store: every other DICOM object (MR, US, CR, SC, SEG, SR, dose reports,
colour images) is a failure row whose reason names what it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset as write_raw_dataset

from helpers.dicom import CT5N, PYDICOM_FILES, make_ct, phantom, real_file, series_files
from pedetect.dicom import read_files
from pedetect.dicom.source import discover
from pedetect.store import SliceStore, prepare

# pydicom's real files that are not CT images, with the reason each must get.
NOT_CT = {
    "MR_small.dcm": "not a CT image: MR Image Storage (1.2.840.10008.5.1.4.1.1.4)",
    "MR_small_jp2klossless.dcm": "not a CT image: MR Image Storage (1.2.840.10008.5.1.4.1.1.4)",
    "ExplVR_BigEnd.dcm": "not a CT image: Ultrasound Image Storage (1.2.840.10008.5.1.4.1.1.6.1)",
    "examples_ybr_color.dcm": "not a CT image: Ultrasound Multi-frame Image Storage (1.2.840.10008.5.1.4.1.1.3.1)",
    "JPEG2000.dcm": "not a CT image: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)",  # grayscale SC
    "SC_rgb_rle.dcm": "not a CT image: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)",
    "liver_1frame.dcm": "not a CT image: Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4)",
    "test-SR.dcm": "not a CT image: Comprehensive SR Storage (1.2.840.10008.5.1.4.1.1.88.33)",
    "rtdose_1frame.dcm": "not a CT image: RT Dose Storage (1.2.840.10008.5.1.4.1.1.481.2)",
    "waveform_ecg.dcm": "not a CT image: 12-lead ECG Waveform Storage (1.2.840.10008.5.1.4.1.1.9.1.1)",
}
CR_REASON = "not a CT image: Computed Radiography Image Storage (1.2.840.10008.5.1.4.1.1.1)"


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A folder as a new user has it: a synthetic CT study, pydicom's real CT5N series, and real
    files of nine other kinds (MR, US, SC, SEG, SR, RT dose, ECG, CR)."""
    from pedetect.synth import write_dataset

    root = tmp_path_factory.mktemp("mixed")
    labels = write_dataset(root / "synth", 1, slices=4, size=32, seed=21, transfer_syntax="explicit", progress=False)
    for csv in (root / "synth").glob("*.csv"):  # synth's label files: only DICOM in this folder
        csv.unlink()
    shutil.copytree(CT5N, root / "ct5n")
    (root / "other").mkdir()
    for name in NOT_CT:
        shutil.copy(real_file(name), root / "other" / name)
    shutil.copy(series_files(PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1")[0], root / "other" / "cr")
    return root, labels


def test_a_mixed_folder_stores_only_its_ct_slices(mixed_folder, tmp_path):
    root, labels = mixed_folder
    summary = prepare(root, tmp_path / "store", progress=False, echo=lambda m: None)
    store = SliceStore(tmp_path / "store")
    ct5n_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series_files(CT5N)}
    assert set(store.slices["SOPInstanceUID"]) == set(labels["SOPInstanceUID"]) | ct5n_sops
    assert len(store.slices) == 4 + 5 and store.series["SeriesInstanceUID"].nunique() == 2
    assert set(store.series["modality"]) == {"CT"}
    failures = pd.read_parquet(tmp_path / "store" / "failures.parquet")
    reasons = {Path(path).name: reason for path, reason in zip(failures["path"], failures["reason"])}
    assert reasons == {**NOT_CT, "cr": CR_REASON}
    assert not summary.ok and summary.failures == len(NOT_CT) + 1


def test_predict_reads_the_same_way(mixed_folder):
    """The in-memory read path (``pedetect predict``'s) refuses the same files with the same reasons."""
    root, labels = mixed_folder
    series, failures = read_files(discover(root))
    assert sorted(len(s) for s in series) == [4, 5]
    assert {Path(f.path).name: f.reason for f in failures} == {**NOT_CT, "cr": CR_REASON}


def _ct_dataset(path: Path) -> pydicom.Dataset:
    make_ct(path, phantom(16, 16), study="1.2.826.0.1.3680043.8.498.7", series="1.2.826.0.1.3680043.8.498.7.1")
    return pydicom.dcmread(path)


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"])
def test_enhanced_ct_without_functional_groups_is_read_in_frame_order_and_says_so(tmp_path, sop_class):
    """Enhanced and Legacy Converted Enhanced CT are CT: their frames are slices. Without functional
    groups no frame has a position, so the frames keep the file's order, and the series says so."""
    ds = _ct_dataset(tmp_path / "slice")
    first = ds.pixel_array
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData + (first[::-1].astype(first.dtype).tobytes())
    ds.save_as(tmp_path / "enhanced")
    series, failures = read_files([str(tmp_path / "enhanced")])
    assert failures == [] and len(series) == 1 and len(series[0]) == 2
    s = series[0]
    assert s.sop_uids == [f"{ds.SOPInstanceUID}#1", f"{ds.SOPInstanceUID}#2"]
    assert s.meta["order_by"] == "instance_number"
    assert (
        "no usable ImagePositionPatient/ImageOrientationPatient on 2 of 2 slices: ordered by InstanceNumber"
        in s.meta["irregularities"]
    )
    np.testing.assert_array_equal(s.images[1], s.images[0][::-1])  # frame 2 is frame 1 upside down


def test_a_colour_image_of_the_ct_class_is_refused(tmp_path):
    ds = _ct_dataset(tmp_path / "slice")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "palette")
    rgb = _ct_dataset(tmp_path / "slice2")
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated = rgb.BitsStored = 8
    rgb.HighBit, rgb.PixelRepresentation = 7, 0
    rgb.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    rgb.save_as(tmp_path / "rgb")
    series, failures = read_files([str(tmp_path / "palette"), str(tmp_path / "rgb")])
    assert series == []
    assert [(Path(f.path).name, f.reason) for f in failures] == [
        ("palette", "not a grayscale image (PhotometricInterpretation PALETTE COLOR)"),
        ("rgb", "not a grayscale image (PhotometricInterpretation RGB)"),
    ]


def _without_sop_class(source: Path, out: Path, modality: str, position_z: float) -> Path:
    """An old-style file (no preamble, no file meta) with no SOPClassUID at all."""
    ds = pydicom.dcmread(source)
    del ds.SOPClassUID
    del ds.file_meta
    ds.Modality = modality
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImagePositionPatient = [0, 0, position_z]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_raw_dataset(buffer, ds)
    out.write_bytes(buffer.getvalue())
    return out


def test_no_sop_class_is_taken_as_ct_only_by_modality_and_recorded(tmp_path):
    """Decision (docs/reliability.md): a file with no SOP class UID anywhere is CT when its Modality
    is CT (recorded as an irregularity of its series); with any other Modality it is a failure."""
    _ct_dataset(tmp_path / "slice")
    for k in range(3):
        _without_sop_class(tmp_path / "slice", tmp_path / f"ct{k}", "CT", 10.0 * k)
    _without_sop_class(tmp_path / "slice", tmp_path / "mr", "MR", 99.0)
    (tmp_path / "slice").unlink()
    series, failures = read_files(discover(tmp_path))
    assert [(Path(f.path).name, f.reason) for f in failures] == [
        ("mr", "not known to be a CT image: no SOP class UID, Modality MR")
    ]
    assert len(series) == 1 and len(series[0]) == 3 and series[0].plan.order_by == "position"
    assert "3 slice(s) without a SOP class UID, taken as CT by their Modality" in series[0].meta["irregularities"]
    # and the store records it the same way
    prepare(tmp_path, tmp_path.parent / "store_no_class", progress=False, echo=lambda m: None)
    stored = SliceStore(tmp_path.parent / "store_no_class").series
    assert "3 slice(s) without a SOP class UID, taken as CT by their Modality" in list(stored["irregularities"].iloc[0])


def test_an_rle_slice_whose_bytes_hold_the_jpeg2000_markers_is_read(tmp_path):
    """Found by tests/dicom/test_enhanced_ct.py on a synthetic RLE slice: the size check before decoding
    looked for a JPEG 2000 header (SOC, SIZ: FF 4F FF 51) in any compressed frame, found those
    bytes by chance in RLE data, and failed the slice with a nonsense size. The header looked for now
    depends on the transfer syntax."""
    from pydicom.uid import RLELossless

    from pedetect.dicom.pixels import window_dataset

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 1200, size=(32, 32)).astype(np.int16)
    pixels[0, :4] = [0x00FF, 0x004F, 0x00FF, 0x0051]  # the low-byte segment starts FF 4F FF 51
    path = make_ct(
        tmp_path / "rle", pixels, study="1.2.826.0.1.3680043.8.498.8", series="1.2.826.0.1.3680043.8.498.8.1"
    )
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    ds.save_as(path)
    assert b"\xff\x4f\xff\x51" in ds.PixelData[:4096]
    series, failures = read_files([str(path)])
    assert failures == [] and len(series) == 1 and series[0].failures == []
    np.testing.assert_array_equal(series[0].images[0], window_dataset(pydicom.dcmread(path)))
