"""The viewer's pages: one HTML page per study, the shared script and style, and which slices the
page's "next suspicious" visits.

A study page carries its study's report record as JSON inside the page itself: a page opened from
``file://`` may not read a file beside it with a script (browsers block it), while an ``<img>`` may
show one, so the data travels in the page and the slices stay separate JPEG files. The script and
style are written here, in ``assets/``, with nothing fetched from the network.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from pedetect.io import write_text_atomic

ASSETS_DIR = "viewer"  # REPORT/viewer/viewer.js, viewer.css
ASSET_FILES = ("viewer.js", "viewer.css")
# The window presets, in the order of their buttons and keys 1, 2, 3; labels as a radiologist names them.
PRESET_ORDER = ("pe", "lung", "mediastinal")
PRESET_LABELS = {"pe": "PE", "lung": "lung", "mediastinal": "mediastinal"}
SUSPICIOUS_LIMIT = 20


def _asset(name: str) -> str:
    return resources.files("pedetect.view").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def write_viewer_assets(report_dir: str | Path) -> None:
    """The study pages' script and style, into ``REPORT/viewer/``."""
    for name in ASSET_FILES:
        write_text_atomic(Path(report_dir) / ASSETS_DIR / name, _asset(name))


def write_study_page(report_dir: str | Path, name: str, data: dict) -> Path:
    """``REPORT/<name>.html``: the viewer of one study; ``data`` is the study's report record with
    its ``viewer`` section (written by :func:`pedetect.infer.report.write_study_report`)."""
    # JSON inside <script>: a "<" could end or confuse the element ("</script>", "<!--"); as \u003c the JSON is the same.
    payload = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    page = Template(_asset("study.html")).substitute(
        title=html.escape(f"pedetect · {data['study_uid']}"), assets=ASSETS_DIR, data=payload
    )
    path = Path(report_dir) / f"{name}.html"
    write_text_atomic(path, page)
    return path


def _finite(value):
    """``value`` with NaN and infinities as null: JSON.parse refuses them, and the page must open."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def window_presets(window_names: Sequence[str], windows: Sequence[Sequence[float]]) -> list[dict]:
    """The page's window buttons: each stored window (a channel of the slice JPEG) with its name,
    label, level and width; PE, lung, mediastinal first, in that order."""
    presets = [
        {
            "name": str(n).lower(),
            "label": PRESET_LABELS.get(str(n).lower(), str(n)),
            "channel": k,
            "level": float(w[0]),
            "width": float(w[1]),
        }
        for k, (n, w) in enumerate(zip(window_names, windows))
    ]
    rank = {name: i for i, name in enumerate(PRESET_ORDER)}
    return sorted(presets, key=lambda p: (rank.get(p["name"], len(rank)), p["channel"]))


def suspicious_slices(probabilities: Sequence[float], threshold: float, *, limit: int = SUSPICIOUS_LIMIT) -> list[int]:
    """Slices worth a look, most probable first: the highest slice of each run of consecutive slices
    above ``threshold`` (one per finding, not every slice of an embolus). The highest slice of the
    series is always first, even below the threshold: a reader of a negative study still sees where
    the model came closest."""
    p = np.asarray(probabilities, dtype=float)
    if not len(p):
        return []
    above = np.concatenate([[False], p > threshold, [False]])
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))  # run starts and ends, alternately
    peaks = [int(start) + int(np.argmax(p[start:stop])) for start, stop in zip(edges[::2], edges[1::2])]
    peaks = peaks or [int(np.argmax(p))]
    return sorted(peaks, key=lambda i: (-p[i], i))[:limit]
