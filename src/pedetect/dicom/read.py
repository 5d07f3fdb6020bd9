"""The one DICOM read path, used alike by ``pedetect prepare`` (streaming to the slice store) and
``pedetect predict`` (in memory, one study at a time), so a model sees the pixels it was trained on:

1. :func:`scan_files`: the header of each file (pixel data not decoded); unusable files are failures;
2. :func:`~pedetect.dicom.series.group_headers`: by SeriesInstanceUID, duplicate SOPInstanceUIDs are failures;
3. :func:`~pedetect.dicom.order.plan_series`: position order along the slice normal, odd-sized slices set aside;
4. :func:`read_slice`: one slice decoded to HU and windowed (uncompressed 16-bit data straight from the
   file's bytes at the offset the scan found; anything else through pydicom's decoders);
5. :func:`decode_series`: every slice of a planned series in order, a failure per slice that cannot be
   decoded; :func:`read_series` gathers them into one array (:class:`SeriesRead`).

>>> series, failures = read_files(paths_of_one_study)          # doctest: +SKIP
>>> s = series[0]; s.images.shape, s.z[:3], s.sop_uids[0]        # doctest: +SKIP
((N, 512, 512, 3), array([...]), '1.2...')
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pedetect.dicom.frames import read_frame
from pedetect.dicom.header import (
    DicomError,
    SliceHeader,
    dcmread_source,
    describe_error,
    is_input_failure,
    read_headers,
)
from pedetect.dicom.order import SeriesPlan, plan_series
from pedetect.dicom.pixels import StoredEncoding, as_windows, window_dataset, window_stored
from pedetect.dicom.series import Failure, group_headers, series_metadata
from pedetect.dicom.source import Source, SourceError, read_bytes, source_label

# Files whose headers one task scans: enough to amortise a task, few enough to report progress often.
SCAN_CHUNK = 256

Windows = Sequence[Sequence[float]] | None


def scan_files(sources: Iterable[Source]) -> tuple[list[SliceHeader], list[Failure]]:
    """Headers of files (paths or :class:`~pedetect.dicom.source.ZipMember`), one per slice (an
    Enhanced CT file gives one per frame); unusable files as failures."""
    headers, failures = [], []
    for source in sources:
        try:
            headers.extend(read_headers(source))
        except DicomError as error:
            failures.append(Failure(source_label(source), error.reason))
        except BaseException as error:  # anything else about one file stays with that file
            if not is_input_failure(error):
                raise
            failures.append(Failure(source_label(source), f"unreadable ({describe_error(error)})"))
    return headers, failures


class ScanMemo:
    """:func:`scan_files` of files on disk, each file's headers (or failure) kept while the file stays
    the same (size, mtime and inode): a folder that fills over time is scanned once per file, so a scan
    when it is complete reads only what came last (``pedetect serve`` scans a study's instances as they
    arrive). The headers are shared between scans: callers must not change them."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[tuple[int, int, int], list[SliceHeader], list[Failure]]] = {}

    def __len__(self) -> int:
        return len(self._files)

    def scan(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[list[SliceHeader], list[Failure]]:
        headers: list[SliceHeader] = []
        failures: list[Failure] = []
        for path in paths:
            key = os.fspath(path)
            try:
                st = os.stat(key)
                stamp: tuple[int, int, int] | None = (st.st_size, st.st_mtime_ns, st.st_ino)
            except OSError:
                stamp = None  # scan_files reports it
            entry = self._files.get(key)
            if entry is None or stamp is None or entry[0] != stamp:
                scanned = scan_files([key])
                if stamp is not None:
                    self._files[key] = (stamp, *scanned)
                entry = (stamp or (0, 0, 0), *scanned)
            headers.extend(entry[1])
            failures.extend(entry[2])
        return headers, failures

    def retain(self, folders: Iterable[str | os.PathLike[str]]) -> None:
        """Keep only what was scanned of the files directly in ``folders`` (the others: answered, gone)."""
        kept = {os.fspath(folder) for folder in folders}
        for key in [k for k in self._files if os.path.dirname(k) not in kept]:
            del self._files[key]


def read_slice(
    header: SliceHeader, windows: Windows = None, image_size: int | None = None, *, bgr: bool = False
) -> np.ndarray:
    """One slice as windowed uint8 ``(H, W, 3)``: channels in window order (R, G, B), reversed when
    ``bgr`` (for the JPEG encoder); resized with aspect kept to ``image_size`` when given.

    Uncompressed 16-bit data is read straight from the bytes at the offset the scan found
    (:func:`read_native`); anything else is parsed and decoded by pydicom. Raises :class:`DicomError`
    for a truncated file or one that changed since the scan, and any decoder error as it comes."""
    windows = as_windows(windows)
    if "frame" in header.extra:  # one frame of a multi-frame file: its bytes only
        return read_frame(header, windows, image_size, bgr=bgr)
    data = read_bytes(header.source)
    image = read_native(header, windows, image_size, bgr=bgr, data=data)
    if image is not None:
        return image
    ds = dcmread_source(header.source, data=data)
    with warnings.catch_warnings():  # pydicom warns, with the value, about malformed UIDs
        warnings.simplefilter("ignore")
        sop = str(ds.get("SOPInstanceUID", "")).strip()
    if sop != header.sop:
        raise DicomError("file changed while preparing (SOPInstanceUID differs from the scan)")
    return window_dataset(ds, windows, image_size, bgr=bgr)


def read_native(
    header: SliceHeader,
    windows: Windows = None,
    image_size: int | None = None,
    *,
    bgr: bool = False,
    data: bytes | None = None,
) -> np.ndarray | None:
    """The slice as :func:`read_slice` gives it, read without a decoder: uncompressed 16-bit data at the
    offset the scan found, windowed by table lookup. None when it needs a decoder (compressed or other
    pixel data, a frame of a multi-frame file) or its file's size changed since the scan. No
    third-party code parses the pixel bytes here, so nothing can hang on them: the decode guard
    (:mod:`pedetect.dicom.guard`) reads these slices in its own process. ``data``: the file's bytes,
    when the caller has them."""
    native = header.extra.get("native")
    if native is None or "frame" in header.extra:
        return None
    if data is None:
        data = read_bytes(header.source)
    if len(data) != header.size:
        return None
    count = header.rows * header.cols
    end = native["offset"] + 2 * count
    if end > len(data) or native["length"] < 2 * count:
        raise DicomError(
            f"pixel data unreadable (truncated: {max(0, len(data) - native['offset'])} of {2 * count} bytes)"
        )
    array = np.frombuffer(data, dtype="<u2", count=count, offset=native["offset"]).reshape(header.rows, header.cols)
    padding = tuple(native["padding"]) if native["padding"] is not None else None
    encoding = StoredEncoding(native["signed"], native["bits"], native["slope"], native["intercept"], padding)
    return window_stored(array, encoding, as_windows(windows), image_size, bgr=bgr)


def slice_failure(header: SliceHeader, error: BaseException) -> Failure:
    """The failure of one slice that could not be read: a :class:`DicomError`'s (or
    :class:`~pedetect.dicom.source.SourceError`'s) own reason, else the decoder's error as
    ``pixel data unreadable (…)``."""
    reason = error.reason if isinstance(error, SourceError) else f"pixel data unreadable ({describe_error(error)})"
    return Failure.of(header, reason)


def series_size(plan: SeriesPlan, image_size: int | None) -> tuple[int, int]:
    """``(height, width)`` of the series' windowed slices."""
    return (image_size, image_size) if image_size else (plan.rows, plan.cols)


def decode_series(
    plan: SeriesPlan,
    windows: Windows = None,
    image_size: int | None = None,
    *,
    bgr: bool = False,
    reader: Callable[..., np.ndarray] | None = None,
) -> Iterator[tuple[int, np.ndarray | None, Failure | None]]:
    """Each slice of a planned series in position order: ``(i, image, None)`` for ``plan.slices[i]``
    decoded and windowed (see :func:`read_slice`), or ``(i, None, failure)``. A slice that cannot be
    decoded, or decodes to another size than the series', fails alone. ``reader``: what decodes a
    slice, :func:`read_slice`'s signature (prepare passes :meth:`pedetect.dicom.guard.DecodeGuard.read`)."""
    windows = as_windows(windows)
    height, width = series_size(plan, image_size)
    read = reader or read_slice
    for i, header in enumerate(plan.slices):
        try:
            image = read(header, windows, image_size, bgr=bgr)
            if image.shape[:2] != (height, width):
                raise ValueError(f"decoded size {image.shape[1]}x{image.shape[0]} is not the series' {width}x{height}")
        except BaseException as error:  # a decoder error of any kind is this slice's failure
            if not is_input_failure(error):
                raise
            yield i, None, slice_failure(header, error)
            continue
        yield i, image, None


@dataclass
class SeriesRead:
    """One series in position order: ``images[k]`` is decoded slice ``k`` (uint8, channels in window
    order, R,G,B = lung, PE, mediastinal by default), as prepare stores it before its JPEG encoding."""

    series: str
    plan: SeriesPlan
    images: np.ndarray  # (N, H, W, 3) uint8, decoded slices only
    z: np.ndarray  # (N,) mm along the slice normal (NaN where unknown)
    slices: list[SliceHeader]  # (N,) the decoded slices' headers
    position: np.ndarray  # (N,) place of each decoded slice in the series' full position order (plan.slices)
    lost: list[tuple[Failure, float]]  # slices set aside or not decoded, with their place (NaN: unknown)

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def n_planned(self) -> int:
        """Slices in the series' position order (decoded or not)."""
        return len(self.plan.slices)

    @property
    def sop_uids(self) -> list[str]:
        return [h.sop for h in self.slices]

    @property
    def instance_numbers(self) -> list[int | None]:
        return [h.instance_number for h in self.slices]

    @property
    def sources(self) -> list[str]:
        return [h.label for h in self.slices]

    @property
    def failures(self) -> list[Failure]:
        return [failure for failure, _ in self.lost]

    @property
    def meta(self) -> dict:
        """The series' metadata as prepare records it (:func:`~pedetect.dicom.series.series_metadata`)."""
        height, width = self.images.shape[1:3]
        return series_metadata(
            self.plan, self.slices, self.z, height=height, width=width, n_failed=self.n_planned - len(self)
        )


def read_series(
    headers: Sequence[SliceHeader],
    windows: Windows = None,
    image_size: int | None = None,
    *,
    bgr: bool = False,
    reader: Callable[..., np.ndarray] | None = None,
) -> SeriesRead:
    """Order, decode and window the slices of one series (headers from :func:`scan_files`) into one
    preallocated array; slices that cannot be used are in ``lost``. ``reader``: as :func:`decode_series`."""
    plan = plan_series(headers)
    height, width = series_size(plan, image_size)
    images = np.empty((len(plan.slices), height, width, 3), dtype=np.uint8)
    lost: list[tuple[Failure, float]] = [(Failure.of(h, reason), math.nan) for h, reason in plan.rejected]
    kept: list[int] = []
    for i, image, failure in decode_series(plan, windows, image_size, bgr=bgr, reader=reader):
        if failure is not None:
            lost.append((failure, float(i)))
            continue
        assert image is not None  # decode_series yields an image whenever there is no failure
        images[len(kept)] = image
        kept.append(i)
    return SeriesRead(
        series=plan.slices[0].series if plan.slices else headers[0].series,
        plan=plan,
        images=images[: len(kept)],
        z=np.asarray(plan.z, dtype=float)[kept] if len(plan.z) else np.zeros(0),
        slices=[plan.slices[i] for i in kept],
        position=np.asarray(kept, dtype=float),
        lost=lost,
    )


def read_files(
    sources: Iterable[Source], *, windows: Windows = None, image_size: int | None = None, bgr: bool = False
) -> tuple[list[SeriesRead], list[Failure]]:
    """Every series of some files, each read by :func:`read_series` (first-seen order), and the failures
    of files that belong to no series (unreadable files, duplicates); each series carries its own."""
    headers, failures = scan_files(sources)
    groups, duplicates = group_headers(headers)
    failures.extend(duplicates)
    return [read_series(group, windows, image_size, bgr=bgr) for group in groups.values()], failures
