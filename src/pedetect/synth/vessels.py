"""The phantom's vessels grown in its anatomy: aorta and its branches, the venae cavae, the
pulmonary trunk and main arteries, and space-filling trees of lobar, segmental, subsegmental and
small pulmonary arteries and veins; points along a vessel by arclength."""

from __future__ import annotations

import numpy as np

from pedetect.synth.anatomy import ANATOMY_HEIGHT, Anatomy, Tissue, Vessel, lung_contains


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


def build_vessels(rng: np.random.Generator, an: Anatomy) -> list[Vessel]:
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


def arclengths(points: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


def point_along(
    points: np.ndarray, radii: np.ndarray, cum: np.ndarray, s: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """Point, radius and unit direction at arclength s of a polyline."""
    i = int(np.clip(np.searchsorted(cum, s, "right") - 1, 0, len(points) - 2))
    seg = cum[i + 1] - cum[i]
    f = 0.0 if seg <= 0 else (s - cum[i]) / seg
    d = points[i + 1] - points[i]
    n = np.linalg.norm(d)
    return points[i] + f * d, float(radii[i] + f * (radii[i + 1] - radii[i])), d / (n if n > 0 else 1.0)
