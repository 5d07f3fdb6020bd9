"""The CTPA phantom: anatomy, pathology, scanner, UIDs and labels of one study (docs/design.md, "Synthetic data").

A study is *planned* first (:func:`plan_study`): every random draw, the 3D geometry of the anatomy
(capsules and ellipsoids in millimetres), the emboli and their rasterised masks, the scanner and the
labels. Rendering the image volume (:mod:`pedetect.synth.render`) is then pure drawing. Labels come
from the geometry, the scanner and the tissues' HU alone: a slice is positive exactly when an embolus
is *visible* on it (:mod:`pedetect.synth.visibility`: its filling defect's Rose SNR at the slice's
pixel size, thickness and noise), so planning is enough to study label statistics without drawing a
single image. With ``min_embolus_pixels`` (the demo's "conspicuous" profile) the emboli are also cut
where they show fewer pixels than that (on the demo's data the rule then hides nothing more).

Phantom frame (mm): x towards the patient's left, y towards the back, z towards the head. The chest
is ``ANATOMY_HEIGHT`` mm tall and is mapped onto the scan range whatever the slice spacing, so a
series of any slice count shows the whole chest (base of lungs to apices).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import pandas as pd

from pedetect.labels import (
    CHRONICITY_LABELS,
    EXAM_LABELS,
    IMAGE_LABEL,
    INFO_LABELS,
    LOCATION_LABELS,
    NEGATIVE_LABELS,
    RV_LV_LABELS,
    SERIES,
    SOP,
    STUDY,
    TRAIN_COLUMNS,
)
from pedetect.synth.raster import Grid, Segment, segment_chunks, segment_mask
from pedetect.synth.visibility import embolus_visibility, slab_thickness

ANATOMY_HEIGHT = 280.0
SPLITS = ("train", "test")
KINDS = ("positive", "negative", "indeterminate")

# RSNA-STR training-set exam frequencies (per exam), which the synthetic training sets follow by default.
POSITIVE_FRACTION = 0.31
INDETERMINATE_FRACTION = 0.02
LOCATION_TARGETS = {"central_pe": 0.18, "rightsided_pe": 0.80, "leftsided_pe": 0.66}
RV_LV_GTE_1_FRACTION = 0.42
CHRONIC_FRACTION = 0.13
ACUTE_AND_CHRONIC_FRACTION = 0.06

CENTRAL, RIGHT, LEFT = LOCATION_LABELS  # "central_pe", "rightsided_pe", "leftsided_pe"
CHRONIC, ACUTE_AND_CHRONIC = CHRONICITY_LABELS
NEGATIVE, INDETERMINATE = NEGATIVE_LABELS
GTE_1, LT_1 = RV_LV_LABELS
QA_MOTION, QA_CONTRAST, FLOW_ARTIFACT, TRUE_FILLING_DEFECT = INFO_LABELS


class Tissue(IntEnum):
    """Label of every voxel of the phantom (the ``tissue`` volume of a rendered study)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BONE = 3
    LUNG = 4
    SOFT = 5  # liver, spleen, airway walls
    MYOCARDIUM = 6
    PA_BLOOD = 7  # right heart and pulmonary arteries (contrast)
    SYS_BLOOD = 8  # left heart, aorta, pulmonary veins
    SVC_BLOOD = 9  # superior vena cava and arm veins (dense contrast)
    IVC_BLOOD = 10  # unopacified inferior vena cava
    CSF = 11
    DISC = 12
    TABLE = 13
    FLOW_OUTER = 14  # mixing artefact in a pulmonary artery (not an embolus)
    FLOW_INNER = 15
    MIMIC = 16  # true filling defect that is not PE (in a vein)
    EMBOLUS_ACUTE = 17
    EMBOLUS_CHRONIC = 18


EMBOLUS_TISSUES = (Tissue.EMBOLUS_ACUTE, Tissue.EMBOLUS_CHRONIC)
PA_LEVELS = ("trunk", "main", "lobar", "segmental", "subsegmental", "small")
# Arteries that can hold an embolus, and the weight of each artery of a level when one is drawn (per
# artery: there are 1 trunk, 2 main, 6 lobar, 18 segmental and 36 subsegmental arteries). Set so
# that the most proximal visible clot of a positive exam is lobar, segmental or subsegmental about as
# often as in the literature (docs/synthetic_visibility.md, "Level mix"; central is the drawn
# central_pe rate).
EMBOLUS_LEVEL_WEIGHTS = {"trunk": 1.0, "main": 2.0, "lobar": 2.0, "segmental": 1.0, "subsegmental": 0.45}
# The "conspicuous" profile (min_embolus_pixels > 0, pedetect demo's data) keeps the mix it was made
# with, no subsegmental arteries, so that its studies stay what they were, draw for draw.
CONSPICUOUS_LEVEL_WEIGHTS = {"trunk": 1.0, "main": 2.0, "lobar": 3.0, "segmental": 2.0}


def _location_base_probabilities() -> dict[str, float]:
    """Independent per-location probabilities whose marginals, conditioned on 'at least one', hit the targets."""
    p = dict(LOCATION_TARGETS)
    for _ in range(200):
        none = float(np.prod([1.0 - v for v in p.values()]))
        p = {k: min(0.999, LOCATION_TARGETS[k] * (1.0 - none)) for k in p}
    return p


LOCATION_BASE = _location_base_probabilities()


