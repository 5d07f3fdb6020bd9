"""Drawing a planned study: tissue labels → Hounsfield units → scanner effects → stored values."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pedetect.synth.anatomy import ANATOMY_HEIGHT, Anatomy, Tissue, dome_height, heart_scale, lung_scale
from pedetect.synth.phantom import StudyPlan, plan_study
from pedetect.synth.raster import Grid, Segment, ellipse_rho2, paint, paint_ellipsoid, paint_scaled, paint_segment
from pedetect.synth.visibility import NOISE_BLUR_PX

T = Tissue


@dataclass
class RenderedStudy:
    """One study in memory, every array in position order (ascending z, slice index 0 first).

    ``hu`` is exactly what a reader gets back from the DICOM files (stored × slope + intercept),
    ``stored`` the stored pixel values, ``emboli`` 0 or the 1-based index of the embolus in
    ``plan.emboli`` at each voxel (``pe_mask`` is ``emboli > 0``), ``tissue`` the :class:`Tissue`
    of each voxel. ``z`` is each slice's patient z in mm.
    """

    plan: StudyPlan
    hu: np.ndarray  # float32 (S, H, W)
    stored: np.ndarray  # int16 or uint16 (S, H, W)
    emboli: np.ndarray  # uint8 (S, H, W)
    tissue: np.ndarray  # uint8 (S, H, W)

    @property
    def pe_mask(self) -> np.ndarray:
        return self.emboli > 0

    @property
    def z(self) -> np.ndarray:
        return self.plan.scanner.z()

    @property
    def labels(self):
        """train.csv rows of the study (pandas DataFrame), in position order."""
        return self.plan.labels_frame()

    @property
    def exam(self) -> dict[str, int]:
        return self.plan.exam


def lung_ellipses(an: Anatomy) -> list[tuple[float, float, float, float]]:
    """(cx, cy, ax, ay) of the right and left lung envelopes at full scale."""
    ay = 1.02 * max(an.bc_front, an.bc_back)
    cy = 0.05 * an.bc_back
    return [(-an.lung_centre * an.a_c, cy, 0.62 * an.a_c, ay), (an.lung_centre * an.a_c, cy, 0.62 * an.a_c, ay)]


def _tube(vol: np.ndarray, g: Grid, pts: list, radius: float, value: int) -> None:
    for p0, p1 in zip(pts[:-1], pts[1:]):
        paint_segment(vol, g, Segment(tuple(p0), tuple(p1), radius, radius), value)


def render_tissue(plan: StudyPlan) -> tuple[np.ndarray, np.ndarray]:
    """The tissue label volume and the embolus index volume of a planned study: each structure
    painted over the ones before it, from the table outwards to the emboli."""
    an, g = plan.anatomy, plan.grid
    us = g.zs / ANATOMY_HEIGHT  # each slice's height as a fraction of the anatomy
    vol = np.full(g.shape, int(T.AIR), dtype=np.uint8)
    parts = (
        _paint_table,
        _paint_body,
        _paint_cavity,
        _paint_mediastinum,
        _paint_spine,
        _paint_chest_wall_bones,
        _paint_airways,
        _paint_heart,
    )
    for paint_part in parts:
        paint_part(vol, an, g, us)
    emb = _paint_vessels_and_emboli(vol, plan)
    return vol, emb


def _paint_table(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """A scanner table under the patient: a shallow curved plate."""
    x2 = g.xs[None, :] ** 2
    top = an.b_back + 5.0 - 0.0009 * x2
    table = (g.ys[:, None] >= top) & (g.ys[:, None] <= top + 7.0) & (np.abs(g.xs[None, :]) < 0.95 * an.a + 20.0)
    vol[:, table] = int(T.TABLE)


def _paint_body(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """Subcutaneous fat over muscle over the thoracic cavity."""
    every = slice(0, len(g.zs))
    body_scale = 1.0 + 0.03 * (us - 0.5)
    rows, cols, rho2 = ellipse_rho2(g, 0.0, 0.0, an.a, an.b_front, ay_back=an.b_back, reach=1.03)
    paint_scaled(vol, every, rows, cols, rho2, body_scale, int(T.FAT))
    rows, cols, rho2 = ellipse_rho2(
        g, 0.0, 0.0, an.a - an.fat, an.b_front - an.fat, ay_back=an.b_back - an.fat, reach=1.03
    )
    paint_scaled(vol, every, rows, cols, rho2, body_scale, int(T.MUSCLE))


def _paint_cavity(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """The thoracic cavity: fat, abdomen below the diaphragm domes, lungs above them, stomach gas."""
    rows, cols, rho2c = ellipse_rho2(g, 0.0, 0.0, an.a_c, an.bc_front, ay_back=an.bc_back)
    xs, ys = g.xs[cols][None, :], g.ys[rows][:, None]
    dome = dome_height(an, xs, ys).astype(np.float32)
    cav = rho2c < 1.0
    sub = vol[:, rows, cols]
    sub[:, cav] = int(T.FAT)
    below = (dome[None] >= us[:, None, None].astype(np.float32)) & cav[None]
    sub[below] = int(T.SOFT)
    sl = lung_scale(us).astype(np.float32)[:, None, None] ** 2
    lung = np.zeros(sub.shape, dtype=bool)
    for cx, cy, ax, ay in lung_ellipses(an):
        r2 = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2
        lung |= r2.astype(np.float32)[None] < sl
    lung &= cav[None] & ~below
    sub[lung] = int(T.LUNG)
    # Stomach gas under the left dome.
    gas = (((xs - 0.4 * an.a_c) / 28.0) ** 2 + ((ys + 0.35 * an.bc_front) / 16.0) ** 2) < 1.0
    low = us < an.dome_left - 0.1
    if low.any():
        part = sub[low]
        part[:, gas & cav] = int(T.AIR)
        sub[low] = part


def _paint_mediastinum(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """A central band of fat from sternum to spine."""
    every = slice(0, len(g.zs))
    top_v = an.vertebra_y - an.vertebra_r
    cy = 0.5 * (top_v - an.bc_front)
    rows_b, cols_b, rho2 = ellipse_rho2(g, an.band_x, cy, an.band_w, 0.5 * (top_v + an.bc_front) + 6.0)
    band_scale = np.where(us < 0.2, 0.75, np.where(us > 0.82, 0.9, 1.0))
    paint_scaled(vol, every, rows_b, cols_b, rho2, band_scale, int(T.FAT))


def _paint_spine(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """Vertebral bodies with discs, canal, laminae, spinous and transverse processes."""
    S = len(g.zs)
    every = slice(0, len(g.zs))
    vy, vr, cr = an.vertebra_y, an.vertebra_r, an.canal_r
    disc = ((us / 0.085 + an.disc_phase) % 1.0) < 0.18
    rows, cols, rho2 = ellipse_rho2(g, 0.0, vy, vr * 1.05, vr)
    for value, on in ((T.BONE, ~disc), (T.DISC, disc)):
        paint(vol, (every, rows, cols), (rho2[None] < 1.0) & on[:, None, None], int(value))
    ccy = vy + vr + cr + 1.5
    skin = an.b_back - an.fat - 3.0
    spin_len = float(np.clip(skin - (ccy + cr + 3.0), 4.0, 16.0))
    for cx, cy_, ax, ay, value in (
        (0.0, ccy + 1.0, cr + 5.0, cr + 4.5, T.BONE),
        (-(cr + 11.0), ccy - 1.0, 10.0, 4.0, T.BONE),
        (cr + 11.0, ccy - 1.0, 10.0, 4.0, T.BONE),
        (0.0, ccy + cr + 3.0 + spin_len / 2, 3.5, spin_len / 2, T.BONE),
        (0.0, ccy, cr, cr, T.CSF),
    ):
        rows, cols, rho2 = ellipse_rho2(g, cx, cy_, ax, ay)
        paint_scaled(vol, every, rows, cols, rho2, np.ones(S), int(value))


def _paint_chest_wall_bones(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """Ribs sloping down from back to front, the sternum and the scapulae."""
    H = ANATOMY_HEIGHT
    # Ribs: bands just outside the cavity, sloping down from back to front.
    ring_out = 1.0 + an.rib / min(an.a_c, an.bc_back)
    rows, cols, rho2 = ellipse_rho2(g, 0.0, 0.0, an.a_c, an.bc_front, ay_back=an.bc_back, reach=ring_out + 0.05)
    ring = (rho2 >= 1.0) & (rho2 < ring_out**2)
    rr, cc = np.nonzero(ring)
    if len(rr):
        x = g.xs[cols][cc]
        y = g.ys[rows][rr]
        vn = np.where(y > 0, y / an.bc_back, y / an.bc_front) / np.sqrt(rho2[rr, cc])
        phi = np.arccos(np.clip(vn, -1.0, 1.0)) / np.pi  # 0 at the back, 1 at the front
        phase = np.where(x < 0, an.rib_phase[0], an.rib_phase[1]) * 0.25
        m = (0.93 - us[:, None] - 0.30 * phi[None, :]) / 0.072 + phase[None, :]
        n = np.round(m)
        bone = (np.abs(m - n) < 0.17) & (n >= 0) & (n <= 11) & (phi[None, :] > 0.1) & (phi[None, :] < 0.84)
        sub = vol[:, rows, cols]
        part = sub[:, rr, cc]
        part[bone] = int(T.BONE)
        sub[:, rr, cc] = part
    # Sternum (manubrium wider at the top).
    ks_st = g.slices(0.27 * H, 0.9 * H)
    rows, cols, rho2 = ellipse_rho2(g, 0.0, -an.bc_front - an.rib * 0.5 - 1.0, 16.0, 6.0, reach=1.4)
    paint_scaled(vol, ks_st, rows, cols, rho2, np.where(us[ks_st] > 0.78, 1.35, 1.0), int(T.BONE))
    # Scapulae: posterior-lateral plates in the upper chest.
    ks_sc = g.slices(0.58 * H, 0.95 * H)
    if ks_sc.stop > ks_sc.start:
        lo = 1.0 + (an.rib + 3.0) / an.a_c
        hi = lo + 5.0 / an.a_c
        rows, cols, rho2 = ellipse_rho2(g, 0.0, 0.0, an.a_c, an.bc_front, ay_back=an.bc_back, reach=hi + 0.05)
        y = g.ys[rows][:, None] * np.ones((1, len(g.xs[cols])))
        ang = np.arctan2(np.abs(g.xs[cols])[None, :] / an.a_c, np.maximum(y, 0.0) / an.bc_back + 1e-9) / np.pi
        plate = (rho2 >= lo**2) & (rho2 < hi**2) & (y > 0) & (ang > 0.22) & (ang < 0.4)
        paint(
            vol,
            (ks_sc, rows, cols),
            np.broadcast_to(plate, (ks_sc.stop - ks_sc.start,) + plate.shape),
            int(T.BONE),
            where=(int(T.MUSCLE), int(T.FAT)),
        )


def _paint_airways(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """Trachea, main and lobar bronchi, and the oesophagus."""
    H = ANATOMY_HEIGHT
    ty, tr = an.trachea_y, an.trachea_r
    carina = (-2.0, ty, 0.6 * H)
    airways = [
        ([carina, (-5.0, ty - 6.0, 1.06 * H)], tr),
        ([carina, (-0.3 * an.a_c, ty + 2.0, 0.55 * H), (-0.45 * an.a_c, 0.42 * an.bc_back, 0.36 * H)], 6.5),
        ([carina, (0.3 * an.a_c, ty + 8.0, 0.53 * H), (0.47 * an.a_c, 0.45 * an.bc_back, 0.36 * H)], 5.5),
        ([(-0.3 * an.a_c, ty + 2.0, 0.55 * H), (-0.45 * an.a_c, 0.0, 0.7 * H)], 4.0),
        ([(0.3 * an.a_c, ty + 8.0, 0.53 * H), (0.45 * an.a_c, 0.05 * an.bc_back, 0.68 * H)], 4.0),
    ]
    for pts, r in airways:
        _tube(vol, g, pts, r + 1.8, int(T.SOFT))
    for pts, r in airways:
        _tube(vol, g, pts, r, int(T.AIR))
    oy = ty + tr + 8.0
    _tube(vol, g, [(6.0, oy, -0.1 * H), (6.0, oy, 1.1 * H)], 6.0, int(T.MUSCLE))
    _tube(vol, g, [(6.0, oy, -0.1 * H), (6.0, oy, 1.1 * H)], 1.5, int(T.AIR))


def _paint_heart(vol: np.ndarray, an: Anatomy, g: Grid, us: np.ndarray) -> None:
    """The heart (over airways and oesophagus): pericardial fat, myocardium, ventricles (RV anterior-right,
    LV posterior-left), atria."""
    H = ANATOMY_HEIGHT
    hx, hy = an.heart_centre
    th = an.heart_angle
    el = np.array([np.cos(th), np.sin(th)])
    en = np.array([np.sin(th), -np.cos(th)])  # towards the RV (right-anterior)
    hs = heart_scale(us)
    ks = slice(int(np.argmax(hs > 0)), int(len(hs) - np.argmax(hs[::-1] > 0))) if (hs > 0).any() else slice(0, 0)
    lv_c = np.array([hx, hy]) - en * (an.septum / 2 + an.w_lv / 2) + el * 8.0
    rv_c = np.array([hx, hy]) + en * (an.septum / 2 + an.w_rv / 2) - el * 6.0
    peri_c = 0.5 * (lv_c + rv_c)
    shapes = [
        (peri_c, max(an.l_lv, an.l_rv) / 2 + 12.0, (an.w_lv + an.w_rv + an.septum) / 2 + 16.0, T.FAT),
        (lv_c, an.l_lv / 2 + 9.0, an.w_lv / 2 + 9.0, T.MYOCARDIUM),
        (rv_c, an.l_rv / 2 + 4.0, an.w_rv / 2 + 4.0, T.MYOCARDIUM),
        (lv_c, an.l_lv / 2, an.w_lv / 2, T.SYS_BLOOD),
        (rv_c, an.l_rv / 2, an.w_rv / 2, T.PA_BLOOD),
    ]
    soft = tuple(
        int(t) for t in (T.AIR, T.FAT, T.LUNG, T.SOFT, T.MYOCARDIUM, T.PA_BLOOD, T.SYS_BLOOD)
    )  # never bone or chest wall
    for c, ax, ay, tissue in shapes:
        rows, cols, rho2 = ellipse_rho2(g, float(c[0]), float(c[1]), ax, ay, angle=th)
        paint_scaled(vol, ks, rows, cols, rho2, hs[ks], int(tissue), where=soft)
    ra = (-0.3 * an.a_c, hy + 0.2 * an.bc_front, 0.34 * H)
    la = (0.04 * an.a_c, 0.12 * an.bc_back, 0.40 * H)
    paint_ellipsoid(vol, g, ra, 25.0, 23.0, 0.075 * H, int(T.MYOCARDIUM), where=soft)
    paint_ellipsoid(vol, g, ra, 22.0, 20.0, 0.07 * H, int(T.PA_BLOOD), where=soft)
    paint_ellipsoid(vol, g, la, 30.0, 19.0, 0.065 * H, int(T.MYOCARDIUM), where=soft)
    paint_ellipsoid(vol, g, la, 27.0, 16.0, 0.06 * H, int(T.SYS_BLOOD), where=soft)


def _paint_vessels_and_emboli(vol: np.ndarray, plan: StudyPlan) -> np.ndarray:
    """Vessels, flow artefacts, mimics and emboli; returns the embolus index volume."""
    g = plan.grid
    # Vessels: systemic and veins first, pulmonary arteries on top.
    for v in sorted(plan.vessels, key=lambda v: v.tissue == T.PA_BLOOD):
        for seg in v.segments():
            paint_segment(vol, g, seg, int(v.tissue), v.only_over)
    # Flow artefact and non-PE filling defects, painted only inside their vessel.
    for b in plan.blobs:
        paint_ellipsoid(vol, g, b.centre, b.ax, b.ay, b.hz, int(b.tissue), where=b.where)
    # Emboli last.
    emb = np.zeros(g.shape, dtype=np.uint8)
    for i, e in enumerate(plan.emboli, start=1):
        for box, m in e.chunks:
            paint(vol, box, m, int(e.tissue))
            paint(emb, box, m, i)
    return emb


def _noise_bank(rng: np.random.Generator, h: int, w: int, sd: float, k: int = 4, pad: int = 16) -> np.ndarray:
    """A few frames of correlated CT-like noise; slices take shifted windows of them. White noise
    blurred by a Gaussian of NOISE_BLUR_PX pixels, scaled to SD ``sd`` per pixel (the visibility rule
    calibrates its correlation factor on exactly this noise)."""
    bank = rng.standard_normal((k, h + pad, w + pad), dtype=np.float32)
    for i in range(k):
        bank[i] = cv2.GaussianBlur(bank[i], (0, 0), NOISE_BLUR_PX)
    bank *= np.float32(sd) / bank.std()
    return bank


def render_hu(plan: StudyPlan, tissue: np.ndarray) -> np.ndarray:
    """Float HU of the phantom with kernel blur, motion and noise (before storage)."""
    sc, g = plan.scanner, plan.grid
    lut = np.zeros(256, dtype=np.float32)
    for t, v in plan.hu.items():
        lut[t] = v
    hu = lut[tissue]
    # Dependent lung is denser (gravity gradient from front to back).
    grad = (25.0 * (g.ys - g.ys.mean()) / (np.ptp(g.ys) + 1e-9)).astype(np.float32)[:, None]
    lung = tissue == int(T.LUNG)
    hu += lung * grad[None]
    rng = np.random.default_rng(plan.noise_seed)
    S, Hh, W = hu.shape
    sigma_px = sc.blur_mm / sc.pixel_spacing
    pad = 16
    bank = _noise_bank(rng, Hh, W, sc.noise_sd, pad=pad)
    picks = rng.integers(0, len(bank), S)
    offs = rng.integers(0, pad + 1, (S, 2))
    motion = rng.integers(2, 6, S) * max(1, sc.size // 256) if plan.motion else None
    axes = rng.integers(0, 2, S)
    for k in range(S):
        sl = hu[k]
        if sigma_px >= 0.3:
            sl = cv2.GaussianBlur(sl, (0, 0), sigma_px)
        if motion is not None:
            d = int(motion[k])
            ghost = np.roll(sl, d, axis=int(axes[k]))
            sl = 0.6 * sl + 0.4 * ghost
            ksize = (d + 1, 1) if axes[k] == 1 else (1, d + 1)
            sl = cv2.blur(sl, ksize)
        i, (dy, dx) = int(picks[k]), offs[k]
        sl = sl + bank[i, dy : dy + Hh, dx : dx + W]
        hu[k] = sl
    return hu


def store(plan: StudyPlan, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored pixel values (with padding outside a circular field of view) and the HU they mean."""
    sc = plan.scanner
    lo, hi = sc.stored_range()
    stored = np.rint((hu - np.float32(sc.intercept)) * np.float32(1.0 / sc.slope))
    np.clip(stored, lo, hi, out=stored)
    stored = stored.astype(np.int16 if sc.signed else np.uint16)
    if sc.padding is not None:
        c = (sc.size - 1) / 2.0
        yy, xx = np.ogrid[: sc.size, : sc.size]
        outside = (yy - c) ** 2 + (xx - c) ** 2 > (sc.size / 2.0) ** 2
        stored[:, outside] = sc.padding
    out = stored.astype(np.float32) * np.float32(sc.slope) + np.float32(sc.intercept)
    return stored, out


