"""The lung boxes of the training series (``cnn.input.lung_crop``), computed once and recorded.

Stage 1 reads single slices, so it cannot compute a series' box as it goes: before the first fold
trains, every labelled series is read once from the store and its box computed
(:func:`pedetect.data.lung_box.lung_box_of_windows`, the function the embedding pass and ``predict``
run on whole series). The boxes, the settings and the windows they were computed with are written to
``MODEL_DIR/lung_boxes.json``: the bundle's record of what the CNN saw. A file made with other
settings or windows, or lacking a series, is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pedetect.console import echo as console_echo
from pedetect.data.dataset import lung_box_settings, series_lung_box
from pedetect.data.lung_box import Box
from pedetect.dicom.pixels import DEFAULT_WINDOWS
from pedetect.io import read_json, write_json_atomic
from pedetect.models.layout import lung_boxes_path
from pedetect.train.embed import store_windows


def training_lung_boxes(
    config, source: Any, series: list[str], out: Path, *, echo: Callable[[str], None] = console_echo
) -> dict | None:
    """``{series: Box}`` for ``series`` (None without ``cnn.input.lung_crop``), from ``out/lung_boxes.json``
    when it was made alike, else computed from the store ``source`` and written there."""
    crop = config.cnn.input.lung_crop
    if crop is None:
        return None
    windows = store_windows(source)
    if windows is None:
        windows = DEFAULT_WINDOWS
    windows = [[float(v) for v in w] for w in windows]
    settings = lung_box_settings(crop).as_dict()
    path = lung_boxes_path(out)
    recorded: dict[str, list[float]] = {}
    if path.is_file():
        previous = read_json(path)
        if previous.get("settings") == settings and previous.get("windows") == windows:
            recorded = previous.get("boxes", {})
    todo = [s for s in series if s not in recorded]
    if todo:
        echo(f"lung boxes: computing {len(todo)} series' boxes from the store ({len(series) - len(todo)} recorded)")
        for uid in todo:
            box = series_lung_box(source.read_series(uid), config.cnn.input, windows)
            recorded[uid] = [round(v, 6) for v in box]
        write_json_atomic(path, {"settings": settings, "windows": windows, "boxes": dict(sorted(recorded.items()))})
    return {uid: Box(*recorded[uid]) for uid in series}
