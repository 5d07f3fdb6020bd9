"""DICOM reading: real files from pydicom's wheel and hand-made slices, checked against values read
independently (raw file bytes, pydicom's own modality LUT, the JPEG 2000 codec called directly)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.pixels import apply_modality_lut

from helpers.dicom import (
    CT2,
    CT5N,
    bad_files,
    ct_series,
    make_ct,
    phantom,
    raw_pixels_explicit_le,
    real_file,
    reference_window,
    series_files,
)
from pedetect.dicom import (
    AIR_HU,
    DEFAULT_WINDOWS,
    DicomError,
    ZipMember,
    discover,
    hu_from_dataset,
    looks_like_dicom,
    plan_series,
    read_files,
    read_header,
    read_series,
    read_slice,
    resize_keep_aspect,
    scan_files,
    window_dataset,
    window_hu,
)
from pedetect.dicom.pixels import air_values


def read_files_of_one_series(files, **kwargs):
    """The read path on files of one series: scan the headers, then order, decode and window them."""
    headers, failures = scan_files(files)
    assert failures == []
    assert len({h.series for h in headers}) == 1
    return read_series(headers, **kwargs)


# ------------------------------------------------------------------------------------------ real files


def test_ct_small_hounsfield_from_raw_bytes():
    path = real_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    raw = raw_pixels_explicit_le(path, 128, 128, "<i2")  # signed storage, read without pydicom
    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
    expected = raw.astype(np.float64) * 1.0 - 1024.0
    hu = hu_from_dataset(ds)
    padding = raw == int(ds.PixelPaddingValue)
    np.testing.assert_array_equal(hu[~padding], expected[~padding])
    assert np.all(hu[padding] == AIR_HU)
    assert hu.min() == -896.0 and hu.max() == 1167.0  # a plausible CT range, no sign error
    np.testing.assert_array_equal(window_dataset(ds), reference_window(hu))


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_jpeg2000_hounsfield_against_pydicom_and_codec(name):
    ds = pydicom.dcmread(real_file(name))
    hu = hu_from_dataset(ds)
    assert hu.shape == (512, 512)
    reference = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    padding = ds.get("PixelPaddingValue")
    keep = np.ones(hu.shape, bool) if padding is None else ds.pixel_array != int(padding)
    np.testing.assert_allclose(hu[keep], reference[keep])
    # decode the codestream with OpenJPEG directly (not through pydicom's pixel pipeline)
    from openjpeg import decode
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    codec = decode(frame).astype(np.int64)
    bits = int(ds.BitsStored)
    signed = codec & ((1 << bits) - 1)
    signed = np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)
    assert np.array_equal(codec, ds.pixel_array) or np.array_equal(signed, ds.pixel_array)
    # plausible CT: air around -1000, nothing wrapped to +30000 by a sign error
    assert hu.max() < 4000 and np.percentile(hu, 5) < -700


def test_j2k_pixelrep_mismatch_is_signed_correctly():
    ds = pydicom.dcmread(real_file("J2K_pixelrep_mismatch.dcm"))
    hu = hu_from_dataset(ds)
    # The codestream says unsigned, the header says signed: read naively the air outside the
    # scan circle would be ~63,000 HU. It must be negative.
    assert hu[0, 0] < -900 and hu[0, -1] < -900
    assert 0 < np.mean((hu > -100) & (hu < 100)) < 0.8


def test_ct5n_position_order_beats_instance_number():
    files = series_files(CT5N)
    volume = read_files_of_one_series(files)
    # independent: z from ImagePositionPatient · (row × col)
    expected = []
    for path in files:
        ds = pydicom.dcmread(path)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        z = float(np.dot([float(v) for v in ds.ImagePositionPatient], np.cross(iop[:3], iop[3:])))
        expected.append((z, ds.SOPInstanceUID, int(ds.InstanceNumber)))
    expected.sort()
    assert [s for _, s, _ in expected] == volume.sop_uids
    np.testing.assert_allclose(volume.z, [z for z, _, _ in expected])
    assert np.all(np.diff(volume.z) > 0)
    assert volume.instance_numbers == [10, 9, 8, 7, 6]  # InstanceNumber runs the other way
    assert volume.meta["order_by"] == "position"
    assert volume.meta["instance_number_order"] == "descending"
    assert volume.meta["spacing"] == pytest.approx(2.5)
    assert volume.meta["irregularities"] == []
    assert volume.images.shape == (5, 16, 16, 3) and volume.images.dtype == np.uint8
    for path, image in zip(
        [files[[pydicom.dcmread(f).SOPInstanceUID for f in files].index(s)] for s in volume.sop_uids], volume.images
    ):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(image, reference_window(hu_from_dataset(ds)))
        raw = raw_pixels_explicit_le(path, 16, 16)
        keep = raw != int(ds.PixelPaddingValue)
        np.testing.assert_array_equal(hu_from_dataset(ds)[keep], raw[keep] - 1024.0)


def test_ct2_gap_is_recorded():
    volume = read_files_of_one_series(series_files(CT2))
    np.testing.assert_allclose(volume.z, [-99.48, 103.02, 104.27, 105.52], atol=1e-4)
    assert volume.instance_numbers == [18, 180, 181, 182]
    assert volume.meta["spacing"] == pytest.approx(1.25, abs=1e-3)
    assert volume.meta["n_gaps"] == 1 and volume.meta["largest_gap"] == pytest.approx(202.5, abs=1e-3)
    assert any(text.startswith("gaps:") for text in volume.meta["irregularities"])


def test_real_files_through_read_files_with_resize():
    files = [real_file("CT_small.dcm"), real_file("693_J2KI.dcm"), real_file("J2K_pixelrep_mismatch.dcm")]
    volumes, failures = read_files(files, image_size=64)
    assert failures == []
    assert len(volumes) == 3
    for volume in volumes:
        assert volume.images.shape == (1, 64, 64, 3)
        assert volume.meta["height"] == volume.meta["width"] == 64


# ------------------------------------------------------------------------------------------ pixels


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    signed=st.booleans(),
    bits=st.sampled_from([12, 16]),
    slope=st.sampled_from([1.0, 0.5, 2.0, 0.25, 1.5]),
    intercept=st.sampled_from([-1024.0, -1000.0, 0.0, -3000.0, -8192.0, -1024.5]),
    pad=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_lookup_table_windowing_equals_float_reference(signed, bits, slope, intercept, pad, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    stored = rng.integers(lo, hi + 1, size=(24, 20))
    padding = None
    if pad:
        padding = int(lo)
        stored[:3] = padding
    ds = pydicom.dcmread(_mem_ct(stored, signed, bits, slope, intercept, padding))
    hu = stored.astype(np.float64) * slope + intercept
    if padding is not None:
        hu[stored == padding] = AIR_HU
    np.testing.assert_array_equal(hu_from_dataset(ds), hu.astype(np.float32))
    np.testing.assert_array_equal(window_dataset(ds), reference_window(hu))
    np.testing.assert_array_equal(window_dataset(ds, bgr=True), reference_window(hu)[:, :, ::-1])


def _mem_ct(stored, signed, bits, slope, intercept, padding):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = make_ct(
            Path(tmp) / "x.dcm",
            stored.astype(np.int16 if signed else np.uint16),
            study="1.2.3",
            series="1.2.3.4",
            slope=slope,
            intercept=intercept,
            padding=padding,
            bits_stored=bits,
        )
        return io.BytesIO(path.read_bytes())


def test_high_bits_beyond_bits_stored_are_ignored(tmp_path):
    stored = np.full((8, 8), 1064, np.uint16)  # 40 HU at intercept -1024
    stored[0, 0] |= 0xF000  # junk in the unused high bits of a 12-bit image
    path = make_ct(tmp_path / "x", stored, study="1.2", series="1.2.1", bits_stored=12)
    hu = hu_from_dataset(pydicom.dcmread(path))
    assert np.all(hu == 40.0)


def test_windows_are_lung_pe_mediastinal():
    assert DEFAULT_WINDOWS == ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0))
    hu = np.array([[-1000.0, 40.0, 100.0, 450.0]])
    image = window_hu(hu)
    assert image[0, 0].tolist() == [60, 0, 0]  # air: only the lung window sees it
    assert image[0, 2, 1] == 128  # PE window centred on 100
    assert image[0, 1, 2] == 128  # mediastinal window centred on 40
    assert image[0, 3].tolist() == [255, 255, 255]
    assert air_values() == (60, 0, 0)


def test_resize_keeps_aspect_and_pads_with_air():
    image = np.full((40, 80, 3), 200, np.uint8)
    out = resize_keep_aspect(image, 64, fill=(60, 0, 0))
    assert out.shape == (64, 64, 3)
    assert np.all(out[32, :] == 200)  # the middle row is image
    assert out[0, 0].tolist() == [60, 0, 0] and out[-1, -1].tolist() == [60, 0, 0]
    assert np.all(out[16:48, :, 0] == 200) and np.all(out[:16, :, 0] == 60)


def test_signed_and_unsigned_storage_give_the_same_slice(tmp_path):
    hu = phantom(signed=True, intercept=0.0).astype(np.float64)  # HU values
    a = make_ct(tmp_path / "a", hu.astype(np.int16), study="1.2", series="1.2.1", intercept=0.0)
    b = make_ct(
        tmp_path / "b",
        np.rint((hu + 2048) / 0.5).astype(np.uint16),
        study="1.2",
        series="1.2.2",
        slope=0.5,
        intercept=-2048.0,
    )
    np.testing.assert_array_equal(window_dataset(pydicom.dcmread(a)), window_dataset(pydicom.dcmread(b)))


def test_unsigned_padding_written_as_negative(tmp_path):
    stored = phantom(signed=False)
    stored[:2] = 63536  # -2000 as a 16-bit pattern
    path = make_ct(tmp_path / "p", stored, study="1.2", series="1.2.1")
    ds = pydicom.dcmread(path)
    ds.PixelPaddingValue = 63536
    assert np.all(hu_from_dataset(ds)[:2] == AIR_HU)


# ------------------------------------------------------------------------------------------ series


def test_series_order_rescale_per_slice_and_sizes(tmp_path):
    study, series = "1.2.840.1", "1.2.840.1.1"
    files = []
    for k, (slope, intercept) in enumerate([(1.0, -1024.0), (0.5, -1024.0), (1.0, 0.0), (2.0, -2048.0)]):
        hu = np.full((16, 16), 30.0 + 10 * k)
        stored = np.rint((hu - intercept) / slope)
        dtype = np.int16 if intercept == 0.0 else np.uint16
        files.append(
            make_ct(
                tmp_path / f"f{k}",
                stored.astype(dtype),
                study=study,
                series=series,
                position=(0, 0, -5.0 * k),
                instance=k + 1,
                slope=slope,
                intercept=intercept,
            )
        )
    files.append(
        make_ct(
            tmp_path / "scout",
            np.zeros((20, 16), np.uint16),
            study=study,
            series=series,
            position=(0, 0, 50),
            instance=9,
        )
    )
    volume = read_files_of_one_series([str(f) for f in files])
    assert len(volume) == 4
    np.testing.assert_allclose(volume.z, [-15, -10, -5, 0])
    # per-slice rescale: the HU (and so the window values) follow the slice, not the first slice
    expected_hu = [60.0, 50.0, 40.0, 30.0]
    for image, hu in zip(volume.images, expected_hu):
        assert image[0, 0].tolist() == reference_window(np.array([[hu]]))[0, 0].tolist()
    assert [f.reason for f in volume.failures] == ["slice size 20x16 differs from its series' 16x16"]
    assert any(text.startswith("mixed sizes") for text in volume.meta["irregularities"])


def test_instance_number_fallback_is_recorded(tmp_path):
    files = [
        make_ct(tmp_path / f"f{k}", phantom(8, 8, seed=k), study="1.2", series="1.2.1", position=None, instance=3 - k)
        for k in range(3)
    ]
    volume = read_files_of_one_series([str(f) for f in files])
    assert volume.instance_numbers == [1, 2, 3]
    assert volume.meta["order_by"] == "instance_number"
    assert any("ordered by InstanceNumber" in text for text in volume.meta["irregularities"])


def test_duplicate_positions_recorded(tmp_path):
    files = [
        make_ct(
            tmp_path / f"f{k}",
            phantom(8, 8, seed=k),
            study="1.2",
            series="1.2.1",
            position=(0, 0, [0, 1, 1, 2][k]),
            instance=k,
        )
        for k in range(4)
    ]
    volume = read_files_of_one_series([str(f) for f in files])
    assert volume.meta["n_duplicates"] == 1
    assert len(volume) == 4


def test_bad_files_are_failures_with_reasons(tmp_path):
    good = ct_series(tmp_path / "good", 3, rows=16, cols=16)
    bad = bad_files(tmp_path / "bad", good[0])
    volumes, failures = read_files(discover(tmp_path))
    assert len(volumes) == 1 and len(volumes[0]) == 3
    reasons = {Path(f.path).name: f.reason for f in failures + volumes[0].failures}
    assert reasons["empty.dcm"].startswith("empty file")
    assert reasons["notes.txt"].startswith("not DICOM")
    assert "truncated" in reasons["trunc_header"]
    assert reasons["no_pixels"].startswith("DICOM without pixel data")
    assert reasons["trunc_pixels"].startswith("pixel data unreadable")
    assert set(reasons) == {p.name for p in bad.values()}
    # the slice that could not be decoded keeps its place in the series' position order (last: z + 0.5)
    series = volumes[0]
    assert series.n_planned == 4 and series.position.tolist() == [0.0, 1.0, 2.0]
    assert [(Path(f.path).name, place) for f, place in series.lost] == [("trunc_pixels", 3.0)]
    assert series.lost[0][0].series == series.series and series.lost[0][0].sop is not None
    assert "1 slice(s) could not be decoded" in series.meta["irregularities"]
    assert series.meta["n_slices"] == 3 and series.meta["z"] == pytest.approx(series.z.tolist())


def test_duplicate_sop_uids_keep_the_largest_file(tmp_path):
    files = ct_series(tmp_path / "s", 3, rows=16, cols=16)
    copy = tmp_path / "s" / "copy_of_first"
    copy.write_bytes(files[0].read_bytes()[:-100])  # a truncated copy: same SOPInstanceUID, smaller
    twin = tmp_path / "s" / "twin_of_second"
    twin.write_bytes(files[1].read_bytes())  # an exact copy: the first seen is kept
    volumes, failures = read_files([str(copy), *(str(f) for f in files), str(twin)])
    assert len(volumes) == 1 and len(volumes[0]) == 3 and volumes[0].lost == []
    assert sorted(volumes[0].sources) == sorted(str(f) for f in files)
    assert [(f.path, f.reason) for f in failures] == [
        (str(copy), f"duplicate SOPInstanceUID (kept {files[0]})"),
        (str(twin), f"duplicate SOPInstanceUID (kept {files[1]})"),
    ]
    assert all(f.series == volumes[0].series and f.sop for f in failures)


# ------------------------------------------------------------------------------------------ one slice


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
@pytest.mark.parametrize("image_size", [None, 96])
def test_read_slice_equals_pydicom_decode_in_both_channel_orders(name, image_size):
    path = real_file(name)
    header = read_header(path)
    # uncompressed 16-bit data takes the fast path (straight from the bytes), JPEG 2000 goes through pydicom
    assert (header.extra.get("native") is not None) == (name == "CT_small.dcm")
    expected = window_dataset(pydicom.dcmread(path), image_size=image_size)
    rgb = read_slice(header, image_size=image_size)
    bgr = read_slice(header, image_size=image_size, bgr=True)
    assert rgb.dtype == np.uint8 and rgb.shape == expected.shape
    np.testing.assert_array_equal(rgb, expected)
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    if image_size is None:
        np.testing.assert_array_equal(rgb, reference_window(hu_from_dataset(pydicom.dcmread(path))))


def test_read_slice_windows_are_the_channels_in_order(tmp_path):
    stored = np.full((8, 8), 1064, np.uint16)  # 40 HU at intercept -1024
    header = read_header(str(make_ct(tmp_path / "x", stored, study="1.2", series="1.2.1")))
    windows = ((40.0, 400.0), (-600.0, 1500.0), (100.0, 700.0))
    image = read_slice(header, windows)
    assert image[0, 0].tolist() == reference_window(np.array([[40.0]]))[0, 0][[2, 0, 1]].tolist()
    with pytest.raises(ValueError):
        read_slice(header, ((40.0, 0.0),) * 3)


def test_a_file_changed_since_the_scan_fails_with_its_reason(tmp_path):
    a = make_ct(tmp_path / "a", phantom(16, 16), study="1.2", series="1.2.1", position=(0, 0, 0))
    b = make_ct(tmp_path / "b", phantom(16, 16, seed=1), study="1.2", series="1.2.1", position=(0, 0, 1))
    other = make_ct(tmp_path / "other", phantom(24, 24), study="1.2", series="1.2.1")
    headers, _ = scan_files([str(a), str(b)])
    a.write_bytes(other.read_bytes())  # replaced after the scan by another slice
    with pytest.raises(DicomError) as caught:
        read_slice(headers[0])
    assert caught.value.reason == "file changed while preparing (SOPInstanceUID differs from the scan)"
    series = read_series(headers)
    assert len(series) == 1 and series.sources == [str(b)]
    assert [(f.path, f.reason, place) for f, place in series.lost] == [(str(a), caught.value.reason, 0.0)]


def test_truncated_pixel_data_is_named_by_the_fast_path(tmp_path):
    path = make_ct(tmp_path / "a", phantom(16, 16), study="1.2", series="1.2.1")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    header = read_header(str(path))
    assert header.extra.get("native") is not None
    with pytest.raises(DicomError) as caught:
        read_slice(header)
    assert caught.value.reason == "pixel data unreadable (truncated: 412 of 512 bytes)"


def test_discovery_by_content_and_zip_members(tmp_path):
    files = ct_series(tmp_path / "a" / "deep" / "er", 3, rows=8, cols=8)
    raw = make_ct(tmp_path / "no_preamble.bin", phantom(8, 8), study="1.2", series="1.2.9", preamble=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    assert looks_like_dicom(raw.read_bytes()[:132])
    assert read_header(str(raw)).series == "1.2.9"
    found = discover(tmp_path)
    assert set(found) == {str(p) for p in files} | {str(raw)}
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for k, p in enumerate(files):
            z.write(p, f"../../evil/{k}")  # hostile names are only ever read, never used as paths
    members = discover(archive)
    assert all(isinstance(m, ZipMember) for m in members) and len(members) == 3
    volume = read_files_of_one_series(members)
    assert len(volume) == 3 and all("::" in s for s in volume.sources)
    assert not (tmp_path.parent / "evil").exists()


def test_plan_orders_reversed_normal():
    from pedetect.dicom.header import SliceHeader

    # feet-first style orientation: the normal points down, so z along it is -IPP_z
    headers = [
        SliceHeader(
            f"f{k}",
            "1",
            "1.1",
            f"1.1.{k}",
            4,
            4,
            position=(0, 0, float(k)),
            orientation=(1, 0, 0, 0, -1, 0),
            instance_number=k,
        )
        for k in range(3)
    ]
    plan = plan_series(headers)
    assert [h.sop for h in plan.slices] == ["1.1.2", "1.1.1", "1.1.0"]
    np.testing.assert_allclose(plan.z, [-2, -1, 0])


def test_no_patient_fields_in_metadata(tmp_path):
    files = ct_series(tmp_path, 2, rows=8, cols=8)
    volume = read_files_of_one_series([str(f) for f in files])
    text = repr(volume.meta) + repr(volume.failures) + repr(read_header(str(files[0])))
    assert "Secret" not in text and "SECRET-ID" not in text
