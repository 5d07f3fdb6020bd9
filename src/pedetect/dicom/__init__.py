"""Reading DICOM: discovery by content, headers, slice ordering, pixels → HU, windowing.

One read path (:mod:`pedetect.dicom.read`), used by ``pedetect prepare`` and ``pedetect predict`` alike::

    from pedetect.dicom import read_files, read_series, read_slice, scan_files
    headers, failures = scan_files(paths)       # headers only; paths or ZipMember
    series = read_series(headers_of_one_series)  # SeriesRead: images (N,H,W,3) uint8, z, sop_uids, lost, meta
    image = read_slice(headers[0])              # one slice, windowed (H,W,3) uint8
    series_list, failures = read_files(paths)   # all of it: scan, group by series, read each
"""

from __future__ import annotations

from pedetect.dicom.header import DicomError, SliceHeader, read_header
from pedetect.dicom.order import SeriesPlan, plan_series, spacing_stats
from pedetect.dicom.pixels import (
    AIR_HU,
    DEFAULT_WINDOWS,
    WINDOW_NAMES,
    hu_from_dataset,
    resize_keep_aspect,
    window_dataset,
    window_hu,
)
from pedetect.dicom.read import SeriesRead, decode_series, read_files, read_series, read_slice, scan_files
from pedetect.dicom.series import Failure, group_headers, series_metadata
from pedetect.dicom.source import ZipMember, discover, looks_like_dicom

__all__ = [
    "AIR_HU",
    "DEFAULT_WINDOWS",
    "WINDOW_NAMES",
    "DicomError",
    "Failure",
    "SeriesPlan",
    "SeriesRead",
    "SliceHeader",
    "ZipMember",
    "decode_series",
    "discover",
    "group_headers",
    "hu_from_dataset",
    "looks_like_dicom",
    "plan_series",
    "read_files",
    "read_header",
    "read_series",
    "read_slice",
    "resize_keep_aspect",
    "scan_files",
    "series_metadata",
    "spacing_stats",
    "window_dataset",
    "window_hu",
]