def render_plan(plan: StudyPlan) -> RenderedStudy:
    tissue, emb = render_tissue(plan)
    stored, hu = store(plan, render_hu(plan, tissue))
    return RenderedStudy(plan=plan, hu=hu, stored=stored, emboli=emb, tissue=tissue)


def render_study(
    index: int = 0,
    *,
    seed: int = 0,
    split: str = "train",
    slices: int | None = None,
    size: int = 256,
    positive_fraction: float | None = None,
    indeterminate_fraction: float | None = None,
    kind: str | None = None,
    min_embolus_pixels: int = 0,
) -> RenderedStudy:
    """Study ``index`` of the synthetic dataset (seed, split), rendered in memory, no DICOM written.

    Same arguments as :func:`pedetect.synth.write_dataset` give the same study as on disk.
    ``kind`` ("positive", "negative", "indeterminate") forces the exam type.
    """
    kw = {}
    if positive_fraction is not None:
        kw["positive_fraction"] = positive_fraction
    if indeterminate_fraction is not None:
        kw["indeterminate_fraction"] = indeterminate_fraction
    plan = plan_study(
        index, seed=seed, split=split, slices=slices, size=size, kind=kind, min_embolus_pixels=min_embolus_pixels, **kw
    )
    return render_plan(plan)
