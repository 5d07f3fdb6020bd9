"""Enhanced CT: the frames of one multi-frame file as slices (docs/design.md, "The slice store").

Enhanced CT Image Storage and Legacy Converted Enhanced CT Image Storage hold a whole series in one
file: ``NumberOfFrames`` frames whose geometry and rescale are in functional groups, each either
in the frame's item of PerFrameFunctionalGroupsSequence or, when the same for every frame, in
SharedFunctionalGroupsSequence (PS3.3 C.7.6.16). Per frame this module takes:

- position: PlanePositionSequence > ImagePositionPatient;
- orientation: PlaneOrientationSequence > ImageOrientationPatient;
- pixel spacing, slice thickness: PixelMeasuresSequence > PixelSpacing, SliceThickness;
- rescale: PixelValueTransformationSequence > RescaleSlope, RescaleIntercept (else the top-level
  values, else 1 and 0).

Each frame becomes a :class:`~pedetect.dicom.header.SliceHeader` whose ``sop`` is the frame's key,
``<SOPInstanceUID>#<frame number>`` (:func:`frame_key`; frame numbers count from 1 as DICOM's do),
and whose ``instance_number`` is the frame number (the fallback order is the file's frame order).

Memory stays at one frame: the header scan records where each frame's bytes are (native data: an
offset; encapsulated data: its fragments, found by walking the item headers without reading their
values), and :func:`read_frame` reads just those bytes and decodes them as a one-frame dataset
through the same decoders and windowing as a single-frame slice. A frame count the file cannot hold
(native data shorter than frames × rows × columns, fewer fragments than frames, fewer per-frame
items than frames) fails the file before anything is allocated for its frames.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from pedetect.dicom.pixels import window_dataset
from pedetect.dicom.source import Source, SourceError, ZipMember, open_path, read_bytes
from pedetect.dicom.values import numbers

FRAME_SEPARATOR = "#"
# Walking item headers costs a read each: a hostile file of millions of empty items is refused early.
MAX_FRAGMENTS = 1 << 20
ENCAPSULATED_UNDEFINED = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"


class FrameError(ValueError):
    """A multi-frame file whose frames cannot be read; the message is the failure's reason."""


def frame_key(sop: str, number: int) -> str:
    """The slice key of frame ``number`` (from 1) of the multi-frame instance ``sop``: ``sop#number``.
    A UID holds only digits and dots, so the key cannot be mistaken for one, nor collide with one."""
    return f"{sop}{FRAME_SEPARATOR}{int(number)}"


def split_frame_key(key: str) -> tuple[str, int | None]:
    """``(SOPInstanceUID, frame number)`` of a slice key; ``(key, None)`` for a single-frame slice."""
    sop, sep, number = str(key).rpartition(FRAME_SEPARATOR)
    if sep and number.isdigit():
        return sop, int(number)
    return str(key), None


# --------------------------------------------------------------------------------------------------
# Functional groups


def _first_item(ds: Any, keyword: str) -> Any:
    sequence = ds.get(keyword) if ds is not None else None
    try:
        return sequence[0] if sequence is not None and len(sequence) else None
    except (TypeError, IndexError):
        return None


def _group_value(frame_item: Any, shared_item: Any, sequence: str, keyword: str) -> Any:
    """``keyword`` of the macro ``sequence`` for one frame: its own functional group first, then the shared one."""
    for group in (frame_item, shared_item):
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            value = item.get(keyword)
            if value is not None and str(value).strip() != "":
                return value
    return None


