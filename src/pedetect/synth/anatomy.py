"""The phantom's body: its tissues, the organs' dimensions, and the arteries and veins as tubes
(docs/design.md, "Synthetic data").

Phantom frame (mm): x towards the patient's left, y towards the back, z towards the head. The chest
is ``ANATOMY_HEIGHT`` mm tall and is mapped onto the scan range whatever the slice spacing, so a
series of any slice count shows the whole chest (base of lungs to apices).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from pedetect.labels import LOCATION_LABELS
from pedetect.synth.raster import Segment

ANATOMY_HEIGHT = 280.0


CENTRAL, RIGHT, LEFT = LOCATION_LABELS  # "central_pe", "rightsided_pe", "leftsided_pe"


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


PA_LEVELS = ("trunk", "main", "lobar", "segmental", "subsegmental", "small")


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


def sample_anatomy(rng: np.random.Generator, rv_lv_ratio: float) -> Anatomy:
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