def uid(*parts: object) -> str:
    """A deterministic ``2.25.<int>`` UID (ISO/IEC 9834-8 style) from the given parts."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") | 1)


# --------------------------------------------------------------------------------------------- data


@dataclass
class Vessel:
    """A tube along a polyline; ``side``/``level`` name pulmonary arteries (empty for other vessels)."""

    name: str
    tissue: Tissue
    points: np.ndarray  # (n, 3) mm
    radii: np.ndarray  # (n,) mm
    side: str = ""  # "central", "right", "left" for pulmonary arteries
    level: str = ""  # one of PA_LEVELS for pulmonary arteries
    only_over: tuple[int, ...] | None = None  # paint only over these tissues (small lung vessels)

    def segments(self) -> list[Segment]:
        p, r = self.points, self.radii
        return [Segment(tuple(p[i]), tuple(p[i + 1]), float(r[i]), float(r[i + 1])) for i in range(len(p) - 1)]

    def locations(self) -> frozenset[str]:
        """PE location labels that an embolus in this artery implies."""
        if self.level == "trunk":
            return frozenset({CENTRAL})
        if self.level == "main":
            return frozenset({CENTRAL, RIGHT if self.side == "right" else LEFT})
        if self.side in ("right", "left"):
            return frozenset({RIGHT if self.side == "right" else LEFT})
        return frozenset()

    def length(self) -> float:
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())


@dataclass
class Blob:
    """An ellipsoid painted only over the listed tissues (flow artefact, non-PE filling defect)."""

    centre: tuple[float, float, float]
    ax: float
    ay: float
    hz: float
    tissue: Tissue
    where: tuple[int, ...]


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


@dataclass
class Anatomy:
    """Body and organ dimensions (mm) of one phantom."""

    a: float  # body half-width
    b_front: float  # body half-depth, anterior / posterior
    b_back: float
    fat: float
    muscle: float
    a_c: float  # thoracic cavity half-width and half-depths
    bc_front: float
    bc_back: float
    rib: float
    dome_right: float  # diaphragm dome tops (fraction of height)
    dome_left: float
    heart_centre: tuple[float, float]
    heart_angle: float
    # Blood-pool short-axis diameters of the ventricles where they are widest. Both ventricles scale
    # together along z, so every axial slice through them shows this ratio (the radiologist's
    # measurement); the exam's RV/LV label is w_rv / w_lv >= 1.
    w_lv: float
    w_rv: float
    l_lv: float
    l_rv: float
    septum: float
    vertebra_y: float
    vertebra_r: float
    canal_r: float
    trachea_r: float
    trachea_y: float
    band_x: float  # upper mediastinum centre and half-width
    band_w: float
    lung_centre: float  # lateral offset of each lung's centre (fraction of a_c)
    rib_phase: tuple[float, float]
    disc_phase: float

    @property
    def rv_lv_ratio(self) -> float:
        return self.w_rv / self.w_lv


@dataclass
class Scanner:
    """Acquisition and storage parameters of one series."""

    n_slices: int
    size: int
    spacing: float  # mm between slice positions
    thickness: float
    pixel_spacing: float
    x0: float  # patient coordinates of the centre of pixel (0, 0)
    y0: float
    z0: float  # z of the lowest slice
    u_range: tuple[float, float]  # anatomical extent covered (fractions of ANATOMY_HEIGHT)
    intercept: float
    slope: float
    signed: bool
    bits_stored: int
    padding: int | None  # stored PixelPaddingValue outside a circular field of view
    instance_order: str  # "increasing", "decreasing" (z vs InstanceNumber) or "shuffled"
    noise_sd: float
    blur_mm: float
    window: tuple[list[float], list[float]]
    series_number: int
    kernel: str
    # General Equipment: drawn from their own random stream (:func:`sample_equipment`), so that adding
    # them changed no other draw of any study.
    manufacturer: str = "pedetect synthetic phantom"
    model: str = ""

    def z(self) -> np.ndarray:
        """Patient z (mm) of each slice in position order (ascending)."""
        return np.round(self.z0 + self.spacing * np.arange(self.n_slices), 4)

    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


@dataclass
class StudyPlan:
    """Everything about one synthetic study except its pixels."""

    index: int
    seed: int
    split: str
    kind: str  # "positive", "negative" or "indeterminate" (as realised by the geometry)
    anatomy: Anatomy
    scanner: Scanner
    grid: Grid
    vessels: list[Vessel]
    blobs: list[Blob]
    emboli: list[Embolus]
    hu: dict[int, float]  # mean HU per Tissue
    exam: dict[str, int]  # the nine exam labels and four informational labels
    pe_slices: np.ndarray  # (S,) bool, position order
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: list[str]  # position order
    instance_numbers: np.ndarray  # (S,) position order
    patient: str  # "0007"
    noise_seed: int = 0
    motion: bool = False
    intended: dict = field(default_factory=dict)  # the label draw the geometry realises (see draw_labels)

    @property
    def n_slices(self) -> int:
        return self.scanner.n_slices

    def labels_frame(self):
        """The train.csv rows of this study, in position order."""
        n = self.n_slices
        data: dict[str, object] = {
            STUDY: [self.study_uid] * n,
            SERIES: [self.series_uid] * n,
            SOP: list(self.sop_uids),
            IMAGE_LABEL: self.pe_slices.astype(np.int64),
        }
        for label in EXAM_LABELS + INFO_LABELS:
            data[label] = np.full(n, int(self.exam[label]), dtype=np.int64)
        return pd.DataFrame(data)[list(TRAIN_COLUMNS)]


# ------------------------------------------------------------------------------------------ anatomy


def lung_scale(u: np.ndarray | float) -> np.ndarray:
    """In-plane scale of each lung along the height: full below 0.7, closing at the apex (u = 1)."""
    u = np.asarray(u, dtype=np.float64)
    return np.where(u < 0.7, 1.0, np.clip((1.0 - u) / 0.3, 0.0, 1.0) ** 0.6)


def heart_scale(u: np.ndarray | float) -> np.ndarray:
    u = np.asarray(u, dtype=np.float64)
    return np.sqrt(np.clip(1.0 - ((u - 0.265) / 0.155) ** 2, 0.0, 1.0))


def dome_height(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height (fraction of ANATOMY_HEIGHT) of the diaphragm under (x, y): lung exists above it."""
    right = an.dome_right - 0.22 * (
        ((x + 0.42 * an.a_c) / (0.55 * an.a_c)) ** 2 + ((y + 0.15 * an.bc_back) / (0.95 * an.bc_back)) ** 2
    )
    left = an.dome_left - 0.22 * (
        ((x - 0.42 * an.a_c) / (0.55 * an.a_c)) ** 2 + ((y + 0.15 * an.bc_back) / (0.95 * an.bc_back)) ** 2
    )
    return np.where(x < 0, right, left)


