"""Reading DICOM: discovery by content, headers, slice ordering, pixels → HU, windowing.

The reusable entry points (no store needed)::

    from pedetect.dicom import read_files, read_series
    volumes, failures = read_files(paths)      # any mix of series; paths or ZipMember
    volume = read_series(paths_of_one_series)  # SeriesVolume: images (N,H,W,3) uint8, z, sop_uids, meta, failures
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
from pedetect.dicom.series import Failure, SeriesVolume, group_headers, read_files, read_series, series_metadata
from pedetect.dicom.source import ZipMember, discover, looks_like_dicom

__all__ = [
    "AIR_HU",
    "DEFAULT_WINDOWS",
    "WINDOW_NAMES",
    "DicomError",
    "Failure",
    "SeriesPlan",
    "SeriesVolume",
    "SliceHeader",
    "ZipMember",
    "discover",
    "group_headers",
    "hu_from_dataset",
    "looks_like_dicom",
    "plan_series",
    "read_files",
    "read_header",
    "read_series",
    "resize_keep_aspect",
    "series_metadata",
    "spacing_stats",
    "window_dataset",
    "window_hu",
]
