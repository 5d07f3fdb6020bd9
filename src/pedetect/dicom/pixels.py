"""Pixels → Hounsfield units → windowed uint8 channels (docs/design.md, "Data flow").

HU = stored value × RescaleSlope + RescaleIntercept, per slice, as floats; signed and unsigned
storage; PixelPaddingValue (and PixelPaddingRangeLimit) become air. Each window (level L, width W)
maps HU to ``round(clip((HU − (L − W/2)) / W, 0, 1) × 255)``.

The fast path never computes HU per pixel: 16-bit stored values index a 65,536-entry table holding
the three window values of every possible stored value (built once per distinct slope, intercept,
padding and storage format, and cached). :func:`window_hu` is the plain float reference of the same
mapping; tests hold the two equal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
from pydicom.encaps import get_frame
from pydicom.uid import UID

# (level, width) of the lung, PE and mediastinal windows: channels R, G, B.
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0))
WINDOW_NAMES: tuple[str, ...] = ("lung", "pe", "mediastinal")
AIR_HU = -1000.0

NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
# The most pixels one slice may declare. CT slices are at most 2048 × 2048; the cap bounds every
# buffer a decoder allocates for a slice (a hostile header cannot ask for gigabytes).
MAX_SLICE_PIXELS = 4096 * 4096


def as_windows(windows: Sequence[Sequence[float]] | None) -> tuple[tuple[float, float], ...]:
    """Normalise windows to a hashable tuple of ``(level, width)`` floats (default: :data:`DEFAULT_WINDOWS`)."""
    if windows is None:
        return DEFAULT_WINDOWS
    out = tuple((float(level), float(width)) for level, width in windows)
    if not out or any(not (width > 0) for _, width in out):
        raise ValueError(f"windows need a positive width: {out}")
    return out


def window_hu(hu: np.ndarray, windows: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """Reference windowing: float HU ``(H, W)`` → uint8 ``(H, W, C)``, one channel per window."""
    hu = np.asarray(hu, dtype=np.float64)
    channels = [
        np.round(np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0) * 255.0).astype(np.uint8)
        for level, width in as_windows(windows)
    ]
    return np.stack(channels, axis=-1)


@lru_cache(maxsize=16)
def _air_values(windows: tuple) -> tuple[int, ...]:
    return tuple(int(v) for v in window_hu(np.array([[AIR_HU]]), windows)[0, 0])


def air_values(windows: Sequence[Sequence[float]] | None = None) -> tuple[int, ...]:
    """The windowed value of air in each channel (the fill of padding added by resizing)."""
    return _air_values(as_windows(windows))


# --------------------------------------------------------------------------------------------------
# Modality: stored values and rescale


def rescale(ds: Any) -> tuple[float, float]:
    """``(slope, intercept)`` of one slice as floats (1, 0 when absent)."""

    def number(keyword: str, default: float) -> float:
        value = ds.get(keyword)
        if value is None or str(value).strip() == "":
            return default
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{keyword} is not a finite number")
        return value

    return number("RescaleSlope", 1.0), number("RescaleIntercept", 0.0)


def padding_range(ds: Any) -> tuple[int, int] | None:
    """Stored-value range ``(low, high)`` that is padding (PixelPaddingValue … RangeLimit), if any."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    try:
        first = int(value[0] if isinstance(value, (list, tuple, bytes)) else value)
        limit = ds.get("PixelPaddingRangeLimit")
        last = int(limit) if limit is not None else first
    except (TypeError, ValueError, IndexError):
        return None
    return (min(first, last), max(first, last))


def check_declared_size(rows: int, cols: int, frames: int = 1, samples: int = 1) -> None:
    """Raise ValueError when a header declares more pixel values than one slice may hold."""
    if rows < 1 or cols < 1 or frames < 1 or samples < 1:
        raise ValueError(f"declared size {rows}x{cols} ({frames} frame(s), {samples} sample(s)) is empty")
    if rows * cols * frames * samples > MAX_SLICE_PIXELS:
        raise ValueError(
            f"declared size {rows}x{cols} ({frames} frame(s), {samples} sample(s)) is over {MAX_SLICE_PIXELS} values per slice"
        )


# The decoder each compressed transfer syntax must use when pydicom's default order is unsafe: gdcm
# aborts the whole process (an uncaught C++ exception) on some damaged JPEG 2000 frames, where
# pylibjpeg's OpenJPEG raises an error (tests/data/fuzz_regressions/j2k_gdcm_abort.dcm).
DECODING_PLUGIN = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg",
}