def _sample_anatomy(rng: np.random.Generator, rv_lv_ratio: float) -> Anatomy:
    a = rng.uniform(138.0, 172.0)
    b_front = a * rng.uniform(0.62, 0.74)
    b_back = b_front * rng.uniform(0.86, 0.95)
    fat = rng.uniform(6.0, 24.0)
    muscle = rng.uniform(7.0, 12.0)
    rib = rng.uniform(6.0, 8.0)
    a_c = a - fat - muscle - rib
    bc_front = b_front - fat - muscle - rib
    bc_back = b_back - fat - muscle - rib - rng.uniform(14.0, 24.0)  # thick back muscles
    w_lv = rng.uniform(37.0, 44.0)
    vr = rng.uniform(15.0, 19.0)
    return Anatomy(
        a=a,
        b_front=b_front,
        b_back=b_back,
        fat=fat,
        muscle=muscle,
        a_c=a_c,
        bc_front=bc_front,
        bc_back=bc_back,
        rib=rib,
        dome_right=rng.uniform(0.19, 0.23),
        dome_left=rng.uniform(0.15, 0.19),
        heart_centre=(0.16 * a_c + rng.uniform(-5, 5), -0.38 * bc_front + rng.uniform(-4, 4)),
        heart_angle=np.deg2rad(rng.uniform(-50.0, -35.0)),
        w_lv=w_lv,
        w_rv=w_lv * rv_lv_ratio,
        l_lv=rng.uniform(70.0, 85.0),
        l_rv=rng.uniform(55.0, 68.0),
        septum=rng.uniform(8.0, 11.0),
        vertebra_y=bc_back - 0.35 * vr,
        vertebra_r=vr,
        canal_r=rng.uniform(6.5, 8.0),
        trachea_r=rng.uniform(8.0, 10.5),
        trachea_y=bc_back - 0.35 * vr - vr - rng.uniform(20.0, 26.0),
        band_x=rng.uniform(0.0, 6.0),
        band_w=rng.uniform(24.0, 32.0),
        lung_centre=rng.uniform(0.46, 0.52),
        rib_phase=(rng.uniform(0, 1), rng.uniform(0, 1)),
        disc_phase=rng.uniform(0, 1),
    )


def lung_contains(an: Anatomy, p: np.ndarray, margin: float = 0.85) -> bool:
    """Whether a point lies well inside a lung (used to grow the lung vessel trees).

    Pure-Python floats (called thousands of times per study); mirrors the drawn lung envelope:
    lung ellipse ∩ cavity, above the diaphragm dome, off the mediastinum and the heart.
    """
    x, y, z = float(p[0]), float(p[1]), float(p[2])
    u = z / ANATOMY_HEIGHT
    s = 1.0 if u < 0.7 else max(0.0, min(1.0, (1.0 - u) / 0.3)) ** 0.6
    if s <= 0.05:
        return False
    sx = -1.0 if x < 0 else 1.0
    top = an.dome_right if x < 0 else an.dome_left
    dome = top - 0.22 * (
        ((x - sx * 0.42 * an.a_c) / (0.55 * an.a_c)) ** 2 + ((y + 0.15 * an.bc_back) / (0.95 * an.bc_back)) ** 2
    )
    if u <= dome + 0.02:
        return False
    bc = an.bc_back if y > 0 else an.bc_front
    m2 = margin * margin
    if (x / an.a_c) ** 2 + (y / bc) ** 2 > m2:
        return False
    lx = an.lung_centre * an.a_c * sx
    if ((x - lx) / (0.62 * an.a_c * s)) ** 2 + (
        (y - 0.05 * an.bc_back) / (1.02 * max(an.bc_front, an.bc_back) * s)
    ) ** 2 > m2:
        return False
    if abs(x - an.band_x) < an.band_w + 10.0:
        return False
    hz = 1.0 - ((u - 0.265) / 0.155) ** 2
    if hz > 0:
        hx, hy = an.heart_centre
        if ((x - hx) ** 2 + (y - hy) ** 2) ** 0.5 < (0.5 * an.l_lv + 12.0) * hz**0.5 + 8.0:
            return False
    return True


def _pa(an: Anatomy, fx: float, fy: float, u: float) -> np.ndarray:
    """A point from fractions of the cavity half-width/-depth and of the height."""
    return np.array([fx * an.a_c, fy * (an.bc_back if fy > 0 else an.bc_front), u * ANATOMY_HEIGHT])


_LOBES = {  # (u range, y rule): y rule -1 anterior only, +1 posterior only (above u 0.3), 0 any
    "upper": ((0.56, 0.95), 0),
    "middle": ((0.28, 0.56), -1),
    "lingula": ((0.28, 0.54), -1),
    "lower": ((0.03, 0.56), 1),
}
_TREE_LEVELS = ("lobar", "segmental", "subsegmental")


def _lobe_points(rng: np.random.Generator, an: Anatomy, side: str, lobe: str, n: int) -> np.ndarray:
    """Points spread through one lobe (rejection sampling in the lung envelope)."""
    (u0, u1), rule = _LOBES[lobe]
    sx = -1.0 if side == "right" else 1.0
    m = 40 * n
    cand = np.column_stack(
        [
            sx * rng.uniform(0.0, an.a_c, m),
            rng.uniform(-an.bc_front, an.bc_back, m),
            rng.uniform(u0, u1, m) * ANATOMY_HEIGHT,
        ]
    )
    cut = -0.1 * an.bc_front
    u = cand[:, 2] / ANATOMY_HEIGHT
    ok = ~((rule == -1) & (cand[:, 1] > cut) | (rule == 1) & (u > 0.3) & (cand[:, 1] < cut))
    picked = []
    for p in cand[ok].tolist():
        if lung_contains(an, p, margin=0.93):
            picked.append(p)
            if len(picked) == n:
                break
    return np.array(picked, dtype=np.float64).reshape(-1, 3)


def _grow_tree(
    rng: np.random.Generator,
    an: Anatomy,
    out: list[Vessel],
    name: str,
    tissue: Tissue,
    side: str,
    start: np.ndarray,
    targets: np.ndarray,
    radius: float,
    depth: int = 0,
) -> None:
    """A space-filling branching tree from ``start`` to every target point.

    Each branch heads for the centroid of its targets, then splits them in two (three near the
    root) along their widest axis (a k-d split); leaves end on a target and sprout twigs towards
    the pleura. Radii shrink by about a quarter per level.
    """
    if len(targets) == 0:
        return
    level = _TREE_LEVELS[depth] if depth < len(_TREE_LEVELS) else "small"
    label = level if tissue == Tissue.PA_BLOOD else ""
    if len(targets) == 1:
        end = targets[0]
    else:
        centroid = targets.mean(axis=0)
        frac = 0.35 if depth == 0 else 0.5
        end = start + (centroid - start) * frac + rng.normal(0.0, 2.0, 3)
        if depth > 0 and not lung_contains(an, end, margin=0.97):
            end = start + (centroid - start) * 0.25
    small = level in ("subsegmental", "small")
    out.append(
        Vessel(
            name,
            tissue,
            np.array([start, end]),
            np.array([radius, radius * 0.93]),
            side=side,
            level=label,
            only_over=(int(Tissue.LUNG),) if small and radius < 2.6 else None,
        )
    )
    if len(targets) == 1:
        # Twigs from each leaf towards the pleura fill the periphery with small vessels.
        out_dir = end - start
        out_dir = out_dir / max(float(np.sqrt(out_dir @ out_dir)), 1e-6)
        n = int(rng.integers(2, 4))
        d = out_dir[None, :] + rng.normal(0.0, 0.6, (n, 3))
        d /= np.maximum(np.sqrt((d * d).sum(axis=1)), 1e-6)[:, None]
        tips = end[None, :] + d * rng.uniform(12.0, 28.0, n)[:, None]
        twig_label = "small" if tissue == Tissue.PA_BLOOD else ""
        for c, tip in enumerate(tips):
            if lung_contains(an, tip, margin=0.99):
                out.append(
                    Vessel(
                        f"{name}.t{c}",
                        tissue,
                        np.array([end, tip]),
                        np.array([0.9 * radius, 0.7 * radius]),
                        side=side,
                        level=twig_label,
                        only_over=(int(Tissue.LUNG),),
                    )
                )
        return
    axis = int(np.argmax(targets.max(axis=0) - targets.min(axis=0)))
    order = np.argsort(targets[:, axis], kind="stable")
    parts = 3 if depth == 0 and len(targets) >= 9 else 2
    radii = radius * rng.uniform(0.7, 0.8, parts)
    for c, idx in enumerate(np.array_split(order, parts)):
        _grow_tree(rng, an, out, f"{name}.{c}", tissue, side, end, targets[idx], max(1.1, float(radii[c])), depth + 1)


def _build_vessels(rng: np.random.Generator, an: Anatomy) -> list[Vessel]:
    H = ANATOMY_HEIGHT
    hx, hy = an.heart_centre
    r_pa = rng.uniform(12.0, 14.5) * (1.0 + 0.12 * max(0.0, an.rv_lv_ratio - 1.0))
    r_ao = rng.uniform(12.5, 16.0)
    v: list[Vessel] = []

    def tube(name, tissue, pts, radii, side="", level="", only_over=None):
        v.append(
            Vessel(
                name, tissue, np.array(pts, dtype=np.float64), np.array(radii, dtype=np.float64), side, level, only_over
            )
        )

    # Aorta: root above the LV, ascending right-anterior, arch over to the left of the spine, descending.
    dz = an.vertebra_y - an.vertebra_r - r_ao * 0.75 - 4.0
    dx = 0.2 * an.a_c
    asc = (-0.15 * an.a_c, -0.36 * an.bc_front)
    tube(
        "aorta",
        Tissue.SYS_BLOOD,
        [
            (hx - 10.0, hy + 8.0, 0.36 * H),
            (asc[0] + 4.0, asc[1] + 6.0, 0.46 * H),
            (asc[0], asc[1], 0.62 * H),
            (asc[0] + 10.0, asc[1] + 4.0, 0.71 * H),
            (0.05 * an.a_c, 0.0, 0.755 * H),
            (dx, dz - 8.0, 0.73 * H),
            (dx + 2.0, dz, 0.66 * H),
            (dx - 4.0, dz - 4.0, 0.0 * H),
            (dx - 8.0, dz - 8.0, -0.05 * H),
        ],
        [r_ao * 0.95, r_ao, r_ao, r_ao * 0.95, r_ao * 0.9, r_ao * 0.85, r_ao * 0.8, r_ao * 0.75, r_ao * 0.75],
    )
    # Arch branches up into the neck.
    for i, (fx, fy, r) in enumerate(((-0.1, -0.25, 6.5), (0.02, -0.12, 4.5), (0.14, -0.02, 5.0))):
        base = (fx * an.a_c, fy * an.bc_front, 0.73 * H)
        tube(
            f"arch_branch{i}",
            Tissue.SYS_BLOOD,
            [base, (base[0] * 1.3 - 4.0 * (i == 0), base[1] + 4.0, 1.05 * H)],
            [r, r * 0.9],
        )
    # Superior vena cava and brachiocephalic veins (dense contrast from the arm injection).
    svc = (-0.24 * an.a_c, -0.3 * an.bc_front)
    tube(
        "svc",
        Tissue.SVC_BLOOD,
        [(svc[0] - 6.0, svc[1] + 6.0, 0.40 * H), (svc[0], svc[1], 0.5 * H), (svc[0], svc[1], 0.8 * H)],
        [10.0, 9.5, 9.0],
    )
    tube(
        "brachiocephalic_v_left",
        Tissue.SVC_BLOOD,
        [
            (svc[0], svc[1], 0.8 * H),
            (0.35 * an.a_c, -0.42 * an.bc_front, 0.86 * H),
            (0.45 * an.a_c, -0.4 * an.bc_front, 1.05 * H),
        ],
        [8.0, 6.5, 6.0],
    )
    tube(
        "brachiocephalic_v_right",
        Tissue.SVC_BLOOD,
        [(svc[0], svc[1], 0.8 * H), (svc[0] - 8.0, svc[1] - 4.0, 1.05 * H)],
        [8.5, 7.0],
    )
    # Inferior vena cava (unopacified) from the abdomen into the right atrium.
    tube(
        "ivc",
        Tissue.IVC_BLOOD,
        [(-0.2 * an.a_c, 0.15 * an.bc_back, -0.05 * H), (-0.22 * an.a_c, 0.05 * an.bc_back, 0.2 * H)],
        [11.0, 11.0],
    )

    # Pulmonary trunk from the right ventricular outflow tract, bifurcating into the main arteries.
    rvot = np.array([hx - 0.35 * an.w_rv + 8.0, hy - 0.5 * an.l_rv * 0.5, 0.36 * H])
    bif = _pa(an, 0.09, -0.18, 0.535)
    mid = np.array([0.14 * an.a_c, -0.42 * an.bc_front, 0.46 * H])
    tube("pa_trunk", Tissue.PA_BLOOD, [rvot, mid, bif], [r_pa * 0.95, r_pa, r_pa * 0.95], "central", "trunk")
    hil_r = _pa(an, -0.40, -0.02, 0.52) + np.array([0, 0, rng.uniform(-4, 4)])
    hil_l = _pa(an, 0.40, 0.08, 0.545) + np.array([0, 0, rng.uniform(-4, 4)])
    r_main = r_pa * 0.72
    tube(
        "rpa",
        Tissue.PA_BLOOD,
        [bif, _pa(an, -0.1, -0.02, 0.54), hil_r],
        [r_main, r_main, r_main * 0.9],
        "right",
        "main",
    )
    tube(
        "lpa",
        Tissue.PA_BLOOD,
        [bif, _pa(an, 0.24, -0.1, 0.565), hil_l],
        [r_main * 0.97, r_main * 0.95, r_main * 0.85],
        "left",
        "main",
    )
    lobes = {
        "right": [("upper", 40), ("middle", 20), ("lower", 48)],
        "left": [("upper", 38), ("lingula", 16), ("lower", 44)],
    }
    for side, hil in (("right", hil_r), ("left", hil_l)):
        for lobe, n_pts in lobes[side]:
            pts = _lobe_points(rng, an, side, lobe, n_pts)
            _grow_tree(
                rng, an, v, f"pa_{side}_{lobe}", Tissue.PA_BLOOD, side, hil, pts, r_main * rng.uniform(0.55, 0.62)
            )
    # Pulmonary veins: from the left atrium out into both lungs, between the arteries.
    la = np.array([0.04 * an.a_c, 0.12 * an.bc_back, 0.40 * H])
    for side, sx in (("right", -1.0), ("left", 1.0)):
        for name, lobes_here in (
            ("superior", ("upper", "lingula" if side == "left" else "middle")),
            ("inferior", ("lower",)),
        ):
            start = la + np.array([sx * 22.0, 0.0, (8.0 if name == "superior" else -6.0)])
            pts = np.concatenate([_lobe_points(rng, an, side, lobe, 22) for lobe in lobes_here])
            _grow_tree(rng, an, v, f"pv_{side}_{name}", Tissue.SYS_BLOOD, "", start, pts, rng.uniform(6.0, 7.5))
    return v


# ----------------------------------------------------------------------------------------- pathology


def _cumulative(points: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


def _along(points: np.ndarray, radii: np.ndarray, cum: np.ndarray, s: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Point, radius and unit direction at arclength s of a polyline."""
    i = int(np.clip(np.searchsorted(cum, s, "right") - 1, 0, len(points) - 2))
    seg = cum[i + 1] - cum[i]
    f = 0.0 if seg <= 0 else (s - cum[i]) / seg
    d = points[i + 1] - points[i]
    n = np.linalg.norm(d)
    return points[i] + f * d, float(radii[i] + f * (radii[i + 1] - radii[i])), d / (n if n > 0 else 1.0)


def _embolus_segments(rng: np.random.Generator, vessel: Vessel, kind: str) -> list[Segment]:
    """Capsules of an embolus lying along part of the artery: central (acute) or wall-adherent (chronic)."""
    cum = _cumulative(vessel.points)
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
        p, r, d = _along(vessel.points, vessel.radii, cum, s)
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


def _rasterise_embolus(segs: list[Segment], vessel: Vessel, grid: Grid) -> tuple[list, np.ndarray]:
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


def _keep_conspicuous(chunks: list, grid: Grid, min_pixels: int) -> tuple[list, np.ndarray]:
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


def _overlap(a: list, b: list) -> bool:
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


def _place_emboli(
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
            segs = _embolus_segments(rng, vessel, kind)
            chunks, crossed = _rasterise_embolus(segs, vessel, grid)
            if min_pixels > 0:
                chunks, crossed = _keep_conspicuous(chunks, grid, min_pixels)
            if crossed.any() and not any(_overlap(chunks, e.chunks) for e in emboli):
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


# ------------------------------------------------------------------------------------------- scanner

_RESCALE = [  # (weight, intercept, slope, signed, bits_stored)
    (0.30, -1024.0, 1.0, True, 16),
    (0.25, -1024.0, 1.0, False, 12),
    (0.10, -1000.0, 1.0, False, 12),
    (0.15, 0.0, 1.0, True, 16),
    (0.10, -1024.0, 0.5, False, 16),
    (0.10, -1024.0, 2.0, False, 12),
]
_SPACINGS = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
_WINDOWS = (([40.0], [400.0]), ([100.0], [700.0]), ([40.0, -600.0], [400.0, 1500.0]), ([50.0], [350.0]))


# Manufacturer-like settings of the synthetic studies: four vendors of two models each. The names say
# "synthetic": a phantom under a real vendor's name would make a subgroup table look like a claim about
# that vendor's scanners (and the kernels are drawn independently of the vendor: B30f is Siemens-style,
# FC08 Canon-style, STANDARD GE-style, so a real name would pair one vendor with another's kernel).
EQUIPMENT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Synthetic Vendor A", ("Model A1", "Model A2")),
    ("Synthetic Vendor B", ("Model B1", "Model B2")),
    ("Synthetic Vendor C", ("Model C1", "Model C2")),
    ("Synthetic Vendor D", ("Model D1", "Model D2")),
)
EQUIPMENT_STREAM = 7  # the extra entropy word of the equipment's random stream


def sample_equipment(seed: int, split: str, index: int) -> tuple[str, str]:
    """(Manufacturer, ManufacturerModelName) of study ``index`` of the dataset (seed, split).

    Drawn from a stream of its own, ``default_rng([seed, split code, index, EQUIPMENT_STREAM])``, not
    from the six streams of :func:`_streams`: every other draw of every study (anatomy, scanner,
    emboli, noise, hence pixels, labels, UIDs and instance numbers) is what it was before the
    equipment existed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index), EQUIPMENT_STREAM])
    vendor, models = EQUIPMENT[int(rng.integers(len(EQUIPMENT)))]
    return vendor, models[int(rng.integers(len(models)))]


