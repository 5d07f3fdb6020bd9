"""Emboli: capsules lying in a pulmonary artery, rasterised on the scan's grid and clipped to the
lumen, placed where a reader sees them (:mod:`pedetect.synth.visibility`) at the arteries of the
levels drawn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pedetect.synth.anatomy import Tissue, Vessel
from pedetect.synth.raster import Grid, Segment, segment_chunks, segment_mask
from pedetect.synth.vessels import arclengths, point_along

EMBOLUS_TISSUES = (Tissue.EMBOLUS_ACUTE, Tissue.EMBOLUS_CHRONIC)


# Arteries that can hold an embolus, and the weight of each artery of a level when one is drawn (per
# artery: there are 1 trunk, 2 main, 6 lobar, 18 segmental and 36 subsegmental arteries). Set so
# that the most proximal visible clot of a positive exam is lobar, segmental or subsegmental about as
# often as in the literature (docs/synthetic_visibility.md, "Level mix"; central is the drawn
# central_pe rate).
EMBOLUS_LEVEL_WEIGHTS = {"trunk": 1.0, "main": 2.0, "lobar": 2.0, "segmental": 1.0, "subsegmental": 0.45}


# The "conspicuous" profile (min_embolus_pixels > 0, pedetect demo's data) keeps the mix it was made
# with, no subsegmental arteries, so that its studies stay what they were, draw for draw.
CONSPICUOUS_LEVEL_WEIGHTS = {"trunk": 1.0, "main": 2.0, "lobar": 3.0, "segmental": 2.0}


@dataclass
class Embolus:
    vessel: str
    level: str  # level of the artery (PA_LEVELS)
    kind: str  # "acute" or "chronic"
    locations: frozenset[str]
    segments: list[Segment]
    chunks: list  # [(box, mask)], the rasterised embolus clipped to its artery's lumen
    slices: np.ndarray  # (S,) bool, slices that the embolus crosses (its mask has a pixel there)
    visible: np.ndarray  # (S,) bool, slices where a reader sees it (pedetect.synth.visibility); within slices

    @property
    def tissue(self) -> Tissue:
        return Tissue.EMBOLUS_CHRONIC if self.kind == "chronic" else Tissue.EMBOLUS_ACUTE


def embolus_segments(rng: np.random.Generator, vessel: Vessel, kind: str) -> list[Segment]:
    """Capsules of an embolus lying along part of the artery: central (acute) or wall-adherent (chronic)."""
    cum = arclengths(vessel.points)
    total = float(cum[-1])
    lo, hi = {"trunk": (10.0, 35.0), "main": (10.0, 35.0), "lobar": (10.0, 40.0)}.get(vessel.level, (8.0, 28.0))
    length = min(rng.uniform(lo, hi), 0.85 * total)
    s0 = rng.uniform(0.05 * total, max(0.05 * total, 0.95 * total - length))
    ss = [s0] + [float(c) for c in cum[1:-1] if s0 < c < s0 + length] + [s0 + length]
    ref = rng.normal(size=3)
    ref /= np.linalg.norm(ref)
    if kind == "acute":
        frac = rng.uniform(0.45, 0.72)
        jitter = rng.uniform(0.0, 0.12)
    else:
        grow = rng.uniform(1.0, 1.5)  # radius of the mural disc relative to the artery
        depth = rng.uniform(0.38, 0.62)  # thickness of the mural thrombus relative to the radius
    segs = []
    pts = []
    for s in ss:
        p, r, d = point_along(vessel.points, vessel.radii, cum, s)
        perp = ref - np.dot(ref, d) * d
        perp /= max(np.linalg.norm(perp), 1e-6)
        if kind == "acute":
            pts.append((p + perp * jitter * r, frac * r))
        else:
            re = grow * r
            pts.append((p + perp * (re + r - depth * r), re))
    for (p0, r0), (p1, r1) in zip(pts[:-1], pts[1:]):
        segs.append(Segment(tuple(p0), tuple(p1), float(r0), float(r1)))
    return segs


def rasterise_embolus(segs: list[Segment], vessel: Vessel, grid: Grid) -> tuple[list, np.ndarray]:
    """Embolus chunks clipped to the artery lumen, and the slices it crosses."""
    lumen = vessel.segments()
    chunks = []
    crossed = np.zeros(len(grid.zs), dtype=bool)
    for seg in segs:
        for box, m in segment_chunks(seg, grid):
            zs, ys, xs = grid.zs[box[0]], grid.ys[box[1]], grid.xs[box[2]]
            inside = np.zeros_like(m)
            for ls in lumen:
                inside |= segment_mask(ls, zs, ys, xs)
            m = m & inside
            if m.any():
                chunks.append((box, m))
                crossed[box[0]] |= m.any(axis=(1, 2))
    return chunks, crossed


def keep_conspicuous(chunks: list, grid: Grid, min_pixels: int) -> tuple[list, np.ndarray]:
    """The embolus only on the slices where its cross-section covers at least ``min_pixels`` pixels,
    and those slices (the "conspicuous" profile, ``min_embolus_pixels``). A capsule's rounded ends
    cross a slice or two with a sliver of a pixel or three: with a minimum, the clot stops where it
    stops being conspicuous, so the mask and the slice labels agree (unless the visibility rule hides
    a slice as well: on the demo's data it hides none)."""
    canvases: dict[int, np.ndarray] = {}
    for box, m in chunks:
        for k in range(box[0].start, box[0].stop):
            canvas = canvases.setdefault(k, np.zeros((len(grid.ys), len(grid.xs)), dtype=bool))
            canvas[box[1], box[2]] |= m[k - box[0].start]
    shown = np.zeros(len(grid.zs), dtype=bool)
    for k, canvas in canvases.items():
        shown[k] = int(canvas.sum()) >= min_pixels
    kept = []
    for box, m in chunks:
        m = m & shown[box[0]][:, None, None]
        if m.any():
            kept.append((box, m))
    return kept, shown


def overlap(a: list, b: list) -> bool:
    """Whether two rasterised shapes (lists of (box, mask)) share a voxel."""
    for ba, ma in a:
        for bb, mb in b:
            lo = [max(x.start, y.start) for x, y in zip(ba, bb)]
            hi = [min(x.stop, y.stop) for x, y in zip(ba, bb)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            canvas = np.zeros([h - low for low, h in zip(lo, hi)], dtype=np.uint8)
            for box, m in ((ba, ma), (bb, mb)):
                # clip each mask to the shared window and add it in
                sl_src, sl_dst = [], []
                for ax, s_ in enumerate(box):
                    start, stop = max(s_.start, lo[ax]), min(s_.stop, hi[ax])
                    if stop <= start:
                        break
                    sl_src.append(slice(start - s_.start, stop - s_.start))
                    sl_dst.append(slice(start - lo[ax], stop - lo[ax]))
                else:
                    canvas[tuple(sl_dst)] += m[tuple(sl_src)]
            if (canvas > 1).any():
                return True
    return False


def place_emboli(
    rng: np.random.Generator,
    vessels: list[Vessel],
    grid: Grid,
    wanted: set[str],
    kinds: list[str],
    min_pixels: int = 0,
    see=None,
) -> list[Embolus]:
    """Emboli realising the wanted location labels (each at a compatible artery) and kinds.

    An embolus is placed where a reader sees it on at least one slice (``see(segments, vessel, chunks,
    kind)`` gives the slices where it is visible, :func:`pedetect.synth.visibility.embolus_visibility`;
    without ``see``, wherever it crosses the grid); when no such place is found in the attempts, the
    first place it crosses the grid at all is kept, visible nowhere (a clot below what the scan shows:
    it labels nothing). With ``min_pixels`` (the conspicuous profile) the embolus is also cut to the
    slices where at least that many pixels of it show, and the arteries are drawn with
    :data:`CONSPICUOUS_LEVEL_WEIGHTS`."""
    weights = CONSPICUOUS_LEVEL_WEIGHTS if min_pixels > 0 else EMBOLUS_LEVEL_WEIGHTS
    sites = [v for v in vessels if v.level in weights and v.locations() <= wanted]
    if not sites:
        return []
    emboli: list[Embolus] = []
    # One embolus per wanted location first, then the rest anywhere compatible.
    needs = sorted(wanted)
    for i, kind in enumerate(kinds):
        need = needs[i] if i < len(needs) else None
        unseen: Embolus | None = None  # the first place found that no reader would see
        placed = False
        for attempt in range(40):
            pool = [v for v in sites if need is None or need in v.locations()]
            if attempt >= 25:  # small series / pixel sizes: prefer big arteries
                pool = [v for v in pool if v.level in ("trunk", "main", "lobar")] or pool
            if not pool:
                break
            w = np.array([weights[v.level] for v in pool])
            vessel = pool[int(rng.choice(len(pool), p=w / w.sum()))]
            segs = embolus_segments(rng, vessel, kind)
            chunks, crossed = rasterise_embolus(segs, vessel, grid)
            if min_pixels > 0:
                chunks, crossed = keep_conspicuous(chunks, grid, min_pixels)
            if crossed.any() and not any(overlap(chunks, e.chunks) for e in emboli):
                visible = crossed.copy() if see is None else see(segs, vessel, chunks, kind) & crossed
                embolus = Embolus(vessel.name, vessel.level, kind, vessel.locations(), segs, chunks, crossed, visible)
                if visible.any():
                    emboli.append(embolus)
                    placed = True
                    break
                unseen = unseen or embolus
        if not placed and unseen is not None:
            emboli.append(unseen)
    return emboli