# JPEG 2000 and High-Throughput JPEG 2000; the JPEG and JPEG-LS syntaxes are 1.2.840.10008.1.2.4.50 to .81.
JPEG2000_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)
JPEG_SYNTAX_ROOT = "1.2.840.10008.1.2.4."
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # JPEG, JPEG-LS


def codestream_size(frame: bytes, syntax: str = "") -> tuple[int, int] | None:
    """``(rows, columns)`` a compressed frame declares in its own header (JPEG, JPEG-LS, JPEG 2000),
    or None when it declares none we read (RLE: its decoder allocates from Rows and Columns).
    ``syntax``: the transfer syntax, which says which header to look for; the JPEG 2000 markers can
    occur by chance in other data (an RLE slice whose bytes held them failed before this was checked)."""
    jpeg2000 = syntax in JPEG2000_SYNTAXES
    if syntax and not jpeg2000 and not syntax.startswith(JPEG_SYNTAX_ROOT):
        return None
    siz = (
        frame.find(b"\xff\x4f\xff\x51", 0, 4096) if jpeg2000 or not syntax else -1
    )  # SOC, then SIZ (raw or in a JP2 box)
    if siz >= 0 and len(frame) >= siz + 24:
        x, y, x0, y0 = np.frombuffer(frame, dtype=">u4", count=4, offset=siz + 8)
        return int(y) - int(y0), int(x) - int(x0)
    if jpeg2000 or frame[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(frame) and frame[at] == 0xFF:
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(frame[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS and at + 9 <= len(frame):
            rows = int.from_bytes(frame[at + 5 : at + 7], "big")
            return (rows, int.from_bytes(frame[at + 7 : at + 9], "big")) if rows else None  # 0: given later (DNL)
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        at += 2 + length
    return None


def _check_before_decoding(ds: Any, rows: int, cols: int) -> None:
    """What pydicom's decoders would allocate must fit the slice cap and the header's own size: a
    compressed frame declaring other dimensions than Rows × Columns is decoded at its own size (a
    40,000 × 40,000 JPEG 2000 frame in a 2 kB file is 1.6 GB) before pydicom notices the mismatch."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_declared_size(rows, cols, frames, int(ds.get("SamplesPerPixel", 1) or 1))
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if getattr(ds, "file_meta", None) is not None else None
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return
    size = codestream_size(get_frame(ds.PixelData, 0, number_of_frames=frames), str(syntax))
    if size is not None and size != (rows, cols):
        raise ValueError(f"the compressed frame is {size[1]}x{size[0]}, the header says {cols}x{rows}")


def stored_pixels(ds: Any) -> tuple[np.ndarray, bool, int]:
    """The stored values of a single-frame grayscale slice: ``(array, signed, bits)``.

    Native little-endian 16-bit data is taken straight from the bytes (``bits`` = BitsStored: the
    high bits are masked or sign-extended by the lookup table); everything else goes through
    pydicom's decoders (gdcm, pylibjpeg) and comes back already interpreted (``bits`` = 16 for
    16-bit arrays).
    """
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if getattr(ds, "file_meta", None) is not None else ""
    rows, cols = int(ds.Rows), int(ds.Columns)
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    high = int(ds.get("HighBit", stored - 1) if ds.get("HighBit") is not None else stored - 1)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (
        syntax in NATIVE_LITTLE_ENDIAN
        and allocated == 16
        and high == stored - 1
        and 1 <= stored <= 16
        and "PixelData" in ds
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
    ):
        data = ds.PixelData
        expected = rows * cols * 2
        if len(data) < expected:
            raise ValueError(f"pixel data too short: {len(data)} bytes for {rows}x{cols}x16 bit")
        array = np.frombuffer(data, dtype="<u2", count=rows * cols).reshape(rows, cols)
        return array, signed, stored

    _check_before_decoding(ds, rows, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.pixel_array_options(decoding_plugin=DECODING_PLUGIN.get(syntax, ""))
        array = ds.pixel_array
    if array.ndim != 2:
        raise ValueError(f"expected one 2-D frame, got pixel array of shape {array.shape}")
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        signed = array.dtype.kind == "i"
        if array.dtype.itemsize == 1:
            array = array.astype(np.int16 if signed else np.uint16)
        return array, signed, 16
    return array, array.dtype.kind == "i", array.dtype.itemsize * 8


@dataclass(frozen=True)
class StoredEncoding:
    """How a slice's 16-bit stored words become Hounsfield units: the low ``bits`` hold the value (two's
    complement when ``signed``), HU = value × ``slope`` + ``intercept``, and values in ``padding``
    (PixelPaddingValue … RangeLimit) are air. Hashable: the window tables are cached by it."""

    signed: bool
    bits: int
    slope: float
    intercept: float
    padding: tuple[int, int] | None = None

    @classmethod
    def of(cls, ds: Any, signed: bool, bits: int) -> StoredEncoding:
        """A dataset's encoding, with ``signed`` and ``bits`` as :func:`stored_pixels` found them."""
        slope, intercept = rescale(ds)
        return cls(signed, bits, slope, intercept, padding_range(ds))

    def values(self, patterns: np.ndarray) -> np.ndarray:
        """The stored values (int64) of 16-bit words."""
        mask = (1 << self.bits) - 1
        values = (patterns & mask).astype(np.int64)
        if self.signed:
            values = np.where(values >= 1 << (self.bits - 1), values - (1 << self.bits), values)
        return values

    def hounsfield(self, values: np.ndarray) -> np.ndarray:
        """Float64 HU of stored values, padding as air."""
        hu = values * self.slope + self.intercept
        hu[self._padding_mask(values)] = AIR_HU
        return hu

    def _padding_mask(self, values: np.ndarray) -> np.ndarray:
        if self.padding is None:
            return np.zeros(values.shape, dtype=bool)
        low, high = self.padding
        mask = (values >= low) & (values <= high)
        if not self.signed and high < 0:  # a negative padding value written for unsigned data: its bit pattern
            mask |= (values >= low + (1 << self.bits)) & (values <= high + (1 << self.bits))
        return mask


@lru_cache(maxsize=256)
def window_table(encoding: StoredEncoding, windows: tuple[tuple[float, float], ...], bgr: bool = False) -> np.ndarray:
    """65,536 packed pixels (uint32, bytes = channels then 0): the windowed value of every 16-bit word."""
    if len(windows) > 4:
        raise ValueError("at most 4 windows can be packed")
    hu = encoding.hounsfield(encoding.values(np.arange(1 << 16, dtype=np.int64)))
    channels = window_hu(hu, windows)
    if bgr:
        channels = channels[:, ::-1]
    packed = np.zeros((1 << 16, 4), dtype=np.uint8)
    packed[:, : channels.shape[1]] = channels
    table = packed.view(np.uint32).reshape(-1)
    table.flags.writeable = False
    return table


def hu_from_dataset(ds: Any) -> np.ndarray:
    """Float32 Hounsfield units of one slice (padding as air)."""
    array, signed, bits = stored_pixels(ds)
    encoding = StoredEncoding.of(ds, signed, bits)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 2:
        values = encoding.values(array.astype(np.int64) & 0xFFFF)
    else:
        values = array.astype(np.float64)
    return encoding.hounsfield(values).astype(np.float32)


def window_dataset(
    ds: Any,
    windows: Sequence[Sequence[float]] | None = None,
    image_size: int | None = None,
    *,
    bgr: bool = False,
) -> np.ndarray:
    """One slice as windowed uint8 ``(H, W, 3)`` (channels in window order, reversed when ``bgr``),
    resized with aspect kept to ``image_size`` × ``image_size`` when given."""

    wins = as_windows(windows)
    if len(wins) != 3:
        raise ValueError(f"the store holds exactly 3 windows, got {len(wins)}")
    array, signed, bits = stored_pixels(ds)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 2:
        return window_stored(array, StoredEncoding.of(ds, signed, bits), wins, image_size, bgr=bgr)
    image = window_hu(hu_from_dataset(ds), wins)
    if bgr:
        image = np.ascontiguousarray(image[:, :, ::-1])
    return _fit(image, wins, image_size, bgr)


def window_stored(
    array: np.ndarray,
    encoding: StoredEncoding,
    windows: tuple[tuple[float, float], ...],
    image_size: int | None = None,
    *,
    bgr: bool = False,
) -> np.ndarray:
    """16-bit stored words → windowed uint8 (H, W, 3) by table lookup."""
    table = window_table(encoding, windows, bgr)
    packed = np.take(table, array.view(np.uint16))
    image = cv2.cvtColor(packed.view(np.uint8).reshape(*array.shape, 4), cv2.COLOR_RGBA2RGB)
    return _fit(image, windows, image_size, bgr)


def _fit(image: np.ndarray, windows: tuple, image_size: int | None, bgr: bool) -> np.ndarray:
    if image_size is None:
        return image
    fill = air_values(windows)
    return resize_keep_aspect(image, image_size, fill[::-1] if bgr else fill)


def resize_keep_aspect(image: np.ndarray, size: int, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Scale so the longer side is ``size`` (aspect kept) and centre on a ``size`` × ``size`` canvas
    filled with ``fill`` (the windowed value of air)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interpolation)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    if (nh, nw) == (size, size):
        return resized
    canvas = np.empty((size, size, image.shape[2]), dtype=image.dtype)
    canvas[:] = np.asarray(fill, dtype=image.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas
