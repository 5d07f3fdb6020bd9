"""The human-readable prediction report: per study a JSON and a PNG, and an index.html.

Only UIDs identify a study here: patient names, IDs and dates never enter a report.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pedetect.io import atomic_path
from pedetect.labels import EXAM_LABELS
from pedetect.metric.rules import THRESHOLD

N_SUSPICIOUS = 3


@dataclass
class StudyResult:
    """Everything predicted for one study, slices in position order."""

    study_uid: str
    exam_probabilities: dict[str, float]
    sop_uids: list[str]
    z: list[float]
    slice_probabilities: list[float]
    skipped_files: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    error: str | None = None

    @property
    def pe_probability(self) -> float:
        """The exam is PE-positive when any slice is: its probability is the highest slice's."""
        return float(max(self.slice_probabilities, default=0.0))

    def to_json(self) -> dict:
        data = asdict(self)
        data["pe_probability"] = self.pe_probability
        data["slices_above_threshold"] = [
            {"slice_index": i, "SOPInstanceUID": sop, "z": z, "probability": p}
            for i, (sop, z, p) in enumerate(zip(self.sop_uids, self.z, self.slice_probabilities))
            if p > THRESHOLD
        ]
        data["threshold"] = THRESHOLD
        return data


def safe_name(uid: str) -> str:
    """A file name for a UID: UIDs are digits and dots, but anything else is replaced."""
    return re.sub(r"[^0-9A-Za-z._-]", "_", uid)[:128] or "study"


def write_study_report(out_dir: Path, result: StudyResult, pe_window_slices: np.ndarray | None) -> tuple[Path, Path | None]:
    """Write ``<uid>.json`` and, when slices are given ((N, H, W) uint8, PE window), ``<uid>.png``."""
    out_dir = Path(out_dir)
    name = safe_name(result.study_uid)
    json_path = out_dir / f"{name}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2))
    if pe_window_slices is None or not len(result.slice_probabilities):
        return json_path, None
    png_path = out_dir / f"{name}.png"
    _plot_study(png_path, result, pe_window_slices)
    return json_path, png_path


def _plot_study(path: Path, result: StudyResult, pe_window_slices: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probabilities = np.asarray(result.slice_probabilities)
    top = np.argsort(-probabilities, kind="stable")[:N_SUSPICIOUS]
    figure = plt.figure(figsize=(12, 7.5), constrained_layout=True)
    grid = figure.add_gridspec(2, N_SUSPICIOUS, height_ratios=[1, 1.6])
    curve = figure.add_subplot(grid[0, :])
    positions = np.arange(len(probabilities))
    curve.plot(positions, probabilities, color="tab:blue", lw=1.5, label="slice PE probability")
    curve.axhline(THRESHOLD, color="tab:red", ls="--", lw=1, label=f"threshold {THRESHOLD}")
    curve.fill_between(positions, probabilities, THRESHOLD, where=probabilities > THRESHOLD, color="tab:red", alpha=0.2)
    curve.scatter(top, probabilities[top], color="tab:red", zorder=3)
    curve.set_xlim(0, max(len(probabilities) - 1, 1))
    curve.set_ylim(0, 1)
    curve.set_xlabel("slice (position order, z from %.0f to %.0f mm)" % (result.z[0], result.z[-1]))
    curve.set_ylabel("probability")
    exam = result.exam_probabilities
    positives = [label for label in EXAM_LABELS if exam.get(label, 0) > THRESHOLD]
    curve.set_title(f"study {result.study_uid}\nPE probability {result.pe_probability:.3f}; exam labels > 0.5: "
                    + (", ".join(positives) or "none"), fontsize=10)
    curve.legend(loc="upper right", fontsize=8)
    for k, index in enumerate(top):
        axis = figure.add_subplot(grid[1, k])
        axis.imshow(pe_window_slices[index], cmap="gray", vmin=0, vmax=255)
        axis.set_title(f"slice {index} (z {result.z[index]:.1f} mm): p = {probabilities[index]:.3f}", fontsize=9)
        axis.axis("off")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


def write_index(out_dir: Path, results: list[StudyResult], notes: list[str] | None = None) -> Path:
    """``index.html``: every study, most suspicious first, linking its PNG and JSON; ``notes`` (the
    run's summary: what was lost) above the table."""
    rows = []
    for result in sorted(results, key=lambda r: (-r.pe_probability, r.study_uid)):
        name = html.escape(safe_name(result.study_uid))
        exam = result.exam_probabilities
        status = html.escape(result.error) if result.error else (
            f"{len(result.skipped_files)} file(s) skipped" if result.skipped_files else "ok"
        )
        labels = ", ".join(html.escape(label) for label in EXAM_LABELS if exam.get(label, 0) > THRESHOLD)
        picture = f'<a href="{name}.png">picture</a>' if (Path(out_dir) / f"{name}.png").exists() else ""
        rows.append(
            f"<tr><td>{html.escape(result.study_uid)}</td><td>{result.pe_probability:.3f}</td>"
            f"<td>{len(result.slice_probabilities)}</td><td>{labels}</td><td>{status}</td>"
            f'<td>{picture} <a href="{name}.json">json</a></td></tr>'
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>pedetect report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style>"
        "</head><body><h1>pedetect report</h1>"
        + (f"<pre>{html.escape(chr(10).join(notes))}</pre>" if notes else "")
        + f"<p>{len(results)} studies, sorted by PE probability (highest slice probability).</p>"
        "<table><tr><th>study</th><th>PE probability</th><th>slices</th><th>exam labels &gt; 0.5</th>"
        "<th>status</th><th>files</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    path = Path(out_dir) / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
