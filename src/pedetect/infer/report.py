"""The human-readable prediction report: per study a JSON record, a PNG and a viewer page, and an index.

``REPORT/index.html`` lists the studies, most suspicious first; ``REPORT/<study>.html`` is the study's
viewer (:mod:`pedetect.view`: the series slice by slice, the probability curve, where the model
looks, the exam labels); ``<study>.json`` the record the page carries; ``<study>.png`` the curve and
the three most suspicious slices; ``slices/<study>/`` the viewer's JPEGs. Reports are written in a
background thread (:class:`ReportWriter`) while prediction goes on.

Two sets of probabilities are kept: the model's own (``model_*``: what a person reads) and the values
written to the submission after the label rules' repair (``exam_probabilities``,
``slice_probabilities``: the repair moves values just across 0.5, so a study it turned negative would
read "PE probability 0.4999"). The decisions shown beside the model's numbers are the written ones.

Only UIDs identify a study here: patient names, IDs and dates never enter a report.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pedetect.dicom.pixels import DEFAULT_WINDOWS, WINDOW_NAMES
from pedetect.io import atomic_path
from pedetect.labels import EXAM_LABELS
from pedetect.metric.rules import THRESHOLD
from pedetect.view.page import ASSETS_DIR, suspicious_slices, window_presets, write_study_page, write_viewer_assets
from pedetect.view.slices import ViewerSlices, crop_box, write_viewer_slices

N_SUSPICIOUS = 3  # slices in the PNG


@dataclass
class StudyResult:
    """Everything predicted for one study, slices in position order (decoded slices only)."""

    study_uid: str
    exam_probabilities: dict[str, float]  # written: after the label rules
    sop_uids: list[str]
    z: list[float]
    slice_probabilities: list[float]  # written: after the label rules
    model_exam_probabilities: dict[str, float]  # the model's own (the prior for a study with no readable slice)
    model_slice_probabilities: list[float]  # the model's own
    skipped_files: list[dict[str, str | float | None]] = field(default_factory=list)  # {"path", "reason", ...}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    error: str | None = None
    candidates: list[dict] = field(default_factory=list)  # clot candidates, strongest first (localise.Candidate.record)
    # The bundle's operating points (pedetect calibrate): name, threshold and this study's decision at it.
    operating_points: list[dict] = field(default_factory=list)

    @property
    def pe_probability(self) -> float:
        """The model's probability that the exam shows PE: its highest slice's (an exam is positive
        when any slice is)."""
        return float(max(self.model_slice_probabilities, default=0.0))

    @property
    def pe_positive(self) -> bool:
        """The decision after the label rules: some written slice value above the threshold."""
        return any(p > THRESHOLD for p in self.slice_probabilities)

    def repair(self) -> dict:
        """What the label rules' repair decided against the model: per exam label the model's
        probability, the written value, the decision and whether the repair changed it."""
        labels: list[dict[str, Any]] = []
        for label in EXAM_LABELS:
            model, written = self.model_exam_probabilities.get(label), self.exam_probabilities.get(label)
            decision = written is not None and written > THRESHOLD
            changed = model is not None and (model > THRESHOLD) != decision
            labels.append(
                {
                    "label": label,
                    "model_probability": model,
                    "written_probability": written,
                    "decision": decision,
                    "changed_by_repair": changed,
                }
            )
        model_positive = self.pe_probability > THRESHOLD
        slices_changed = sum(
            (m > THRESHOLD) != (w > THRESHOLD) for m, w in zip(self.model_slice_probabilities, self.slice_probabilities)
        )
        changed_labels = [row["label"] for row in labels if row["changed_by_repair"]]
        parts = (
            [f"PE {'negative' if model_positive else 'positive'} → {'positive' if self.pe_positive else 'negative'}"]
            if model_positive != self.pe_positive
            else []
        )
        parts += [f"{len(changed_labels)} exam label(s): {', '.join(changed_labels)}"] if changed_labels else []
        parts += [f"{slices_changed} slice(s)"] if slices_changed else []
        return {
            "labels": labels,
            "pe_positive_changed": model_positive != self.pe_positive,
            "slices_changed": slices_changed,
            "changed": bool(parts),
            "summary": "; ".join(parts) or "nothing",
        }

    def to_json(self) -> dict:
        data = asdict(self)
        data["pe_probability"] = self.pe_probability
        data["pe_positive"] = self.pe_positive
        data["slices_above_threshold"] = [
            {"slice_index": i, "SOPInstanceUID": sop, "z": z, "probability": p}
            for i, (sop, z, p) in enumerate(zip(self.sop_uids, self.z, self.slice_probabilities))
            if p > THRESHOLD
        ]
        data["threshold"] = THRESHOLD
        data["repair"] = self.repair()
        return data


@dataclass
class StudyFiles:
    json: Path
    page: Path
    png: Path | None
    viewer_bytes: int  # the viewer's slice JPEGs


def safe_name(uid: str) -> str:
    """A file name for a UID: the text itself when it is a safe name (letters, digits, ``._-``, at most
    128 characters, not a dot name), as UIDs and the challenge's ids are; anything else has its other
    characters replaced and a digest of the whole text appended, so that two texts never meet."""
    if re.fullmatch(r"[0-9A-Za-z._-]{1,128}", uid) and uid not in (".", ".."):
        return uid

    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{re.sub(r'[^0-9A-Za-z._-]', '_', uid)[:100]}-{digest}"


def pe_channel(window_names: Sequence[str]) -> int:
    """Which of the store's channels is the PE window."""
    names = [str(n).lower() for n in window_names]
    return names.index("pe") if "pe" in names else WINDOW_NAMES.index("pe")


