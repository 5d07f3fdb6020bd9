"""Reading the slice store: random access to single slices for training, whole series for embedding.

``SliceStore`` opens nothing until it is used, and reopens per process: it can be pickled and handed
to forking or spawning DataLoader workers, each of which then reads with its own file handles
(``os.pread``, no shared file offsets).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pedetect.io import read_json
from pedetect.labels import SERIES, SOP, STUDY
from pedetect.store.format import (
    FAILURES_FILE,
    SERIES_FILE,
    SETTINGS_FILE,
    SLICES_FILE,
    decode_frame,
)

MAX_OPEN_FILES = 64


class SliceStore:
    """A slice store made by ``pedetect prepare``.

    - ``slices``: the ``slices.parquet`` DataFrame (StudyInstanceUID, SeriesInstanceUID,
      SOPInstanceUID, slice_index, z, instance_number, frame, height, width, file, offset, length, source;
      a frame of an Enhanced CT file has SOPInstanceUID ``<UID>#<frame>`` and its frame number in ``frame``);
    - ``failures``: ``failures.parquet`` (path, reason, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID);
    - ``series``: ``series.parquet``, one row per series (geometry, spacing, z, irregularities);
      :meth:`series_info` gives one series as a dict;
    - :meth:`read_slice` → (H, W, 3) uint8, :meth:`read_series` → (N, H, W, 3) uint8; channels R, G, B =
      lung, PE, mediastinal windows (``pedetect.dicom.pixels.DEFAULT_WINDOWS``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / SLICES_FILE).exists():
            raise FileNotFoundError(
                f"not a slice store (no {SLICES_FILE}): {self.path} — make one with pedetect prepare"
            )
        self._slices: Any = None
        self._failures: Any = None
        self._series: Any = None
        self._settings: dict | None = None
        self._index: dict[str, tuple[str, np.ndarray, np.ndarray]] | None = None
        self._series_rows: dict[str, int] | None = None
        self._files: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    # ---------------------------------------------------------------------------------------- tables

    @property
    def slices(self) -> Any:
        if self._slices is None:
            self._slices = pd.read_parquet(self.path / SLICES_FILE)
        return self._slices

    @property
    def failures(self) -> Any:
        if self._failures is None:
            path = self.path / FAILURES_FILE
            self._failures = (
                pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["path", "reason", STUDY, SERIES, SOP])
            )
        return self._failures

    @property
    def series(self) -> Any:
        if self._series is None:
            self._series = pd.read_parquet(self.path / SERIES_FILE)
        return self._series

    @property
    def settings(self) -> dict:
        """The settings the store was made with (windows, image_size, JPEG quality and sampling)."""
        if self._settings is None:
            self._settings = read_json(self.path / SETTINGS_FILE)
        return self._settings

    @property
    def series_uids(self) -> list[str]:
        return list(self._lookup())

    def series_info(self, series_uid: str) -> dict:
        """Metadata of one series: n_slices, height, width, z, spacing, pixel_spacing, irregularities, …"""
        if self._series_rows is None:
            self._series_rows = {uid: i for i, uid in enumerate(self.series[SERIES].tolist())}
        try:
            row = self.series.iloc[self._series_rows[series_uid]]
        except KeyError:
            raise KeyError(f"series not in the store: {series_uid}") from None
        return {key: _plain(value) for key, value in row.items()}

    def __len__(self) -> int:
        return len(self.slices)

    def __contains__(self, series_uid: object) -> bool:
        return series_uid in self._lookup()

    # ---------------------------------------------------------------------------------------- pixels

    def _lookup(self) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
        if self._index is None:
            table = self.slices[[SERIES, "slice_index", "file", "offset", "length"]].sort_values(
                [SERIES, "slice_index"], kind="stable"
            )
            series = table[SERIES].to_numpy(dtype=object)
            offsets = table["offset"].to_numpy(dtype=np.int64)
            lengths = table["length"].to_numpy(dtype=np.int64)
            files = table["file"].to_numpy(dtype=object)
            index: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
            if len(series):
                starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
                ends = np.r_[starts[1:], len(series)]
                for start, end in zip(starts.tolist(), ends.tolist()):
                    index[series[start]] = (files[start], offsets[start:end], lengths[start:end])
            self._index = index
        return self._index

    def _fd(self, relative: str) -> int:
        if os.getpid() != self._pid:  # forked: the parent's handles are not ours to share offsets with
            self._drop_files(close=True)
            self._pid = os.getpid()
        fd = self._files.get(relative)
        if fd is not None:
            self._files.move_to_end(relative)
            return fd
        fd = os.open(self.path / relative, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._files[relative] = fd
        while len(self._files) > MAX_OPEN_FILES:
            _, old = self._files.popitem(last=False)
            os.close(old)
        return fd

    def _read(self, relative: str, offset: int, length: int) -> bytes:
        fd = self._fd(relative)
        if hasattr(os, "pread"):
            data = os.pread(fd, length, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, length)
        if len(data) != length:
            raise OSError(f"slice store file is shorter than its index says: {self.path / relative}")
        return data

    def _entry(self, series_uid: str) -> tuple[str, np.ndarray, np.ndarray]:
        try:
            return self._lookup()[series_uid]
        except KeyError:
            raise KeyError(f"series not in the store: {series_uid}") from None

    def slice_bytes(self, series_uid: str, slice_index: int) -> bytes:
        """The stored (JPEG) bytes of one slice."""
        relative, offsets, lengths = self._entry(series_uid)
        if not 0 <= slice_index < len(offsets):
            raise IndexError(f"slice_index {slice_index} out of range for series {series_uid} ({len(offsets)} slices)")
        return self._read(relative, int(offsets[slice_index]), int(lengths[slice_index]))

    def read_slice(self, series_uid: str, slice_index: int) -> np.ndarray:
        """Slice ``slice_index`` (position order from 0) of a series: (H, W, 3) uint8, R,G,B = lung, PE, mediastinal."""
        return decode_frame(self.slice_bytes(series_uid, int(slice_index)))

    def read_series(self, series_uid: str) -> np.ndarray:
        """All slices of a series in position order: (N, H, W, 3) uint8 (one read of the series file)."""
        relative, offsets, lengths = self._entry(series_uid)
        if len(offsets) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        start, end = int(offsets[0]), int(offsets[-1] + lengths[-1])
        data = memoryview(self._read(relative, start, end - start))
        frames = [decode_frame(data[o - start : o - start + n]) for o, n in zip(offsets.tolist(), lengths.tolist())]
        return np.stack(frames)

    # ---------------------------------------------------------------------------------------- life cycle

    def _drop_files(self, close: bool) -> None:
        if close:
            for fd in self._files.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._files = OrderedDict()

    def close(self) -> None:
        if os.getpid() == self._pid:
            self._drop_files(close=True)

    def __enter__(self) -> SliceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        # Tables and the index are rebuilt lazily in the receiving process; file handles never travel.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"SliceStore({os.fspath(self.path)!r})"


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