def _sample_scanner(
    rng: np.random.Generator,
    an: Anatomy,
    size: int,
    slices: int | None,
    equipment: tuple[str, str] = ("pedetect synthetic phantom", ""),
) -> Scanner:
    n = int(rng.integers(60, 141))
    n = int(slices) if slices is not None else n
    spacing = float(rng.choice(_SPACINGS))
    thickness = spacing if rng.random() < 0.7 else float(min(5.0, spacing * 1.25))
    fov = 2.0 * (an.a + rng.uniform(12.0, 40.0))
    ps = float(np.round(fov / size, 6))
    off_x, off_y = rng.uniform(-10.0, 10.0), rng.uniform(-4.0, 16.0)
    half = (size - 1) / 2.0 * ps
    x0, y0 = float(np.round(-half + off_x, 4)), float(np.round(-half + off_y, 4))
    z0 = float(np.round(-rng.uniform(40.0, 360.0), 1))
    w = np.array([r[0] for r in _RESCALE])
    intercept, slope, signed, bits = _RESCALE[int(rng.choice(len(_RESCALE), p=w / w.sum()))][1:]
    padding = -2000 if signed and rng.random() < 0.5 else None
    order = ("decreasing", "increasing", "shuffled")[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
    lo = rng.uniform(-0.03, 0.05)
    hi = rng.uniform(0.96, 1.03)
    return Scanner(
        n_slices=n,
        size=int(size),
        spacing=spacing,
        thickness=thickness,
        pixel_spacing=ps,
        x0=x0,
        y0=y0,
        z0=z0,
        u_range=(lo, hi),
        intercept=intercept,
        slope=slope,
        signed=bool(signed),
        bits_stored=int(bits),
        padding=padding,
        instance_order=order,
        noise_sd=rng.uniform(8.0, 26.0),
        blur_mm=rng.uniform(0.3, 0.9),
        window=_WINDOWS[int(rng.integers(len(_WINDOWS)))],
        series_number=int(rng.integers(2, 9)),
        kernel=("STANDARD", "B30f", "FC08", "SOFT")[int(rng.integers(4))],
        manufacturer=equipment[0],
        model=equipment[1],
    )


def make_grid(sc: Scanner) -> Grid:
    n = sc.n_slices
    lo, hi = sc.u_range
    zs = (lo + (hi - lo) * (np.arange(n) + 0.5) / n) * ANATOMY_HEIGHT
    ys = sc.y0 + sc.pixel_spacing * np.arange(sc.size)
    xs = sc.x0 + sc.pixel_spacing * np.arange(sc.size)
    return Grid(zs=zs, ys=ys, xs=xs)


# ------------------------------------------------------------------------------------------- the plan


def _draw_labels(
    rng: np.random.Generator, positive_fraction: float, indeterminate_fraction: float, kind: str | None
) -> dict:
    u = rng.random()
    drawn = (
        "positive"
        if u < positive_fraction
        else "indeterminate"
        if u < positive_fraction + indeterminate_fraction
        else "negative"
    )
    kind = kind or drawn
    loc_draw = rng.random(3)
    wanted = {k for k, r in zip(LOCATION_BASE, loc_draw) if r < LOCATION_BASE[k]}
    for _ in range(100):
        if wanted:
            break
        wanted = {k for k in LOCATION_BASE if rng.random() < LOCATION_BASE[k]}
    c = rng.random()
    chronicity = (
        "chronic" if c < CHRONIC_FRACTION else "both" if c < CHRONIC_FRACTION + ACUTE_AND_CHRONIC_FRACTION else "acute"
    )
    n_emboli = max(len(wanted), 1 + int(rng.poisson(1.3)), 2 if chronicity == "both" else 1)
    n_emboli = min(n_emboli, 7)
    gte = rng.random() < RV_LV_GTE_1_FRACTION
    # The RV/LV diameter ratio is spread evenly over 0.6-1.5 on both sides of 1, but for a band of
    # ±3 % around it: there the two diameters differ by less than a pixel of the demo's images
    # (about 1.2 of 40 mm, at 1.4 mm per pixel) and by less than a radiologist's own measurement
    # error, so a label drawn there would be noise, not a test.
    ratio_positive = rng.uniform(1.03, 1.5) if gte else rng.uniform(0.6, 0.97)
    ratio_other = rng.uniform(1.03, 1.2) if rng.random() < 0.08 else rng.uniform(0.6, 0.97)
    if kind == "indeterminate":
        qa_contrast = rng.random() < 0.7
        qa_motion = rng.random() < (0.5 if qa_contrast else 0.9)
    else:
        qa_contrast = rng.random() < 0.02
        qa_motion = rng.random() < 0.02
    flow = rng.random() < 0.05
    mimic = rng.random() < 0.03
    if chronicity == "both":
        kinds = ["acute", "chronic"] + ["acute" if rng.random() < 0.5 else "chronic" for _ in range(n_emboli - 2)]
    else:
        kinds = [chronicity if chronicity != "both" else "acute"] * n_emboli
    pa_hu = rng.uniform(120.0, 190.0) if qa_contrast else rng.uniform(250.0, 450.0)
    sys_hu = rng.uniform(200.0, 330.0) if qa_contrast else pa_hu * rng.uniform(0.45, 0.8)
    return dict(
        kind=kind,
        wanted=wanted,
        kinds=kinds,
        ratio=ratio_positive if kind == "positive" else ratio_other,
        qa_contrast=qa_contrast,
        qa_motion=qa_motion,
        flow=flow,
        mimic=mimic,
        pa_hu=pa_hu,
        sys_hu=sys_hu,
    )


def _tissue_hu(rng: np.random.Generator, pa_hu: float, sys_hu: float) -> dict[int, float]:
    T = Tissue
    hu = {
        T.AIR: -1000.0,
        T.FAT: rng.uniform(-115.0, -85.0),
        T.MUSCLE: rng.uniform(40.0, 60.0),
        T.BONE: rng.uniform(650.0, 850.0),
        T.LUNG: rng.uniform(-870.0, -820.0),
        T.SOFT: rng.uniform(55.0, 75.0),
        T.MYOCARDIUM: rng.uniform(45.0, 70.0),
        T.PA_BLOOD: pa_hu,
        T.SYS_BLOOD: sys_hu,
        T.SVC_BLOOD: min(1100.0, pa_hu * rng.uniform(1.1, 1.9)),
        T.IVC_BLOOD: rng.uniform(70.0, 130.0),
        T.CSF: rng.uniform(5.0, 25.0),
        T.DISC: rng.uniform(70.0, 100.0),
        T.TABLE: rng.uniform(-250.0, -150.0),
        T.FLOW_OUTER: 0.0,
        T.FLOW_INNER: 0.0,
        T.MIMIC: rng.uniform(25.0, 60.0),
        T.EMBOLUS_ACUTE: rng.uniform(25.0, 55.0),
        T.EMBOLUS_CHRONIC: rng.uniform(35.0, 65.0),
    }
    hu[T.FLOW_OUTER] = 0.55 * pa_hu + 0.45 * 110.0
    hu[T.FLOW_INNER] = 0.25 * pa_hu + 0.75 * 110.0
    return {int(k): float(v) for k, v in hu.items()}


def _streams(seed: int, split: str, index: int) -> list[np.random.Generator]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ss = np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)])
    return [np.random.default_rng(s) for s in ss.spawn(6)]


