"""Helpers of the DICOM / prepare / store tests: pydicom's real files, hand-made CT slices, bad files."""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT5N = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
CT2 = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CT2"


def real_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None and os.path.exists(path), f"pydicom test file {name} is not in the wheel"
    return path


def series_files(folder: Path) -> list[str]:
    files = sorted(glob.glob(os.fspath(folder / "*")))
    assert files, f"pydicom test series {folder} is not in the wheel"
    return files


def raw_pixels_explicit_le(path: str, rows: int, cols: int, dtype: str = "<i2") -> np.ndarray:
    """Stored values read straight from the file bytes (explicit VR little endian, 16 bit), without pydicom."""
    data = Path(path).read_bytes()
    tag = b"\xe0\x7f\x10\x00OW\x00\x00"
    at = data.rfind(tag)
    assert at > 0, "no (7FE0,0010) OW element"
    (length,) = struct.unpack("<I", data[at + 8 : at + 12])
    assert length == rows * cols * 2
    return np.frombuffer(data[at + 12 : at + 12 + length], dtype=dtype).reshape(rows, cols)


def make_ct(
    path: Path | str,
    pixels: np.ndarray,
    *,
    study: str,
    series: str,
    sop: str | None = None,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = (1, 0, 0, 0, 1, 0),
    instance: int | None = 1,
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding: int | None = None,
    bits_stored: int = 16,
    preamble: bool = True,
    spacing: Sequence[float] = (0.7, 0.7),
) -> Path:
    """Write one CT Image Storage slice (explicit VR little endian) from stored values ``pixels``
    (int16 → signed storage, uint16 → unsigned)."""
    pixels = np.asarray(pixels)
    assert pixels.dtype in (np.int16, np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop = sop or generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "SECRET-ID-123"
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{v}" for v in spacing]
    ds.SliceThickness = "1.25"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    signed = pixels.dtype == np.int16
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if padding is not None:
        ds.add_new(0x00280120, "SS" if signed else "US", int(padding))
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    if not preamble:  # no preamble, no file meta: an old-style implicit VR little endian dataset
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        del ds.file_meta
        write_dataset(buffer, ds)
        path.write_bytes(buffer.getvalue())
    return path


def phantom(
    rows: int = 32, cols: int = 32, seed: int = 0, signed: bool = True, intercept: float = -1024.0, slope: float = 1.0
) -> np.ndarray:
    """Stored values of a small body-like slice: air outside, soft tissue and a bright vessel inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    r = np.hypot((yy - rows / 2) / (rows / 2.5), (xx - cols / 2) / (cols / 2.5))
    hu = np.where(r < 1, 40.0, -1000.0) + rng.normal(0, 15, (rows, cols))
    hu[np.hypot(yy - rows / 2, xx - cols / 2) < rows / 8] = 300.0
    stored = np.rint((hu - intercept) / slope)
    if signed:
        return np.clip(stored, -32768, 32767).astype(np.int16)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def ct_series(
    folder: Path,
    n: int = 5,
    *,
    rows: int = 32,
    cols: int = 32,
    study: str | None = None,
    series: str | None = None,
    step: float = 2.5,
    reverse_instances: bool = True,
    **kwargs,
) -> list[Path]:
    """A small series whose InstanceNumber runs against position (file names in neither order)."""
    study = study or generate_uid()
    series = series or generate_uid()
    paths = []
    for k in range(n):
        z = 100.0 - step * k if reverse_instances else 100.0 + step * k
        paths.append(
            make_ct(
                folder / f"img_{(k * 7) % n:03d}",
                phantom(rows, cols, seed=k),
                study=study,
                series=series,
                position=(-50.0, -60.0, z),
                instance=k + 1,
                **kwargs,
            )
        )
    return paths


def bad_files(folder: Path, good_slice: Path) -> dict[str, Path]:
    """One file of each bad kind, next to good ones: name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    out["empty"] = folder / "empty.dcm"
    out["empty"].write_bytes(b"")
    out["text"] = folder / "notes.txt"
    out["text"].write_text("not an image\n" * 20)
    data = Path(good_slice).read_bytes()
    out["truncated_header"] = folder / "trunc_header"
    out["truncated_header"].write_bytes(data[:200])
    copy = pydicom.dcmread(good_slice)  # another slice of the same series, cut inside its pixel data
    copy.SOPInstanceUID = generate_uid()
    copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    copy.ImagePositionPatient[2] = float(copy.ImagePositionPatient[2]) + 0.5
    out["truncated_pixels"] = folder / "trunc_pixels"
    copy.save_as(out["truncated_pixels"])
    data = out["truncated_pixels"].read_bytes()
    out["truncated_pixels"].write_bytes(data[: len(data) - 100])
    nopix = pydicom.dcmread(good_slice)
    del nopix.PixelData
    nopix.SOPInstanceUID = generate_uid()
    nopix.file_meta.MediaStorageSOPInstanceUID = nopix.SOPInstanceUID
    out["no_pixels"] = folder / "no_pixels"
    nopix.save_as(out["no_pixels"])
    return out


def reference_window(hu: np.ndarray) -> np.ndarray:
    """The default windows written out by hand: lung L-600/W1500, PE L100/W700, mediastinal L40/W400."""
    out = []
    for level, width in [(-600, 1500), (100, 700), (40, 400)]:
        out.append(
            np.round(np.clip((hu.astype(np.float64) - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
        )
    return np.stack(out, -1)