def write_study_report(
    out_dir: Path,
    result: StudyResult,
    pictures: np.ndarray | None,
    *,
    window_names: Sequence[str] = WINDOW_NAMES,
    windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS,
    location: np.ndarray | None = None,
    crop: float = 1.0,
    slices: ViewerSlices | None = None,
) -> StudyFiles:
    """Write ``<uid>.json``, the viewer page ``<uid>.html`` with its slices and, when slices are given,
    ``<uid>.png``.

    ``pictures``: the decoded slices, ``(N, H, W, 3)`` uint8 in position order, channels = the windows
    ``window_names`` (levels and widths ``windows``); ``location``: ``(N, G, G)`` probabilities of the
    CNN's grid cells over the central crop ``crop`` of each slice (``Ensemble.location_view``);
    ``slices``: the viewer's JPEGs when already written (:meth:`ReportWriter.prepare`).
    """
    out_dir = Path(out_dir)
    name = safe_name(result.study_uid)
    has_slices = pictures is not None and len(pictures) == len(result.sop_uids) and len(pictures) > 0
    if pictures is not None and has_slices and (slices is None or len(slices.files) != len(pictures)):
        slices = write_viewer_slices(out_dir, name, pictures)
    record = result.to_json()
    record["viewer"] = {
        "slices": slices.files if slices else [],
        "width": slices.width if slices else 0,
        "height": slices.height if slices else 0,
        "bytes": slices.bytes if slices else 0,
        "windows": window_presets(window_names, windows),
        "suspicious": suspicious_slices(result.model_slice_probabilities, THRESHOLD),
        "location": None,
    }
    if slices and location is not None:
        assert pictures is not None  # viewer slices are only ever written from the study's pictures
        if len(location) == len(pictures):
            record["viewer"]["location"] = {
                "grid": int(location.shape[1]),
                "crop_box": [round(v, 5) for v in crop_box(pictures.shape[1], pictures.shape[2], crop)],
                "cells": np.round(location.reshape(len(location), -1).astype(float), 3).tolist(),
            }
    json_path = out_dir / f"{name}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    page = write_study_page(out_dir, name, record)
    png_path = None
    if pictures is not None and has_slices:
        png_path = out_dir / f"{name}.png"
        _plot_study(png_path, result, pictures[..., pe_channel(window_names)])
    return StudyFiles(json_path, page, png_path, slices.bytes if slices else 0)


