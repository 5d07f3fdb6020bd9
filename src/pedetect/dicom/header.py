"""DICOM headers: recognise a file by content and take the few fields the pipeline needs.

Only geometry, UIDs and pixel-format fields are read; patient-identifying fields (names, IDs,
birth dates) are never read, logged or stored. Problems are raised as :class:`DicomError` with a
short reason that ends up in ``failures.parquet``.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pedetect.dicom.frames import (
    DEFLATED,
    FrameError,
    encapsulated_frame_ranges,
    frame_geometry,
    frame_key,
    native_frame_ranges,
)
from pedetect.dicom.pixels import NATIVE_LITTLE_ENDIAN, check_declared_size, padding_range, rescale
from pedetect.dicom.source import (
    Source,
    SourceError,
    ZipMember,
    is_zip_data,
    looks_like_dicom,
    open_path,
    read_bytes,
    read_head,
    source_label,
    source_stat,
)
from pedetect.dicom.values import numbers

# Pixel data we can read as single-frame grayscale images.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Only CT images enter the store (an MR or a secondary capture windowed as if it held HU is noise the
# model was never trained on). The SOP classes of CT (PS3.4 B.5): CT Image Storage, and Enhanced and
# Legacy Converted Enhanced CT, whose frames are slices (pedetect.dicom.frames).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
CT_SOP_CLASSES = (CT_IMAGE_STORAGE, *ENHANCED_CT_CLASSES)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class DicomError(SourceError):
    """A file that cannot be used; ``reason`` is what ``failures.parquet`` records."""


def is_input_failure(error: BaseException) -> bool:
    """True for what reading one bad file may raise: any Exception, and the panic of a decoder
    written in Rust (pyo3's PanicException derives from BaseException, like KeyboardInterrupt)."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def describe_error(error: BaseException, limit: int = 160) -> str:
    """``Type: message`` of an exception, one line, capped (messages never carry patient fields we read)."""
    message = " ".join(str(error).split())
    if len(message) > limit:
        message = message[: limit - 1] + "…"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@dataclass
class SliceHeader:
    """What ordering and grouping need from one DICOM file (no patient fields)."""

    source: Any  # a path (str) or a ZipMember
    study: str
    series: str
    sop: str
    rows: int
    cols: int
    position: tuple[float, float, float] | None = None  # ImagePositionPatient
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6)
    instance_number: int | None = None
    slice_location: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    modality: str = ""
    transfer_syntax: str = ""
    size: int = 0  # file size in bytes
    mtime_ns: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return source_label(self.source)

    def as_record(self) -> dict:
        record = asdict(self)
        record["source"] = self.source
        return record


