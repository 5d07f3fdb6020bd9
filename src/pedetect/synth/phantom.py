"""The plan of one synthetic CTPA study: its random streams, labels, UIDs, and the anatomy
(:mod:`~pedetect.synth.anatomy`, :mod:`~pedetect.synth.vessels`), emboli (:mod:`~pedetect.synth.emboli`)
and scanner (:mod:`~pedetect.synth.scanner`) drawn from them (docs/design.md, "Synthetic data").

A study is *planned* first (:func:`plan_study`): every random draw, the 3D geometry of the anatomy
(capsules and ellipsoids in millimetres), the emboli and their rasterised masks, the scanner and the
labels. Rendering the image volume (:mod:`pedetect.synth.render`) is then pure drawing. Labels come
from the geometry, the scanner and the tissues' HU alone: a slice is positive exactly when an embolus
is *visible* on it (:mod:`pedetect.synth.visibility`: its filling defect's Rose SNR at the slice's
pixel size, thickness and noise), so planning is enough to study label statistics without drawing a
single image. With ``min_embolus_pixels`` (the demo's "conspicuous" profile) the emboli are also cut
where they show fewer pixels than that (on the demo's data the rule then hides nothing more).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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
from pedetect.synth.anatomy import Anatomy, Blob, Tissue, Vessel, sample_anatomy
from pedetect.synth.emboli import Embolus, place_emboli
from pedetect.synth.raster import Grid, Segment
from pedetect.synth.scanner import EQUIPMENT, Scanner, make_grid, sample_scanner
from pedetect.synth.vessels import arclengths, build_vessels, point_along
from pedetect.synth.visibility import embolus_visibility, slab_thickness

SPLITS = ("train", "test")
KINDS = ("positive", "negative", "indeterminate")

# RSNA-STR training-set exam frequencies (per exam), which the synthetic training sets follow by default.
POSITIVE_FRACTION = 0.31
INDETERMINATE_FRACTION = 0.02
LOCATION_TARGETS = {"central_pe": 0.18, "rightsided_pe": 0.80, "leftsided_pe": 0.66}
RV_LV_GTE_1_FRACTION = 0.42
CHRONIC_FRACTION = 0.13
ACUTE_AND_CHRONIC_FRACTION = 0.06

CHRONIC, ACUTE_AND_CHRONIC = CHRONICITY_LABELS
NEGATIVE, INDETERMINATE = NEGATIVE_LABELS
GTE_1, LT_1 = RV_LV_LABELS
QA_MOTION, QA_CONTRAST, FLOW_ARTIFACT, TRUE_FILLING_DEFECT = INFO_LABELS


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
    where it shows fewer (:func:`keep_conspicuous`), and the emboli keep
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
    an = sample_anatomy(r_anat, lab["ratio"])
    vessels = build_vessels(r_anat, an)
    sc = sample_scanner(r_scan, an, size, slices, sample_equipment(seed, split, index))
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
        place_emboli(r_path, vessels, grid, lab["wanted"], lab["kinds"], min_embolus_pixels, see)
        if lab["kind"] == "positive"
        else []
    )
    blobs: list[Blob] = []
    by_name = {v.name: v for v in vessels}
    if lab["flow"]:
        v = by_name[["pa_trunk", "rpa", "lpa"][int(r_path.integers(3))]]
        p, r, _ = point_along(v.points, v.radii, arclengths(v.points), r_path.uniform(0.3, 0.7) * v.length())
        blobs.append(Blob(tuple(p), 0.8 * r, 0.8 * r, 1.3 * r, Tissue.FLOW_OUTER, (int(Tissue.PA_BLOOD),)))
        blobs.append(Blob(tuple(p), 0.45 * r, 0.45 * r, 0.8 * r, Tissue.FLOW_INNER, (int(Tissue.FLOW_OUTER),)))
    if lab["mimic"]:
        names = ["svc"] + [v.name for v in vessels if v.name.startswith("pv_") and v.name.count(".") == 0]
        v = by_name[names[int(r_path.integers(len(names)))]]
        p, r, _ = point_along(v.points, v.radii, arclengths(v.points), r_path.uniform(0.3, 0.7) * v.length())
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

    key: tuple[object, ...] = (seed, split, index, size, slices, positive_fraction, indeterminate_fraction, kind)
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
