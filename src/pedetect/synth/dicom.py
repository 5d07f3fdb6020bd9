"""Writing a rendered series as DICOM CT Image Storage files, fast (or as one Enhanced CT file).

pydicom builds and encodes a per-series template once (every element that is the same on all slices);
each slice then only encodes its five own elements (SOP Instance UID, Instance Number, Image
Position, Slice Location, Pixel Data) in explicit VR little endian and joins the bytes. Compressed
transfer syntaxes encode each frame with pydicom's pylibjpeg encoders (RLE Lossless, JPEG 2000
Lossless) and encapsulate it. Every file is a complete Part 10 file that pydicom and GDCM read.

:func:`write_enhanced_series` writes the same series as one Enhanced CT Image Storage file instead
(``pedetect synth --enhanced``): the same pixels as frames, in InstanceNumber order (so the file's
frame order is the single-frame series' instance order, which may be shuffled), with position,
orientation, spacing and rescale in functional groups.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from pedetect import __version__
from pedetect.dicom.frames import frame_key
from pedetect.synth.phantom import StudyPlan, uid
from pedetect.synth.scanner import Scanner

TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless}
IMPLEMENTATION_UID = UID(uid("pedetect", "implementation"))
IMPLEMENTATION_VERSION = f"PEDETECT_{__version__}".replace(".", "_")[:16]
# Tags each slice writes itself, in file order.
_SOP, _INSTANCE, _POSITION, _LOCATION, _PIXELS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)
_VARYING = (_SOP, _INSTANCE, _POSITION, _LOCATION, _PIXELS)
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def ds_str(value: float) -> str:
    """A decimal string of at most 16 characters that reads back as the same float."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _template(plan: StudyPlan) -> Dataset:
    sc = plan.scanner
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    date = f"2020{1 + plan.index % 12:02d}{1 + plan.index % 28:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"SYN{plan.index:07d}"
    ds.Modality = "CT"
    ds.Manufacturer = sc.manufacturer
    if sc.model:
        ds.ManufacturerModelName = sc.model
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT PULMONARY ANGIOGRAM (SYNTHETIC PHANTOM)"
    ds.SeriesDescription = "CTPA AXIAL (SYNTHETIC)"
    ds.PatientName = f"SYNTHETIC^PHANTOM-{plan.patient}"
    ds.PatientID = f"SYNTH-{plan.patient}"
    # Type 2 attributes are present, empty where unknown, as real CT has them: DICOM results
    # (pedetect.hospital) copy the patient and study modules. A phantom has no birth date or sex.
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = ds_str(sc.thickness)
    ds.KVP = "100"
    ds.SpacingBetweenSlices = ds_str(sc.spacing)
    ds.ConvolutionKernel = sc.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = plan.series_uid
    ds.StudyID = f"{plan.index % 100000}"
    ds.SeriesNumber = sc.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = plan.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = sc.size
    ds.PixelSpacing = [ds_str(sc.pixel_spacing)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = sc.bits_stored
    ds.HighBit = sc.bits_stored - 1
    ds.PixelRepresentation = int(sc.signed)
    if sc.padding is not None:
        ds.add(DataElement(0x00280120, "SS" if sc.signed else "US", int(sc.padding)))
    centre, width = sc.window
    ds.WindowCenter = [ds_str(c) for c in centre] if len(centre) > 1 else ds_str(centre[0])
    ds.WindowWidth = [ds_str(w) for w in width] if len(width) > 1 else ds_str(width[0])
    ds.RescaleIntercept = ds_str(sc.intercept)
    ds.RescaleSlope = ds_str(sc.slope)
    ds.RescaleType = "HU"
    return ds


def _encode(ds: Dataset) -> list[bytes]:
    """The template's elements as explicit VR LE bytes, cut into chunks around the varying tags."""
    chunks = [bytearray() for _ in range(len(_VARYING))]
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem)
        chunks[sum(int(elem.tag) > t for t in _VARYING)] += fp.getvalue()
    return [bytes(c) for c in chunks]