def printable(text: str, limit: int = 64) -> str:
    """A value taken from a file, safe to put in a reason: printable ASCII, capped at ``limit``."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(text).strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sop_class_name(uid: str) -> str:
    """``Name (uid)`` of a SOP class as failure reasons give it (pydicom's name; the UID alone when unknown)."""
    uid = printable(uid)
    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else f"SOP class {uid or '(empty)'}"


def _sop_class(ds: Any) -> str:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID, else ``""``."""
    uid = _text(ds, "SOPClassUID")
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    return uid


def _check_ct_image(ds: Any, sop_class: str) -> bool:
    """Raise :class:`DicomError` unless ``ds`` (of a CT SOP class, or of none) is a CT image the read
    path can use. A file without any SOP class UID (old or hand-edited exports) is taken as CT when
    its Modality says CT, and the caller records that; without either it is a failure. Returns True
    when taken by Modality."""
    if not sop_class:
        modality = _text(ds, "Modality")
        if modality.upper() != "CT":
            raise DicomError(
                f"not known to be a CT image: no SOP class UID, Modality {printable(modality) or '(none)'}"
            )
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric and photometric.upper() not in GRAYSCALE:
        raise DicomError(f"not a grayscale image (PhotometricInterpretation {printable(photometric)})")
    return not sop_class


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError, OverflowError):
        return None
    return numbers(value, n)


def _float(ds: Any, keyword: str) -> float | None:
    values = _floats(ds, keyword, 1)
    return values[0] if values else None


def _words(ds: Any, keyword: str) -> tuple[str, ...]:
    """The values of a multi-valued text field (ImageType, ConvolutionKernel), printable; () when
    absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # an odd value of a field that only series selection reads: as absent
        return ()
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        items: list[Any] = str(value).split("\\")
    else:
        try:
            items = list(value)
        except TypeError:
            items = [value]
    return tuple(printable(str(v)).strip() for v in items if str(v).strip())


def series_fields(ds: Any) -> dict[str, Any]:
    """What choosing a study's CTPA series reads of a file besides its geometry (no patient field):
    ImageType (upper case), ConvolutionKernel, and whether ContrastBolusAgent names an agent."""
    try:
        contrast = bool(_text(ds, "ContrastBolusAgent"))
    except Exception:  # as for _words
        contrast = False
    return {
        "image_type": tuple(word.upper() for word in _words(ds, "ImageType")),
        "kernel": " ".join(_words(ds, "ConvolutionKernel")),
        "contrast": contrast,
    }


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def dcmread_source(source: Source, *, header_only: bool = False, data: bytes | None = None) -> Any:
    """Parse a source with pydicom (``header_only``: pixel data deferred, not read).

    Raises :class:`DicomError` for empty files, non-DICOM content and unparsable headers.
    """
    if data is None and header_only and not isinstance(source, ZipMember):
        head = read_head(source)
    else:
        if data is None:
            data = read_bytes(source)
        head = data[:132]
    if not head:
        raise DicomError("empty file (0 bytes)")
    if not looks_like_dicom(head):
        if is_zip_data(head):
            raise DicomError("not DICOM: a zip archive (archives inside the input are not opened)")
        raise DicomError("not DICOM (no DICM marker and no DICOM header at the start)")
    preamble = len(head) >= 132 and head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not header_only:
                assert data is not None  # read above
                ds = pydicom.dcmread(io.BytesIO(data), force=not preamble)
                # pydicom gives back an empty dataset for a file that ends inside encapsulated
                # (compressed) frames; its header alone still reads.
                if len(ds) == 0 and len(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=not preamble)):
                    raise DicomError("pixel data unreadable (the file ends inside its encapsulated frames: truncated)")
                return ds
            fp: Any
            if data is not None:
                fp = io.BytesIO(data)
            else:
                assert not isinstance(source, ZipMember)  # a zip member's bytes are read above
                fp = open_path(source)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not preamble)
                ds._pedetect_pixels = _pixel_element(fp, ds)
            finally:
                fp.close()
            return ds
    except InvalidDicomError as error:
        raise DicomError(f"not DICOM ({describe_error(error)})") from None
    except (
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        NotImplementedError,
        struct.error,
    ) as error:
        raise DicomError(f"DICOM header unreadable or truncated ({describe_error(error)})") from None


_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}


def _pixel_element(fp: Any, ds: Any) -> dict | None:
    """Where the pixel data element starts, read from the bytes after the header (pydicom's
    ``stop_before_pixels`` leaves the file there): keyword, value offset and declared length."""
    head = fp.read(12)
    if len(head) < 8:
        return None
    implicit, little = getattr(ds, "original_encoding", (False, True))
    endian = "<" if little is not False else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    keyword = _PIXEL_TAGS.get((group << 16) | element)
    if keyword is None:
        return None
    start = fp.tell() - len(head)
    if implicit:
        (length,) = struct.unpack(endian + "I", head[4:8])
        return {"keyword": keyword, "offset": start + 8, "length": length}
    if len(head) < 12:
        return None
    (length,) = struct.unpack(endian + "I", head[8:12])
    return {"keyword": keyword, "offset": start + 12, "length": length}


