"""Slice datasets over the slice store.

A :class:`SliceDataset` yields ``(image, target, index)``: a ``(C, S, S)`` uint8 tensor (the model
normalises), the targets (slice label, then the configured exam labels; NaN where one is not trained
on: :func:`training_targets`) as float32, and the row index (validation gathers predictions across
processes by it). Given clot boxes it yields a fourth item, the slice's clot map: a ``(1, S, S)``
uint8 tensor, 255 on the boxes of the emboli visible on it, placed as the image is
(:func:`clot_map`). The store is opened lazily in each process, so the dataset can be handed to
forking or spawning data-loader workers.

Input modes (``cnn.input.mode``):

- ``windows``: the lung, PE and mediastinal windows of the slice (the store's three channels);
- ``pe``: the PE window of the slice alone (one channel);
- ``adjacent``: the PE window of slices z−1, z, z+1 of the same series (clamped at the ends);
- ``both``: the three windows of slices z−1, z, z+1, nine channels (slice by slice: z−1 lung, PE,
  mediastinal, then z, then z+1).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import pandas as pd
import torch
import torch.utils.data
from torch.utils.data import Dataset

from pedetect.data.augment import SliceAugment, crop_region
from pedetect.data.lung_box import LungBoxSettings, lung_box_of_windows
from pedetect.dicom.pixels import DEFAULT_WINDOWS
from pedetect.labels import IMAGE_LABEL, NEGATIVE_LABELS, SERIES, SIDE_LABELS, SOP, STUDY
from pedetect.recipe import AugmentConfig
from pedetect.store.reader import SliceStore

SLICE_INDEX = "slice_index"
N_SLICES = "n_slices"
PE_CHANNEL = 1  # the PE window (L100/W700) is the store's second channel

# Store reads may be read-only (memory-mapped) arrays; no step here writes into them in place
# (resize, warp, lookup and cutout all return new tensors), so torch's warning is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class StoreError(ValueError):
    """Labels and store that do not fit together."""


class SliceSource(Protocol):
    """What the datasets need from a slice store (``pedetect.store.SliceStore``)."""

    @property
    def slices(self) -> pd.DataFrame: ...

    def read_slice(self, series_uid: str, slice_index: int) -> np.ndarray: ...


def open_store(path: str | Path) -> SliceSource:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"slice store not found: {path} (make one with pedetect prepare)")
    return SliceStore(path)


def slice_items(labels: pd.DataFrame, store_slices: pd.DataFrame, *, source: str = "the labels") -> pd.DataFrame:
    """Labelled slices with their place in the store: the label rows (order kept) plus the store's
    series, ``slice_index`` and the series' slice count ``n_slices``.

    Every labelled slice must be in the store; otherwise a :class:`StoreError` says how many are not.
    """
    store = store_slices[[SERIES, SOP, SLICE_INDEX]].copy()
    store[N_SLICES] = store.groupby(SERIES)[SLICE_INDEX].transform("max") + 1
    store = store.rename(columns={SERIES: "_store_series"})
    merged = labels.merge(store, on=SOP, how="left", validate="many_to_one")
    lacking = merged[SLICE_INDEX].isna()
    if lacking.any():
        n_studies = merged.loc[lacking, STUDY].nunique() if STUDY in merged else "?"
        first = merged.loc[lacking, SOP].iloc[0]
        raise StoreError(
            f"the store lacks {int(lacking.sum())} of {len(merged)} slices in {source} "
            f"({n_studies} studies; first SOPInstanceUID {first}); prepare the store from the same DICOM files, "
            "or check pedetect prepare's failures.parquet"
        )
    merged[SERIES] = merged.pop("_store_series")
    merged[SLICE_INDEX] = merged[SLICE_INDEX].astype(int)
    merged[N_SLICES] = merged[N_SLICES].astype(int)
    return merged


def training_targets(
    items: pd.DataFrame, exam_labels: tuple[str, ...] = (), whole_exam_labels: tuple[str, ...] = ()
) -> np.ndarray:
    """``(N, 1 + E + W)`` float32: the slice label, ``exam_labels``, then ``whole_exam_labels``.

    NaN marks a target the loss skips: ``exam_labels`` count on positive slices only (5th place: the
    slice shows the embolus the label describes), ``whole_exam_labels`` on every slice of a positive
    exam (a negative exam's 0 says nothing about its heart). Without a slice label (unlabelled
    items): ``(N, 0)``.
    """
    if IMAGE_LABEL not in items:
        return np.zeros((len(items), 0), np.float32)
    missing = [
        c for c in (*exam_labels, *whole_exam_labels, *(NEGATIVE_LABELS if whole_exam_labels else ())) if c not in items
    ]
    if missing:
        raise KeyError(f"the labels have no column(s) {missing}")
    targets = items[[IMAGE_LABEL, *exam_labels, *whole_exam_labels]].to_numpy(dtype=np.float32, copy=True)
    positive_slice = targets[:, 0] > 0.5
    targets[~positive_slice, 1 : 1 + len(exam_labels)] = np.nan
    if whole_exam_labels:
        positive_exam = (items[list(NEGATIVE_LABELS)].to_numpy() < 0.5).all(axis=1)
        targets[~positive_exam, 1 + len(exam_labels) :] = np.nan
    return targets


def side_target_columns(labels: tuple[str, ...], augment: AugmentConfig | None) -> tuple[int, int] | None:
    """Target columns (after the slice label's) of leftsided_pe and rightsided_pe, when the
    augmentation can mirror a slice: they trade places on a mirrored sample. Raises ``ValueError``
    for a recipe whose augmentation would make a side label wrong (one side trained without the
    other, or quarter turns, which put left and right at the top and bottom)."""
    sides = [label for label in labels if label in SIDE_LABELS]
    if not sides or augment is None or not (augment.hflip or augment.rotate90):
        return None
    if augment.rotate90:
        raise ValueError(
            f"cnn.augment.rotate90 turns left and right into top and bottom: it cannot train {', '.join(sides)}"
        )
    if len(sides) != 2:
        raise ValueError(
            f"cnn.augment.hflip mirrors slices: train both {' and '.join(SIDE_LABELS)} or neither (given {sides[0]})"
        )
    return 1 + labels.index(SIDE_LABELS[0]), 1 + labels.index(SIDE_LABELS[1])


class SliceDataset(Dataset):
    """Slices of a store, read, resized and (for training) augmented."""

    def __init__(
        self,
        store: str | Path | SliceSource,
        items: pd.DataFrame,
        *,
        mode: str = "windows",
        image_size: int = 512,
        crop: float = 1.0,
        augment: AugmentConfig | None = None,
        exam_labels: tuple[str, ...] = (),
        whole_exam_labels: tuple[str, ...] = (),
        boxes: dict | None = None,
        clot_boxes: dict[tuple[str, int], np.ndarray] | None = None,
    ):
        if mode not in ("windows", "pe", "adjacent", "both"):
            raise ValueError(f"unknown input mode {mode!r}")
        self._store_ref = store
        self._store: Any = None if isinstance(store, (str, Path)) else store
        self._pid = os.getpid()
        self.mode = mode
        self.series = items[SERIES].to_numpy(dtype=object)
        self.slice_index = items[SLICE_INDEX].to_numpy(dtype=np.int64)
        self.n_slices = items[N_SLICES].to_numpy(dtype=np.int64)
        self.targets = training_targets(items, exam_labels, whole_exam_labels)
        self.side_columns = side_target_columns((*exam_labels, *whole_exam_labels), augment)
        self.transform = SliceAugment(image_size, augment, crop)
        self.train = augment is not None
        # cnn.input.lung_crop: each series' lung box (pedetect.data.lung_box.Box), cropped before the resize.
        self.boxes = boxes
        # (series, slice_index) -> (K, 4) inclusive [row_min, row_max, col_min, col_max] of the visible
        # emboli on that slice, in the store's pixels: the target of cnn.loss.clot_map_weight.
        self.clot_boxes = clot_boxes
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.series)

    @property
    def positive(self) -> np.ndarray:
        """Boolean mask of positive slices (the slice label)."""
        return self.targets[:, 0] > 0.5

    @property
    def store(self) -> SliceSource:
        if self._store is None or (isinstance(self._store_ref, (str, Path)) and os.getpid() != self._pid):
            # a store given as an object is kept from the start, so only a path is ever (re)opened
            assert isinstance(self._store_ref, (str, Path))
            self._store = open_store(self._store_ref)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self._store_ref, (str, Path)):
            state["_store"] = None  # reopened in the worker
        state["_rng"] = None
        return state

    def rng(self) -> np.random.Generator:
        """A generator per process: seeded from torch's per-worker seed and the distributed rank."""
        if self._rng is None or self._rng_pid != os.getpid():
            rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
            self._rng = np.random.default_rng([torch.initial_seed() % 2**63, rank])
            self._rng_pid = os.getpid()
        return self._rng

    def read(self, i: int) -> np.ndarray:
        """The raw (H, W, C) uint8 input of row ``i`` for the configured mode."""
        series, index = self.series[i], int(self.slice_index[i])
        store = self.store
        if self.mode in ("windows", "pe"):
            return stack_input(store.read_slice(series, index)[None], 0, self.mode)
        last = int(self.n_slices[i]) - 1
        neighbours = [store.read_slice(series, j) for j in (max(index - 1, 0), index, min(index + 1, last))]
        return stack_input(np.stack(neighbours), 1, self.mode)

    def __getitem__(
        self, i: int
    ) -> tuple[torch.Tensor, torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        raw = self.read(i)
        image = torch.from_numpy(np.ascontiguousarray(raw)).permute(2, 0, 1)
        box = self.boxes[self.series[i]] if self.boxes is not None else None
        image, geometry = self.transform.transform(image, self.rng() if self.train else None, box)
        target = self.targets[i]
        if self.side_columns and geometry.swaps_sides:  # the embolus on the image's other side: the label follows it
            left, right = self.side_columns
            target = target.copy()
            target[[left, right]] = target[[right, left]]
        if self.clot_boxes is None:
            return image, torch.from_numpy(target), i
        clots = self.clot_boxes.get((self.series[i], int(self.slice_index[i])))
        if clots is None:  # most slices: an empty map, placed or not (no warp on the hot path)
            placed = torch.zeros((1, *image.shape[-2:]), dtype=torch.uint8)
        else:
            placed = self.transform.place(clot_map(raw.shape[:2], clots), geometry, box)
        return image, torch.from_numpy(target), i, placed


def clot_map(shape: tuple[int, int], clots: np.ndarray | None) -> torch.Tensor:
    """A ``(1, H, W)`` uint8 map of a slice of ``shape``: 255 inside each inclusive
    ``[row_min, row_max, col_min, col_max]`` box of ``clots`` (``(K, 4)``), 0 elsewhere."""
    out = torch.zeros((1, *shape), dtype=torch.uint8)
    for r0, r1, c0, c1 in clots if clots is not None else ():
        out[0, r0 : r1 + 1, c0 : c1 + 1] = 255
    return out


def single_threaded_opencv() -> None:
    """Give OpenCV one thread; call in the parent before DataLoader workers fork.

    The workers are the parallelism, so each wants one OpenCV thread. Setting that inside a forked
    worker can deadlock (seen: ``cv2.setNumThreads`` waiting forever in a worker forked from a process
    that had run torch ops), so the parent sets it before the fork and the workers inherit it.
    """
    cv2.setNumThreads(1)


def stack_input(volume: np.ndarray, index: int, mode: str) -> np.ndarray:
    """The (H, W, C) input of slice ``index`` of a (N, H, W, 3) series for an input mode."""
    if mode == "windows":
        return volume[index]
    if mode == "pe":
        return volume[index][:, :, PE_CHANNEL : PE_CHANNEL + 1]
    below, above = volume[max(index - 1, 0)], volume[min(index + 1, len(volume) - 1)]
    if mode == "adjacent":
        return np.stack([below[:, :, PE_CHANNEL], volume[index][:, :, PE_CHANNEL], above[:, :, PE_CHANNEL]], axis=2)
    if mode == "both":
        return np.concatenate([below, volume[index], above], axis=2)
    raise ValueError(f"unknown input mode {mode!r}")


def series_inputs(volume: np.ndarray, input_config, box=None) -> torch.Tensor:
    """CNN inputs for every slice of one series, in position order: ``(N, C, S, S)`` uint8.

    ``volume`` is ``SliceStore.read_series`` (N, H, W, 3); ``input_config`` the resolved ``cnn.input``;
    ``box`` the series' lung box when ``input_config.lung_crop`` is set (:func:`series_lung_box` of
    the whole series: a part of it would give another box).
    The same crop, resize and channel stacking as training (no augmentation): what stage 2 embeds
    and ``predict`` runs, batch by batch, through ``SliceClassifier.embed``.
    """
    if getattr(input_config, "lung_crop", None) is not None and box is None:
        raise ValueError("cnn.input.lung_crop is set: pass the series' lung box (series_lung_box of the whole series)")
    transform = SliceAugment(input_config.image_size, None, input_config.crop)
    out = [
        transform(
            torch.from_numpy(np.ascontiguousarray(stack_input(volume, i, input_config.mode))).permute(2, 0, 1),
            None,
            box,
        )
        for i in range(len(volume))
    ]
    if not out:
        return torch.zeros(
            (0, input_config.channels, input_config.image_size, input_config.image_size), dtype=torch.uint8
        )
    return torch.stack(out)


def input_region(height: int, width: int, input_config, box=None) -> tuple[int, int, int, int]:
    """``(row0, col0, row1, col1)`` of a ``height`` × ``width`` slice that :func:`series_inputs` feeds
    the CNN (resized to ``image_size``): the series' lung ``box`` or the central crop."""
    return crop_region(height, width, float(input_config.crop), box)


def series_lung_box(volume: np.ndarray, input_config, windows=None):
    """The lung box of a whole series (``(N, H, W, 3)`` uint8, the store's channels) for a
    ``cnn.input`` with ``lung_crop``, or None without it. ``windows``: the three [level, width]
    windows the slices were made with (the store's ``prepare.json``, a bundle's
    ``preprocessing.json``); default pedetect's own. The lung window (channel 0) is inverted to HU."""
    settings = getattr(input_config, "lung_crop", None)
    if settings is None:
        return None
    if windows is None:
        windows = DEFAULT_WINDOWS
    level, width = (float(v) for v in windows[0])
    return lung_box_of_windows(volume, (level, width), lung_box_settings(settings), channel=0)


def lung_box_settings(crop_config):
    """The :class:`~pedetect.data.lung_box.LungBoxSettings` of a ``cnn.input.lung_crop`` section."""
    names = ("tissue_hu", "air_hu", "min_region", "margin", "min_side")
    return LungBoxSettings(**{name: getattr(crop_config, name) for name in names})
