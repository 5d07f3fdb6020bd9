"""The slice store on disk (docs/design.md, "The slice store"), chosen by measurement (docs/benchmarks.md)::

    STORE/
      prepare.json            settings the store was made with (windows, image size, JPEG settings)
      slices.parquet          one row per slice: UIDs, slice_index, z, size, file, offset, length, source
      series.parquet          one row per series: geometry, spacing, z positions, irregularities
      failures.parquet        path, reason, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID
      series/<name>.jpgs      the series' slices in position order: concatenated baseline JPEG frames
                              (4:4:4, R,G,B = lung, PE, mediastinal), each a complete JPEG file
      series/<name>.json      the series' completion marker and metadata, written last

Every file is written to a temporary name and renamed into place; a series counts as done only
when its marker exists, and the marker is renamed into place after its data file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np

FORMAT_VERSION = 1
SETTINGS_FILE = "prepare.json"
SLICES_FILE = "slices.parquet"
SERIES_FILE = "series.parquet"
FAILURES_FILE = "failures.parquet"
SERIES_DIR = "series"
DATA_SUFFIX = ".jpgs"
MARKER_SUFFIX = ".json"

_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def series_name(series_uid: str) -> str:
    """File stem of a series: its UID when it is a well-formed UID, else a hash of it."""
    if _UID.match(series_uid) and ".." not in series_uid:
        return series_uid
    return "h" + hashlib.sha1(series_uid.encode("utf-8")).hexdigest()


def data_path(store: Path, name: str) -> Path:
    return store / SERIES_DIR / (name + DATA_SUFFIX)


def marker_path(store: Path, name: str) -> Path:
    return store / SERIES_DIR / (name + MARKER_SUFFIX)


# --------------------------------------------------------------------------------------------------
# The frame codec

_SAMPLING = {
    "444": "IMWRITE_JPEG_SAMPLING_FACTOR_444",
    "422": "IMWRITE_JPEG_SAMPLING_FACTOR_422",
    "420": "IMWRITE_JPEG_SAMPLING_FACTOR_420",
}


def jpeg_params(quality: int, sampling: str) -> list[int]:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, int(getattr(cv2, _SAMPLING[sampling]))]
    return params


def encode_frame(image_bgr: np.ndarray, params: list[int]) -> bytes:
    """One (H, W, 3) uint8 slice in B,G,R order (so that the JPEG's red is the first window)."""
    ok, buffer = cv2.imencode(".jpg", image_bgr, params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def decode_frame(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """A stored frame → (H, W, 3) uint8, channels R, G, B = the windows in config order."""
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if flag is not None:
        image = cv2.imdecode(buffer, flag)
    else:  # OpenCV < 4.11
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        if image is not None:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise ValueError("corrupt JPEG frame in the slice store")
    return image