def headers_from_dataset(ds: Any, source: Source, *, size: int = 0, mtime_ns: int = 0) -> list[SliceHeader]:
    """The :class:`SliceHeader` of each slice of a parsed dataset (one; one per frame of an Enhanced
    CT file); raises :class:`DicomError` when the file is unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _headers(ds, source, size, mtime_ns)
    except DicomError:
        raise
    except FrameError as error:
        raise DicomError(f"multi-frame image unreadable ({error})") from None
    except Exception as error:  # malformed values deep in the header
        raise DicomError(f"DICOM header unreadable ({describe_error(error)})") from None


# The header fields read per file, with their tags and VRs: decoded straight from the raw bytes
# (pydicom's per-element conversion machinery costs more than the rest of the scan).
_FIELDS: dict[str, tuple[int, str]] = {
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "SOPClassUID": (0x00080016, "UI"),
    "Modality": (0x00080060, "CS"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "SamplesPerPixel": (0x00280002, "US"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "PixelPaddingValue": (0x00280120, "US or SS"),
    "PixelPaddingRangeLimit": (0x00280121, "US or SS"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"),
    "PixelSpacing": (0x00280030, "DS"),
    "SliceThickness": (0x00180050, "DS"),
    "SliceLocation": (0x00201041, "DS"),
    "RescaleSlope": (0x00281053, "DS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "InstanceNumber": (0x00200013, "IS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "PhotometricInterpretation": (0x00280004, "CS"),
}


class _RawView:
    """``get`` / ``in`` over a dataset's header fields, decoding raw little-endian values directly;
    anything unusual (converted elements, big endian, odd values) goes through pydicom."""

    def __init__(self, ds: Any):
        self.ds = ds
        self._dict = getattr(ds, "_dict", {})
        self._little = getattr(ds, "original_encoding", (None, None))[1] is True

    def __contains__(self, keyword: str) -> bool:
        spec = _FIELDS.get(keyword)
        return spec[0] in self._dict if spec is not None else keyword in self.ds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds, name)

    def get(self, keyword: str, default: Any = None) -> Any:
        spec = _FIELDS.get(keyword)
        if spec is None or not self._little:
            return self.ds.get(keyword, default)

        element = self._dict.get(spec[0])
        if element is None:
            return default
        if not isinstance(element, RawDataElement):
            return self.ds.get(keyword, default)
        raw = element.value
        if raw is None or len(raw) == 0:
            return default
        vr = element.VR if element.VR in ("US", "SS") else spec[1]
        try:
            if vr in ("UI", "CS"):
                return raw.rstrip(b"\x00 ").decode("ascii").strip()
            if vr in ("DS", "IS"):
                parts = [p.strip() for p in raw.rstrip(b"\x00").decode("ascii").split("\\")]
                values = [float(p) if vr == "DS" else int(p) for p in parts]
                return values[0] if len(values) == 1 else values
            if vr == "US or SS":
                vr = "SS" if self.get("PixelRepresentation") == 1 else "US"
            if vr in ("US", "SS") and len(raw) % 2 == 0:
                values = list(struct.unpack("<" + ("h" if vr == "SS" else "H") * (len(raw) // 2), raw))
                return values[0] if len(values) == 1 else values
        except (ValueError, UnicodeDecodeError, struct.error):
            pass
        return self.ds.get(keyword, default)


def _headers(ds: Any, source: Source, size: int, mtime_ns: int) -> list[SliceHeader]:
    pixel_element = getattr(ds, "_pedetect_pixels", None)
    sop_class = _sop_class(ds)
    if sop_class and sop_class not in CT_SOP_CLASSES:
        raise DicomError(f"not a CT image: {sop_class_name(sop_class)}")
    if pixel_element is None and not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        name = sop_class_name(sop_class) if sop_class else "unknown SOP class"
        if "SOPClassUID" not in ds or not _text(ds, "SOPInstanceUID"):
            raise DicomError(f"DICOM header truncated or empty (no dataset after the file meta; {name})")
        _check_ct_image(ds, sop_class)
        raise DicomError(f"DICOM without pixel data ({name}: truncated before the pixels?)")
    ds = _RawView(ds)
    taken_by_modality = _check_ct_image(ds, sop_class)
    series = _text(ds, "SeriesInstanceUID")
    sop = _text(ds, "SOPInstanceUID")
    if not series:
        raise DicomError("DICOM without SeriesInstanceUID")
    if not sop:
        raise DicomError("DICOM without SOPInstanceUID")
    frames = _int(ds, "NumberOfFrames") or 1
    samples = _int(ds, "SamplesPerPixel") or 1
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 1 or cols < 1:
        raise DicomError("DICOM without Rows/Columns")
    multi_frame = sop_class in ENHANCED_CT_CLASSES
    try:
        # A multi-frame file is read a frame at a time: the cap is per frame, and its frame count is
        # checked against the bytes the file holds (pedetect.dicom.frames) before any frame is read.
        check_declared_size(rows, cols, 1 if multi_frame else max(frames, 1), max(samples, 1))
    except ValueError as error:
        raise DicomError(f"image too large: {error}") from None
    if frames > 1 and not multi_frame:
        raise DicomError(f"multi-frame image ({frames} frames) is not supported")
    if frames < 1:
        raise DicomError(f"NumberOfFrames is {frames}")
    if samples != 1:
        raise DicomError(f"not a grayscale image (SamplesPerPixel={samples})")
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if multi_frame:
        return _frame_headers(ds, source, size, mtime_ns, pixel_element, syntax, rows, cols, frames, series, sop)
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    extra: dict = {"taken_as_ct_by_modality": True} if taken_by_modality else {}
    extra["series"] = series_fields(ds)
    native = _native_pixels(ds, pixel_element, syntax, rows, cols)
    if native is not None:
        extra["native"] = native
    return [
        SliceHeader(
            source=source,
            study=_text(ds, "StudyInstanceUID"),
            series=series,
            sop=sop,
            rows=rows,
            cols=cols,
            position=position,  # type: ignore[arg-type]
            orientation=orientation,
            instance_number=_int(ds, "InstanceNumber"),
            slice_location=_float(ds, "SliceLocation"),
            pixel_spacing=spacing,  # type: ignore[arg-type]
            slice_thickness=_float(ds, "SliceThickness"),
            modality=_text(ds, "Modality"),
            transfer_syntax=syntax,
            size=size,
            mtime_ns=mtime_ns,
            extra=extra,
        )
    ]


# How a frame's pixel values are stored (the Image Pixel module's description, besides Rows and Columns).
PIXEL_DESCRIPTION = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)
# The pixel module of a multi-frame file, copied into each frame's one-frame dataset.
_PIXEL_MODULE = (*PIXEL_DESCRIPTION, "PixelPaddingValue", "PixelPaddingRangeLimit")


def _frame_headers(
    ds: Any,
    source: Source,
    size: int,
    mtime_ns: int,
    element: dict | None,
    syntax: str,
    rows: int,
    cols: int,
    frames: int,
    series: str,
    sop: str,
) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame of an Enhanced CT file (:mod:`pedetect.dicom.frames`)."""
    if element is None:
        raise DicomError("DICOM without pixel data (multi-frame image: truncated before the pixels?)")
    if element["keyword"] != "PixelData":
        raise DicomError(f"multi-frame image with {element['keyword']} is not supported")
    if syntax == DEFLATED:
        raise DicomError(
            "multi-frame image in Deflated Explicit VR Little Endian is not supported: its frames cannot be read one at a time"
        )
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    if not little:
        raise DicomError("multi-frame image in big endian is not supported")
    if element["length"] == 0xFFFFFFFF:
        fp: Any = io.BytesIO(read_bytes(source)) if isinstance(source, ZipMember) else open_path(source)
        try:
            ranges = encapsulated_frame_ranges(
                fp, element["offset"], size, frames, little, ds.get("ExtendedOffsetTable")
            )
        finally:
            fp.close()
    else:
        allocated = _int(ds, "BitsAllocated") or 16
        if allocated not in (8, 16, 32):
            raise DicomError(f"multi-frame image with BitsAllocated {allocated} is not supported")
        ranges = native_frame_ranges(
            element["offset"], element["length"], size - element["offset"], frames, rows * cols * allocated // 8
        )
    geometry = frame_geometry(ds, frames)
    pixel_module = {}
    for keyword in _PIXEL_MODULE:
        value = ds.get(keyword)
        pixel_module[keyword] = value if not isinstance(value, list) else value[0]
    study, modality = _text(ds, "StudyInstanceUID"), _text(ds, "Modality")
    fields = series_fields(ds)
    return [
        SliceHeader(
            source=source,
            study=study,
            series=series,
            sop=frame_key(sop, k + 1),
            rows=rows,
            cols=cols,
            position=g["position"],
            orientation=g["orientation"],
            instance_number=k + 1,
            slice_location=None,
            pixel_spacing=g["pixel_spacing"],
            slice_thickness=g["slice_thickness"],
            modality=modality,
            transfer_syntax=syntax,
            size=size,
            mtime_ns=mtime_ns,
            extra={
                "series": fields,
                "frame": {
                    "sop": sop,
                    "number": k + 1,
                    "of": frames,
                    "ranges": ranges[k],
                    "slope": g["slope"],
                    "intercept": g["intercept"],
                    "pixel_module": pixel_module,
                },
            },
        )
        for k, g in enumerate(geometry)
    ]


