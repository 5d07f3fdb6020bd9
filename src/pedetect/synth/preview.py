"""A montage of one positive synthetic study in the PE window, emboli outlined from the phantom masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.ndimage import binary_dilation

from pedetect.labels import EXAM_LABELS, INFO_LABELS
from pedetect.synth.phantom import POSITIVE_FRACTION, plan_study
from pedetect.synth.render import RenderedStudy, render_plan

PE_WINDOW = (100.0, 700.0)  # level, width
COLOURS = {"acute": "#ff3b30", "chronic": "#ffd60a"}


def first_positive(limit: int = 200, **dataset: Any) -> RenderedStudy:
    """A positive study of the dataset (:func:`plan_study`'s keyword arguments: seed, split, slices,
    size, the fractions) that shows its emboli well, rendered.

    The first one with an embolus in the pulmonary trunk or a main artery, else the first with a
    lobar embolus, else the first positive one; study 0 forced positive if there is none.
    """
    best, best_rank = None, 3
    for i in range(limit if dataset.get("positive_fraction", POSITIVE_FRACTION) > 0 else 0):
        plan = plan_study(i, **dataset)
        if plan.kind != "positive":
            continue
        rank = min({"trunk": 0, "main": 0, "lobar": 1}.get(e.level, 2) for e in plan.emboli)
        if rank < best_rank:
            best, best_rank = plan, rank
        if rank == 0:
            break
    return render_plan(best or plan_study(0, kind="positive", **dataset))


def choose_slices(study: RenderedStudy, n: int = 12) -> list[int]:
    """About n slices: most through the emboli, a few for anatomical context; head first."""
    pos = np.flatnonzero(study.plan.pe_slices)
    S = study.plan.n_slices
    n_pe = min(len(pos), n - 4 if n < S else n)
    picks = set(pos[np.linspace(0, len(pos) - 1, n_pe).round().astype(int)].tolist()) if n_pe else set()
    us = np.linspace(0, 1, S)
    for target in (0.92, 0.7, 0.5, 0.3, 0.15, 0.8, 0.4):
        if len(picks) >= min(n, S):
            break
        k = int(np.argmin(np.abs(us - target)))
        if min((abs(k - p) for p in picks), default=S) >= 2:
            picks.add(k)
    return sorted(picks, reverse=True)


def _title(study: RenderedStudy) -> str:
    plan = study.plan
    on = [label for label in EXAM_LABELS + INFO_LABELS if plan.exam[label]]
    kinds = sorted({e.kind for e in plan.emboli})
    return (
        f"pedetect synth — seed {plan.seed}, study {plan.index}: {plan.n_slices} slices, "
        f"{int(plan.pe_slices.sum())} with PE; RV/LV {plan.anatomy.rv_lv_ratio:.2f}; "
        f"emboli: {len(plan.emboli)} ({', '.join(kinds)})\nexam labels = 1: {', '.join(on)}"
    )


def save_montage(study: RenderedStudy, path: Path, n: int = 12) -> Path:
    """Draw the montage of ``study`` to ``path`` (PNG)."""
    ks = choose_slices(study, n)
    cols = 4
    level, width = PE_WINDOW
    n_rows = (len(ks) + cols - 1) // cols
    fig = Figure(figsize=(cols * 3.4, n_rows * 2.5 + 0.8), facecolor="black")
    axes = fig.subplots(n_rows, cols, squeeze=False)
    z = study.z
    body = (study.tissue != 0).any(axis=0)
    body[study.tissue[0] == 13] = False  # not the table
    body_rows, body_cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    pad = max(2, study.plan.scanner.size // 64)
    r0, r1 = max(body_rows[0] - pad, 0), body_rows[-1] + pad + 1
    c0, c1 = max(body_cols[0] - pad, 0), body_cols[-1] + pad + 1
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), ks):
        img = np.clip((study.hu[k, r0:r1, c0:c1] - (level - width / 2)) / width, 0.0, 1.0)
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        emb = study.emboli[k, r0:r1, c0:c1]
        for i, e in enumerate(study.plan.emboli, start=1):
            m = emb == i
            if m.any():  # outline just outside the mask so that the dark defect stays visible
                ring = binary_dilation(m, iterations=max(1, study.plan.scanner.size // 256))
                ax.contour(ring, levels=[0.5], colors=COLOURS[e.kind], linewidths=0.7)
        tag = "PE" if study.plan.pe_slices[k] else ""
        ax.set_title(f"z {z[k]:.1f} mm  {tag}", color="#ff6b60" if tag else "white", fontsize=8)
    fig.suptitle(_title(study), color="white", fontsize=8.5)
    fig.text(
        0.5,
        0.005,
        "PE window L100/W700 · outlines from phantom masks: red acute, yellow chronic",
        color="#aaaaaa",
        ha="center",
        fontsize=7.5,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="black")
    return path


def write_preview(path: Path, **dataset: Any) -> Path:
    """Montage of the first positive study of the dataset (:func:`plan_study`'s keyword arguments: seed,
    split, slices, size, positive_fraction, indeterminate_fraction) written to ``path``."""
    return save_montage(first_positive(**dataset), path)
