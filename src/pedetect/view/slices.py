"""The viewer's slice images: one JPEG per slice holding the three windows, at a bounded size.

Each slice is stored once, its three windows as the JPEG's three colour channels in the store's
order (red = the first window), 4:4:4 so no window loses resolution: the page shows one window by
copying that channel to grey (an SVG colour matrix), so switching windows fetches nothing. The
windows of one CT slice are strongly correlated, so the colour JPEG costs far less than three grey
ones.

Budget: :data:`SLICE_BUDGET_BYTES` per slice on average over a study — 40 MB for a 500-slice study —
at most :data:`MAX_SIDE` pixels a side. A slice is encoded at the first quality of
:data:`QUALITIES` that fits the budget; one that does not fit at the lowest is halved in size until
it does, so the budget holds whatever the scanner's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pedetect.io import write_bytes_atomic
from pedetect.store.format import encode_frame, jpeg_params

MAX_SIDE = 512
SLICE_BUDGET_BYTES = 80_000  # 500 slices: 40 MB
QUALITIES = (90, 80, 70, 60, 50)
SLICES_DIR = "slices"  # REPORT/slices/<study>/<index>.jpg


@dataclass
class ViewerSlices:
    """What :func:`write_viewer_slices` wrote: file names relative to the report folder, in position order."""

    files: list[str]
    bytes: int
    qualities: dict[int, int]  # JPEG quality -> slices encoded at it
    width: int
    height: int


def encode_viewer_slice(image_rgb: np.ndarray, budget: int = SLICE_BUDGET_BYTES) -> tuple[bytes, int]:
    """One ``(H, W, 3)`` uint8 slice (channels = the windows in store order) as JPEG bytes within
    ``budget``, and the quality used. Sides above :data:`MAX_SIDE` are shrunk (area averaging) first."""
    image = _fit(image_rgb, MAX_SIDE)
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # the store's codec takes B, G, R: red stays the first window
    while True:
        for quality in QUALITIES:
            data = encode_frame(bgr, jpeg_params(quality, "444"))
            if len(data) <= budget:
                return data, quality
        if min(bgr.shape[:2]) <= 16:
            return data, QUALITIES[-1]  # a budget no image fits: the smallest one made
        bgr = cv2.resize(bgr, (bgr.shape[1] // 2, bgr.shape[0] // 2), interpolation=cv2.INTER_AREA)


def write_viewer_slices(report_dir: Path, name: str, pictures: np.ndarray) -> ViewerSlices:
    """``REPORT/slices/<name>/<i>.jpg`` for every slice of ``pictures`` ((N, H, W, 3) uint8, position
    order); files of an earlier run beyond this run's slices are removed."""
    folder = Path(report_dir) / SLICES_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    total = 0
    qualities: dict[int, int] = {}
    for i, picture in enumerate(pictures):
        data, quality = encode_viewer_slice(picture)
        file_name = f"{i:05d}.jpg"
        write_bytes_atomic(folder / file_name, data)
        files.append(f"{SLICES_DIR}/{name}/{file_name}")
        total += len(data)
        qualities[quality] = qualities.get(quality, 0) + 1
    kept = {Path(f).name for f in files}
    for stale in folder.glob("*.jpg"):
        if stale.name not in kept:
            stale.unlink()
    height, width = _fitted_shape(pictures.shape[1], pictures.shape[2], MAX_SIDE)
    return ViewerSlices(files, total, qualities, width, height)


def _fitted_shape(height: int, width: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    height, width = _fitted_shape(image.shape[0], image.shape[1], side)
    if (height, width) == image.shape[:2]:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def crop_box(height: int, width: int, crop: float) -> tuple[float, float, float, float]:
    """``(left, top, width, height)`` as fractions of the slice: the central square the CNN saw
    (``cnn.input.crop``), found by the training code's own crop, so the two cannot disagree."""
    from pedetect.data.augment import centre_crop  # imports torch: the report's readers need none

    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    cols = np.broadcast_to(np.arange(width)[None, :], (height, width))
    seen_rows, seen_cols = centre_crop(rows, crop), centre_crop(cols, crop)
    top, left = int(seen_rows[0, 0]), int(seen_cols[0, 0])
    return left / width, top / height, seen_cols.shape[1] / width, seen_rows.shape[0] / height