def frame_geometry(ds: Any, frames: int) -> list[dict]:
    """Per frame (file order): ``position``, ``orientation``, ``pixel_spacing``, ``slice_thickness``,
    ``slope`` and ``intercept`` from the functional groups (None where absent)."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_items = len(per_frame) if per_frame is not None else 0
    if per_frame is not None and n_items < frames:
        raise FrameError(f"NumberOfFrames is {frames} but PerFrameFunctionalGroupsSequence holds {n_items} item(s)")
    top_slope, top_intercept = numbers(ds.get("RescaleSlope"), 1), numbers(ds.get("RescaleIntercept"), 1)
    out = []
    for k in range(frames):
        item = per_frame[k] if per_frame is not None else None
        slope = numbers(_group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope"), 1) or top_slope
        intercept = (
            numbers(_group_value(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"), 1)
            or top_intercept
        )
        thickness = numbers(_group_value(item, shared, "PixelMeasuresSequence", "SliceThickness"), 1)
        out.append(
            {
                "position": numbers(_group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
                "orientation": numbers(
                    _group_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),
                "pixel_spacing": numbers(_group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
                "slice_thickness": thickness[0] if thickness else None,
                "slope": slope[0] if slope else 1.0,
                "intercept": intercept[0] if intercept else 0.0,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# Where each frame's bytes are


def native_frame_ranges(
    offset: int, declared: int, available: int, frames: int, frame_bytes: int
) -> list[list[tuple[int, int]]]:
    """``[(offset, length)]`` of each frame of native (uncompressed) pixel data, or :class:`FrameError`
    when the element (``declared`` bytes) or the file (``available`` bytes after ``offset``) is
    shorter than the frames it declares."""
    need = frames * frame_bytes
    have = min(declared, available)
    if have < need:
        raise FrameError(
            f"pixel data holds {have} bytes, {frames} frame(s) of {frame_bytes} bytes need {need}: the file cannot hold its frames"
        )
    return [[(offset + k * frame_bytes, frame_bytes)] for k in range(frames)]


def _items(fp: Any, offset: int, end: int, little: bool) -> list[tuple[int, int]]:
    """``(value offset, length)`` of the items of encapsulated pixel data starting at ``offset``
    (the Basic Offset Table first), read from the item headers alone, up to the sequence delimiter."""
    endian = "<" if little else ">"
    items: list[tuple[int, int]] = []
    at = offset
    while at + 8 <= end:
        fp.seek(at)
        head = fp.read(8)
        if len(head) < 8:
            break
        group, element, length = struct.unpack(endian + "HHI", head)
        tag = (group << 16) | element
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000:
            raise FrameError(
                f"encapsulated pixel data damaged (tag ({group:04X},{element:04X}) where an item was expected)"
            )
        if length == ENCAPSULATED_UNDEFINED or at + 8 + length > end:
            raise FrameError(
                f"encapsulated pixel data damaged or truncated (an item of {length} bytes past the end of the file)"
            )
        items.append((at + 8, length))
        if len(items) > MAX_FRAGMENTS:
            raise FrameError(f"encapsulated pixel data of over {MAX_FRAGMENTS} fragments")
        at += 8 + length
    return items


def encapsulated_frame_ranges(
    fp: Any, offset: int, end: int, frames: int, little: bool, extended: bytes | None = None
) -> list[list[tuple[int, int]]]:
    """The fragments ``[(offset, length), …]`` of each frame of encapsulated pixel data: one fragment
    a frame when the counts agree, else grouped by the Extended or Basic Offset Table; a file whose
    fragments cannot be told apart into ``frames`` frames raises :class:`FrameError`."""
    items = _items(fp, offset, end, little)
    if not items:
        raise FrameError("encapsulated pixel data without a Basic Offset Table item")
    (bot_at, bot_length), fragments = items[0], items[1:]
    if len(fragments) < frames:
        raise FrameError(
            f"NumberOfFrames is {frames} but the encapsulated pixel data holds {len(fragments)} fragment(s): the file cannot hold its frames"
        )
    if len(fragments) == frames:
        return [[fragment] for fragment in fragments]
    if frames == 1:
        return [fragments]
    starts: list[int] | None = None
    if extended:
        starts = [int(v) for v in np.frombuffer(extended[: len(extended) // 8 * 8], dtype="<u8" if little else ">u8")]
    elif bot_length:
        fp.seek(bot_at)
        table = fp.read(bot_length)
        starts = [int(v) for v in np.frombuffer(table[: len(table) // 4 * 4], dtype="<u4" if little else ">u4")]
    if not starts or len(starts) != frames:
        raise FrameError(
            f"{len(fragments)} fragments for {frames} frames and no offset table of {frames} entries: the frames cannot be told apart"
        )
    # Offsets in the tables count from the first fragment's item tag.
    first = fragments[0][0] - 8
    out: list[list[tuple[int, int]]] = [[] for _ in range(frames)]
    frame = -1
    for value_at, length in fragments:
        relative = value_at - 8 - first
        while frame + 1 < frames and relative >= starts[frame + 1]:
            frame += 1
        if frame < 0:
            raise FrameError("the offset table does not start at the first fragment")
        out[frame].append((value_at, length))
    if any(not ranges for ranges in out):
        raise FrameError("the offset table names a frame without fragments")
    return out


# --------------------------------------------------------------------------------------------------
# Reading one frame

_LAST_MEMBER: dict[str, Any] = {}


def _member_bytes(source: ZipMember) -> bytes:
    """A zip member's bytes, kept for the next frame of the same member (a member cannot be read in
    part without inflating it from its start; at most one member, within the reader's 1 GiB cap)."""
    if _LAST_MEMBER.get("source") != source:
        _LAST_MEMBER.clear()
        _LAST_MEMBER.update(source=source, data=read_bytes(source))
    return _LAST_MEMBER["data"]


def read_ranges(source: Source, ranges: list[tuple[int, int]], size: int) -> bytes:
    """The bytes of ``ranges`` of a source (which must still be ``size`` bytes long)."""
    parts: list[bytes] = []
    if isinstance(source, ZipMember):
        data = _member_bytes(source)
        if len(data) != size:
            raise SourceError("file changed while preparing (its size differs from the scan)")
        parts = [data[offset : offset + length] for offset, length in ranges]
    else:
        with open_path(source) as f:
            if f.size != size:
                raise SourceError("file changed while preparing (its size differs from the scan)")
            for offset, length in ranges:
                f.seek(offset)
                parts.append(f.read(length))
    got = sum(len(p) for p in parts)
    want = sum(length for _, length in ranges)
    if got != want:
        raise SourceError(f"pixel data unreadable (truncated: {got} of {want} bytes)")
    return b"".join(parts)


def frame_dataset(header: Any) -> Any:
    """One frame of a multi-frame file as a single-frame dataset (the file's pixel module, the frame's
    rescale): what :func:`pedetect.dicom.pixels.window_dataset` reads for a single-frame slice."""
    frame = header.extra["frame"]
    pixel = frame["pixel_module"]
    data = read_ranges(header.source, frame["ranges"], header.size)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(header.transfer_syntax or "1.2.840.10008.1.2.1")
    for keyword, value in pixel.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.Rows, ds.Columns = header.rows, header.cols
    ds.NumberOfFrames = 1
    ds.RescaleSlope, ds.RescaleIntercept = frame["slope"], frame["intercept"]
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
    ds.PixelData = encapsulate([data]) if encapsulated else data
    ds["PixelData"].VR = "OB" if encapsulated or int(pixel.get("BitsAllocated") or 16) <= 8 else "OW"
    return ds


def read_frame(header: Any, windows: Any, image_size: int | None, *, bgr: bool = False) -> np.ndarray:
    """One frame of a multi-frame file, windowed (uint8 ``(H, W, 3)``), as :func:`pedetect.dicom.read.read_slice`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return window_dataset(frame_dataset(header), windows, image_size, bgr=bgr)