def _native_pixels(ds: Any, element: dict | None, syntax: str, rows: int, cols: int) -> dict | None:
    """How to read this slice's pixels straight from its bytes (uncompressed little-endian 16-bit
    single-frame data without a modality LUT sequence), or None: then pydicom decodes it."""
    if element is None or element["keyword"] != "PixelData" or element["length"] == 0xFFFFFFFF:
        return None
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if syntax and syntax not in NATIVE_LITTLE_ENDIAN or little is False:
        return None
    allocated = _int(ds, "BitsAllocated") or 0
    stored = _int(ds, "BitsStored") or allocated
    high = _int(ds, "HighBit")
    high = stored - 1 if high is None else high
    if allocated != 16 or high != stored - 1 or not 1 <= stored <= 16 or "ModalityLUTSequence" in ds:
        return None
    slope, intercept = rescale(ds)
    return {
        "offset": int(element["offset"]),
        "length": int(element["length"]),
        "signed": (_int(ds, "PixelRepresentation") or 0) == 1,
        "bits": stored,
        "slope": slope,
        "intercept": intercept,
        "padding": padding_range(ds),
    }


def read_header(source: Source) -> SliceHeader:
    """Read the header of one single-slice file (pixel data not decoded); raises :class:`DicomError`
    (for a multi-frame file too: :func:`read_headers` reads those)."""
    headers = read_headers(source)
    if len(headers) != 1:
        raise DicomError(f"a multi-frame image of {len(headers)} frames where one slice was expected")
    return headers[0]


def read_headers(source: Source) -> list[SliceHeader]:
    """The headers of one file's slices: one, or one per frame of an Enhanced CT file (pixel data
    not decoded); raises :class:`DicomError`."""
    try:
        size, mtime_ns = source_stat(source)
        if size == 0:
            raise DicomError("empty file (0 bytes)")
        ds = dcmread_source(source, header_only=True)
    except DicomError:
        raise
    except SourceError as error:
        raise DicomError(error.reason) from None
    except (OSError, KeyError) as error:
        raise DicomError(f"unreadable ({describe_error(error)})") from None
    return headers_from_dataset(ds, source, size=size, mtime_ns=mtime_ns)