def _frame_encoder(transfer_syntax_uid: str, sc: Scanner) -> Callable[[np.ndarray], bytes]:
    """What encodes one frame of ``sc``'s stored pixels in a compressed transfer syntax (pydicom's
    pylibjpeg encoders): the encoded bytes of a (rows, columns) array."""
    encoder = get_encoder(transfer_syntax_uid)
    options: dict[str, Any] = dict(
        rows=sc.size,
        columns=sc.size,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=sc.bits_stored,
        pixel_representation=int(sc.signed),
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )
    return lambda frame: encoder.encode(np.ascontiguousarray(frame), encoding_plugin="pylibjpeg", **options)


class SeriesWriter:
    """Writes the slices of one planned series; ``write(k, pixels)`` for slice k in position order."""

    def __init__(self, plan: StudyPlan, folder: Path, transfer_syntax: str = "explicit") -> None:
        if transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer syntax must be one of {sorted(TRANSFER_SYNTAXES)}")
        self.plan = plan
        self.folder = Path(folder)
        self.syntax = transfer_syntax
        self.ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
        self.chunks = _encode(_template(plan))
        sc = plan.scanner
        self.xy = f"{ds_str(sc.x0)}\\{ds_str(sc.y0)}\\"
        self.z = plan.scanner.z()
        self.meta_tail = (
            _element(0x00020010, b"UI", str(self.ts_uid).encode())
            + _element(0x00020012, b"UI", IMPLEMENTATION_UID.encode())
            + _element(0x00020013, b"SH", IMPLEMENTATION_VERSION.encode())
        )
        self.meta_head = _element(0x00020001, b"OB", b"\x00\x01") + _element(0x00020002, b"UI", CTImageStorage.encode())
        self._encode = None if transfer_syntax == "explicit" else _frame_encoder(self.ts_uid, sc)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _pixels(self, pixels: np.ndarray) -> bytes:
        if self._encode is None:
            return _element(
                _PIXELS,
                b"OW",
                np.ascontiguousarray(pixels)
                .astype("<u2" if not self.plan.scanner.signed else "<i2", copy=False)
                .tobytes(),
            )
        frame = self._encode(pixels)
        if len(frame) % 2:
            frame += b"\0"
        return (
            struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # empty basic offset table
            + struct.pack("<HHI", 0xFFFE, 0xE000, len(frame))
            + frame
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )

    def file_bytes(self, k: int, pixels: np.ndarray) -> bytes:
        plan = self.plan
        sop = plan.sop_uids[k].encode()
        meta = self.meta_head + _element(0x00020003, b"UI", sop) + self.meta_tail
        z = ds_str(float(self.z[k]))
        c = self.chunks
        return b"".join(
            (
                b"\0" * 128,
                b"DICM",
                _element(0x00020000, b"UL", struct.pack("<I", len(meta))),
                meta,
                c[0],
                _element(_SOP, b"UI", sop),
                c[1],
                _element(_INSTANCE, b"IS", str(int(plan.instance_numbers[k])).encode()),
                c[2],
                _element(_POSITION, b"DS", (self.xy + z).encode()),
                c[3],
                _element(_LOCATION, b"DS", z.encode()),
                c[4],
                self._pixels(pixels),
            )
        )

    def path(self, k: int) -> Path:
        return self.folder / f"{self.plan.sop_uids[k]}.dcm"

    def write(self, k: int, pixels: np.ndarray) -> Path:
        path = self.path(k)
        path.write_bytes(self.file_bytes(k, pixels))
        return path


def write_series(plan: StudyPlan, stored: np.ndarray, root: Path, transfer_syntax: str = "explicit") -> list[Path]:
    """All slices of a study under ``root/<Study>/<Series>/<SOP>.dcm``; returns the paths (position order)."""
    writer = SeriesWriter(plan, Path(root) / plan.study_uid / plan.series_uid, transfer_syntax)
    return [writer.write(k, stored[k]) for k in range(plan.n_slices)]