def study_figure(result: StudyResult, pe_window_slices: np.ndarray):
    """The report picture of one study (a matplotlib Figure, made without pyplot): the model's slice
    curve and the three most suspicious slices in the PE window, the clot candidates marked on them."""
    # The figure without pyplot: pyplot's global state is not thread-safe, and this runs in the report thread.
    # matplotlib is imported here (it is slow to import): pedetect serve's receiving process imports this
    # module (safe_name) and draws nothing.
    from matplotlib.figure import Figure

    probabilities = np.asarray(result.model_slice_probabilities)
    top = np.argsort(-probabilities, kind="stable")[:N_SUSPICIOUS]
    figure = Figure(figsize=(12, 7.5), layout="constrained")
    grid = figure.add_gridspec(2, N_SUSPICIOUS, height_ratios=[1, 1.6])
    curve = figure.add_subplot(grid[0, :])
    positions = np.arange(len(probabilities))
    curve.plot(positions, probabilities, color="tab:blue", lw=1.5, label="slice PE probability (model)")
    curve.axhline(THRESHOLD, color="tab:red", ls="--", lw=1, label=f"threshold {THRESHOLD}")
    curve.fill_between(positions, probabilities, THRESHOLD, where=probabilities > THRESHOLD, color="tab:red", alpha=0.2)
    curve.scatter(top, probabilities[top], color="tab:red", zorder=3)
    curve.set_xlim(0, max(len(probabilities) - 1, 1))
    curve.set_ylim(0, 1)
    curve.set_xlabel(f"slice (position order, z from {result.z[0]:.0f} to {result.z[-1]:.0f} mm)")
    curve.set_ylabel("probability")
    positives = [label for label in EXAM_LABELS if result.exam_probabilities.get(label, 0) > THRESHOLD]
    decision = "positive" if result.pe_positive else "negative"
    curve.set_title(
        f"study {result.study_uid}\nPE probability {result.pe_probability:.3f} (model); after the label rules "
        f"{decision}, exam labels > 0.5: " + (", ".join(positives) or "none"),
        fontsize=10,
    )
    curve.legend(loc="upper right", fontsize=8)
    height, width = pe_window_slices.shape[1:3]
    for k, index in enumerate(top):
        axis = figure.add_subplot(grid[1, k])
        axis.imshow(pe_window_slices[index], cmap="gray", vmin=0, vmax=255)
        _mark_candidates(axis, result.candidates, int(index), height, width)
        axis.set_title(f"slice {index} (z {result.z[index]:.1f} mm): p = {probabilities[index]:.3f}", fontsize=9)
        axis.axis("off")
    return figure


PICTURE_DPI = 80


