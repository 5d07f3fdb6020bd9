"""The slice store on disk (DESIGN.md §4), chosen by measurement (docs/benchmarks.md)::

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
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SETTINGS_FILE = "prepare.json"
SLICES_FILE = "slices.parquet"
SERIES_FILE = "series.parquet"
FAILURES_FILE = "failures.parquet"
SERIES_DIR = "series"
DATA_SUFFIX = ".jpgs"
MARKER_SUFFIX = ".json"
TMP_MARK = ".tmp-"

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


def tmp_path(final: Path) -> Path:
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, *, fsync: bool = False) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=None, separators=(",", ":"), default=_json_default).encode("utf-8"), fsync=fsync)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_write_parquet(path: Path, frame: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + TMP_MARK, dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(name, index=False)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


# --------------------------------------------------------------------------------------------------
# The frame codec

_SAMPLING = {"444": "IMWRITE_JPEG_SAMPLING_FACTOR_444", "422": "IMWRITE_JPEG_SAMPLING_FACTOR_422", "420": "IMWRITE_JPEG_SAMPLING_FACTOR_420"}


def jpeg_params(quality: int, sampling: str) -> list[int]:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, int(getattr(cv2, _SAMPLING[sampling]))]
    return params


def encode_frame(image_bgr: np.ndarray, params: list[int]) -> bytes:
    """One (H, W, 3) uint8 slice in B,G,R order (so that the JPEG's red is the first window)."""
    import cv2

    ok, buffer = cv2.imencode(".jpg", image_bgr, params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def decode_frame(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """A stored frame → (H, W, 3) uint8, channels R, G, B = the windows in config order."""
    import cv2

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