# ------------------------------------------------------------------------------------ Enhanced CT
# Top-level elements of the single-frame template that Enhanced CT keeps in functional groups (or drops).
_PER_FRAME_KEYWORDS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SliceLocation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "SpacingBetweenSlices",
)


def enhanced_sop_uid(plan: StudyPlan) -> str:
    """The SOPInstanceUID of a study's Enhanced CT file."""
    return uid("enhanced", plan.series_uid)


def enhanced_frame_numbers(plan: StudyPlan) -> np.ndarray:
    """Frame number (from 1) of each slice, in position order: frames are written in InstanceNumber order."""
    order = np.argsort(np.asarray(plan.instance_numbers), kind="stable")
    numbers = np.empty(len(order), dtype=np.int64)
    numbers[order] = np.arange(1, len(order) + 1)
    return numbers


def enhanced_slice_ids(plan: StudyPlan) -> list[str]:
    """The slice keys the reader gives the frames (``SOPInstanceUID#frame``), in position order."""
    sop = enhanced_sop_uid(plan)
    return [frame_key(sop, n) for n in enhanced_frame_numbers(plan)]


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def enhanced_dataset(plan: StudyPlan, stored: np.ndarray, transfer_syntax: str = "explicit") -> Dataset:
    """The series as one Enhanced CT Image Storage dataset (file meta included)."""
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax must be one of {sorted(TRANSFER_SYNTAXES)}")
    sc = plan.scanner
    ds = _template(plan)
    for keyword in _PER_FRAME_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    sop = enhanced_sop_uid(plan)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    numbers = enhanced_frame_numbers(plan)
    order = np.argsort(numbers)  # position index of frame 1, 2, …
    z = sc.z()
    ds.NumberOfFrames = len(order)
    rescale = _item(RescaleIntercept=ds_str(sc.intercept), RescaleSlope=ds_str(sc.slope), RescaleType="HU")
    shared = _item(
        PixelMeasuresSequence=Sequence(
            [_item(PixelSpacing=[ds_str(sc.pixel_spacing)] * 2, SliceThickness=ds_str(sc.thickness))]
        ),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])]),
    )
    # Rescale in the shared group for even studies, in each frame's own group for odd ones: the reader takes both.
    per_frame_rescale = plan.index % 2 == 1
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for number, k in enumerate(order, start=1):
        group = _item(
            FrameContentSequence=Sequence(
                [_item(StackID="1", InStackPositionNumber=int(number), DimensionIndexValues=[1, int(number)])]
            ),
            PlanePositionSequence=Sequence(
                [_item(ImagePositionPatient=[ds_str(sc.x0), ds_str(sc.y0), ds_str(float(z[k]))])]
            ),
        )
        if per_frame_rescale:
            group.PixelValueTransformationSequence = Sequence(
                [_item(RescaleIntercept=ds_str(sc.intercept), RescaleSlope=ds_str(sc.slope), RescaleType="HU")]
            )
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    dtype = "<i2" if sc.signed else "<u2"
    volume = np.ascontiguousarray(stored[order]).astype(dtype, copy=False)
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax == "explicit":
        ds.PixelData = volume.tobytes()
        ds["PixelData"].VR = "OW"
    else:
        encode = _frame_encoder(ts, sc)
        encoded = [encode(volume[i]) for i in range(len(volume))]
        ds.PixelData = encapsulate(encoded, has_bot=True)
        ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    return ds


def write_enhanced_series(plan: StudyPlan, stored: np.ndarray, root: Path, transfer_syntax: str = "explicit") -> Path:
    """A study as one Enhanced CT file ``root/<Study>/<Series>/<SOP>.dcm``; returns its path."""
    ds = enhanced_dataset(plan, stored, transfer_syntax)
    folder = Path(root) / plan.study_uid / plan.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