def _plot_study(path: Path, result: StudyResult, pe_window_slices: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        study_figure(result, pe_window_slices).savefig(tmp, format="png", dpi=PICTURE_DPI)


def study_picture(
    result: StudyResult, pictures: np.ndarray | None, window_names: Sequence[str] = WINDOW_NAMES
) -> np.ndarray | None:
    """The report picture as an ``(H, W, 3)`` uint8 RGB array (what the PNG shows; the DICOM
    results' secondary capture), or None without slices. ``pictures``: the decoded slices
    ``(N, H, W, 3)`` with channels = the windows ``window_names``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import: see study_figure

    if pictures is None or not len(pictures) or len(pictures) != len(result.sop_uids):
        return None
    figure = study_figure(result, pictures[..., pe_channel(window_names)])
    figure.set_dpi(PICTURE_DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _mark_candidates(axis, candidates: list[dict], index: int, height: int, width: int) -> None:
    """Clot candidates on picture ``index``: the outline on a candidate's key slice, a cross on the
    other slices of its range, each labelled with its number and side."""
    for c in candidates:
        first = c["picture_index"] - (c["slice_index"] - c["slice_first"])
        last = c["picture_index"] + (c["slice_last"] - c["slice_index"])
        if not first <= index <= last:
            continue
        y, x = c["picture_point"][0] * height - 0.5, c["picture_point"][1] * width - 0.5
        outline = c.get("picture_outline") or []
        if index == c["picture_index"] and len(outline) > 2:
            ys = [p[0] * height - 0.5 for p in outline] + [outline[0][0] * height - 0.5]
            xs = [p[1] * width - 0.5 for p in outline] + [outline[0][1] * width - 0.5]
            axis.plot(xs, ys, color="#00ffaa", lw=1.2)
        else:
            axis.plot([x], [y], marker="+", color="#00ffaa", markersize=9, mew=1.2)
        axis.annotate(
            f"#{c['candidate']} {c['side']}",
            (x, y),
            xytext=(6, -6),
            textcoords="offset points",
            color="#00ffaa",
            fontsize=8,
        )


class ReportWriter:
    """Writes each study's report (:func:`write_study_report`) in one background thread while
    prediction goes on: :meth:`prepare` when the study is read (its slices' JPEGs, while the models
    work), :meth:`submit` when it is predicted (the rest). At most ``backlog`` submitted studies
    wait (their slices are in memory meanwhile); beyond that :meth:`submit` waits for the oldest. An
    error in the thread is raised in the caller at the next :meth:`submit` or at :meth:`finish`."""

    def __init__(self, out_dir: Path, *, backlog: int = 2, **options):
        self.out_dir = Path(out_dir)
        self.options = options  # write_study_report's keywords: window_names, windows, crop
        self.backlog = backlog
        self.pending: deque[Future] = deque()
        self.slices: dict[str, Future] = {}  # study UID -> its viewer slices being written
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pedetect-report")
        self.viewer_bytes = 0
        self.n_slices = 0

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def prepare(self, study_uid: str, pictures: np.ndarray | None) -> None:
        """Start on a study's viewer slices ((N, H, W, 3), position order) before its prediction ends."""
        if pictures is not None and len(pictures):
            self.slices[study_uid] = self.pool.submit(write_viewer_slices, self.out_dir, safe_name(study_uid), pictures)

    def submit(self, result: StudyResult, pictures: np.ndarray | None, location: np.ndarray | None = None) -> float:
        """Queue the rest of one study's report; returns the seconds the caller waited for room."""
        started = time.perf_counter()
        while len(self.pending) >= self.backlog:
            self._collect(self.pending.popleft())
        prepared = self.slices.pop(result.study_uid, None)
        self.pending.append(self.pool.submit(self._write, result, pictures, location, prepared))
        return time.perf_counter() - started

    def _write(self, result: StudyResult, pictures, location, prepared: Future | None) -> StudyFiles:
        # One worker runs the queue in order: a study's prepared slices are done before its report starts.
        slices = prepared.result() if prepared is not None else None
        return write_study_report(self.out_dir, result, pictures, location=location, slices=slices, **self.options)

    def finish(self) -> float:
        """Wait for every queued study; returns the seconds waited."""
        started = time.perf_counter()
        while self.pending:
            self._collect(self.pending.popleft())
        return time.perf_counter() - started

    def _collect(self, future: Future) -> None:
        files = future.result()
        self.viewer_bytes += files.viewer_bytes


def write_index(out_dir: Path, results: list[StudyResult], notes: list[str] | None = None) -> Path:
    """``index.html``: every study, most suspicious first (the model's PE probability), linking its
    viewer page, PNG and JSON; ``notes`` (the run's summary: what was lost) above the table. Also
    writes the viewer's script and style the study pages share."""
    write_viewer_assets(out_dir)
    rows = []
    for result in sorted(results, key=lambda r: (-r.pe_probability, r.study_uid)):
        name = html.escape(safe_name(result.study_uid))
        exam = result.exam_probabilities
        status = (
            html.escape(result.error)
            if result.error
            else (f"{len(result.skipped_files)} file(s) skipped" if result.skipped_files else "ok")
        )
        labels = ", ".join(html.escape(label) for label in EXAM_LABELS if exam.get(label, 0) > THRESHOLD)
        points = "; ".join(
            f"{html.escape(p['name'])} (&gt; {p['threshold']:.3f}): {'positive' if p['decision'] else 'negative'}"
            for p in result.operating_points
        )
        repair = result.repair()
        decision = (
            f'<span class="{"positive" if result.pe_positive else "negative"}">'
            f"{'positive' if result.pe_positive else 'negative'}</span>"
        )
        if repair["changed"]:
            decision += (
                f' <span class="changed" title="{html.escape(repair["summary"])}">(changed by the repair)</span>'
            )
        links = [f'<a href="{name}.html">viewer</a>']
        links += [f'<a href="{name}.png">picture</a>'] if (Path(out_dir) / f"{name}.png").exists() else []
        links += [f'<a href="{name}.json">json</a>']
        rows.append(
            f'<tr><td class="uid"><a href="{name}.html">{html.escape(result.study_uid)}</a></td>'
            f'<td class="number">{result.pe_probability:.3f}</td><td>{decision}</td>'
            f"<td>{points or 'none recorded'}</td>"
            f'<td class="number">{len(result.slice_probabilities)}</td><td>{labels}</td><td>{status}</td>'
            f"<td>{' '.join(links)}</td></tr>"
        )
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pedetect report</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<link rel='stylesheet' href='{ASSETS_DIR}/viewer.css'></head><body class='index'><h1>pedetect report</h1>"
        + (f"<pre>{html.escape(chr(10).join(notes))}</pre>" if notes else "")
        + f"<p>{len(results)} studies, most suspicious first: the model's PE probability (its highest slice), and the "
        "decision after the challenge's label rules (their repair moves values just across 0.5).</p>"
        "<table><tr><th>study</th><th>PE probability (model)</th><th>after the label rules</th>"
        "<th>at the operating points (pedetect calibrate)</th><th>slices</th>"
        "<th>exam labels &gt; 0.5 (after the rules)</th><th>status</th><th>files</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
    path = Path(out_dir) / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