def plan_study(
    index: int = 0,
    *,
    seed: int = 0,
    split: str = "train",
    slices: int | None = None,
    size: int = 256,
    positive_fraction: float = POSITIVE_FRACTION,
    indeterminate_fraction: float = INDETERMINATE_FRACTION,
    kind: str | None = None,
    min_embolus_pixels: int = 0,
) -> StudyPlan:
    """Plan study ``index`` of the dataset (seed, split): geometry, scanner, UIDs and labels, no pixels.

    Study k depends only on (seed, split, k) and the options, never on how many studies are made.
    ``kind`` forces "positive", "negative" or "indeterminate" (the rest of the study is unchanged; a
    forced positive whose emboli no reader could see at this pixel size and slice count is realised
    negative, its emboli kept, visible nowhere).
    Default: the labels say where an embolus is visible (:mod:`pedetect.synth.visibility`), emboli are
    drawn in trunk to subsegmental arteries (:data:`EMBOLUS_LEVEL_WEIGHTS`) and each is placed where it
    shows on at least one slice. ``min_embolus_pixels`` > 0 draws conspicuous emboli instead (the
    demo's profile): each shows at least that many pixels on every slice labelled with it and is cut
    where it shows fewer (:func:`_keep_conspicuous`), and the emboli keep
    :data:`CONSPICUOUS_LEVEL_WEIGHTS` (mostly the larger arteries, no subsegmental ones). The
    visibility rule applies there too; on the demo's data (25 pixels at 256 px, 40 slices) it hides
    no slice, so those studies are what they were before the rule.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not (
        positive_fraction >= 0.0 and indeterminate_fraction >= 0.0 and positive_fraction + indeterminate_fraction <= 1.0
    ):
        raise ValueError("positive_fraction and indeterminate_fraction must be >= 0 and sum to <= 1")
    if min_embolus_pixels < 0:
        raise ValueError("min_embolus_pixels must be >= 0")
    r_labels, r_anat, r_scan, r_path, r_look, r_noise = _streams(seed, split, index)
    lab = _draw_labels(r_labels, positive_fraction, indeterminate_fraction, kind)
    an = _sample_anatomy(r_anat, lab["ratio"])
    vessels = _build_vessels(r_anat, an)
    sc = _sample_scanner(r_scan, an, size, slices, sample_equipment(seed, split, index))
    grid = make_grid(sc)
    hu = _tissue_hu(r_look, lab["pa_hu"], lab["sys_hu"])

    slab_mm = slab_thickness(grid, sc.spacing, sc.thickness)

    def see(segs: list[Segment], vessel: Vessel, chunks: list, kind: str) -> np.ndarray:
        """The slices where a reader sees this embolus (its Rose SNR in this study's noise and slab)."""
        clot = Tissue.EMBOLUS_CHRONIC if kind == "chronic" else Tissue.EMBOLUS_ACUTE
        return embolus_visibility(
            segs,
            vessel.segments(),
            chunks,
            grid,
            slab_mm=slab_mm,
            contrast_hu=hu[int(Tissue.PA_BLOOD)] - hu[int(clot)],
            noise_sd=sc.noise_sd,
        ).visible

    emboli = (
        _place_emboli(r_path, vessels, grid, lab["wanted"], lab["kinds"], min_embolus_pixels, see)
        if lab["kind"] == "positive"
        else []
    )
    blobs: list[Blob] = []
    by_name = {v.name: v for v in vessels}
    if lab["flow"]:
        v = by_name[["pa_trunk", "rpa", "lpa"][int(r_path.integers(3))]]
        p, r, _ = _along(v.points, v.radii, _cumulative(v.points), r_path.uniform(0.3, 0.7) * v.length())
        blobs.append(Blob(tuple(p), 0.8 * r, 0.8 * r, 1.3 * r, Tissue.FLOW_OUTER, (int(Tissue.PA_BLOOD),)))
        blobs.append(Blob(tuple(p), 0.45 * r, 0.45 * r, 0.8 * r, Tissue.FLOW_INNER, (int(Tissue.FLOW_OUTER),)))
    if lab["mimic"]:
        names = ["svc"] + [v.name for v in vessels if v.name.startswith("pv_") and v.name.count(".") == 0]
        v = by_name[names[int(r_path.integers(len(names)))]]
        p, r, _ = _along(v.points, v.radii, _cumulative(v.points), r_path.uniform(0.3, 0.7) * v.length())
        blobs.append(
            Blob(tuple(p), 0.55 * r, 0.55 * r, 1.2 * r, Tissue.MIMIC, (int(Tissue.SVC_BLOOD), int(Tissue.SYS_BLOOD)))
        )

    # The labels are what a reader sees: the slices where an embolus is visible, and the exam labels of
    # the emboli visible somewhere (one visible nowhere makes nothing positive).
    pe_slices = np.zeros(sc.n_slices, dtype=bool)
    for e in emboli:
        pe_slices |= e.visible
    seen = [e for e in emboli if e.visible.any()]
    realised = "positive" if pe_slices.any() else ("negative" if lab["kind"] == "positive" else lab["kind"])
    exam = dict.fromkeys(EXAM_LABELS + INFO_LABELS, 0)
    if realised == "positive":
        locs = set().union(*(e.locations for e in seen))
        for label in LOCATION_LABELS:
            exam[label] = int(label in locs)
        gte = an.rv_lv_ratio >= 1.0
        exam[GTE_1], exam[LT_1] = int(gte), int(not gte)
        kinds = {e.kind for e in seen}
        exam[CHRONIC] = int(kinds == {"chronic"})
        exam[ACUTE_AND_CHRONIC] = int(kinds == {"acute", "chronic"})
    elif realised == "indeterminate":
        exam[INDETERMINATE] = 1
    else:
        exam[NEGATIVE] = 1
    exam[QA_MOTION] = int(lab["qa_motion"])
    exam[QA_CONTRAST] = int(lab["qa_contrast"])
    exam[FLOW_ARTIFACT] = int(lab["flow"])
    exam[TRUE_FILLING_DEFECT] = int(lab["mimic"])

    key = (seed, split, index, size, slices, positive_fraction, indeterminate_fraction, kind)
    if min_embolus_pixels:  # (the default keeps the UIDs it always had)
        key += (min_embolus_pixels,)
    n = sc.n_slices
    if sc.instance_order == "increasing":
        inst = np.arange(1, n + 1)
    elif sc.instance_order == "decreasing":
        inst = np.arange(n, 0, -1)
    else:
        inst = r_scan.permutation(n) + 1
    return StudyPlan(
        index=index,
        seed=seed,
        split=split,
        kind=realised,
        anatomy=an,
        scanner=sc,
        grid=grid,
        vessels=vessels,
        blobs=blobs,
        emboli=emboli,
        hu=hu,
        exam=exam,
        pe_slices=pe_slices,
        study_uid=uid("study", *key),
        series_uid=uid("series", *key),
        frame_uid=uid("frame", *key),
        sop_uids=[uid("sop", *key, k) for k in range(n)],
        instance_numbers=inst.astype(np.int64),
        patient=f"{index:04d}",
        noise_seed=int(r_noise.integers(2**63)),
        motion=bool(lab["qa_motion"]),
        intended=_intended_exam(lab),
    )


def _intended_exam(lab: dict) -> dict[str, int]:
    """Exam and informational labels as drawn, before any geometry."""
    exam = dict.fromkeys(EXAM_LABELS + INFO_LABELS, 0)
    if lab["kind"] == "positive":
        for label in LOCATION_LABELS:
            exam[label] = int(label in lab["wanted"])
        kinds = set(lab["kinds"])
        exam[CHRONIC] = int(kinds == {"chronic"})
        exam[ACUTE_AND_CHRONIC] = int(kinds == {"acute", "chronic"})
        gte = lab["ratio"] >= 1.0
        exam[GTE_1], exam[LT_1] = int(gte), int(not gte)
    else:
        exam[INDETERMINATE if lab["kind"] == "indeterminate" else NEGATIVE] = 1
    exam[QA_MOTION], exam[QA_CONTRAST] = int(lab["qa_motion"]), int(lab["qa_contrast"])
    exam[FLOW_ARTIFACT], exam[TRUE_FILLING_DEFECT] = int(lab["flow"]), int(lab["mimic"])
    return exam


def draw_labels(
    index: int = 0,
    *,
    seed: int = 0,
    split: str = "train",
    positive_fraction: float = POSITIVE_FRACTION,
    indeterminate_fraction: float = INDETERMINATE_FRACTION,
) -> dict[str, int]:
    """The exam labels that study ``index`` is drawn with, without building its geometry (fast).

    :func:`plan_study` realises exactly these labels whenever its emboli can be placed where a reader
    sees them (at the default 256 px nearly always; at a coarse pixel size or a few thick slices only
    the larger arteries show, and an exam whose drawn locations cannot be seen is realised without
    them; ``StudyPlan.intended`` keeps the drawn labels for checking).
    """
    return _intended_exam(
        _draw_labels(_streams(seed, split, index)[0], positive_fraction, indeterminate_fraction, None)
    )
