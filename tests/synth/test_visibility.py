"""Labels that mean what a reader sees (docs/synthetic_visibility.md): the Rose-criterion rule on
made-up numbers, its noise calibration on the renderer's own noise, the slab's partial volume, a
rendered study whose embolus is halved in contrast, the level mix, and the labels' consistency."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import binary_dilation, binary_erosion
from scipy.signal import fftconvolve

from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY, exam_id
from pedetect.synth import plan_study, write_dataset
from pedetect.synth.anatomy import Tissue
from pedetect.synth.dataset import VISIBLE, clot_rows, clots_path
from pedetect.synth.emboli import CONSPICUOUS_LEVEL_WEIGHTS, EMBOLUS_LEVEL_WEIGHTS
from pedetect.synth.raster import Grid, Segment
from pedetect.synth.render import _noise_bank, render_plan
from pedetect.synth.visibility import (
    MIN_PIXELS,
    NOISE_BLUR_PX,
    NOISE_CORRELATED_PIXELS,
    ROSE_K,
    correlation_factor,
    embolus_visibility,
    is_visible,
    rose_snr,
    slab_fill,
    slab_thickness,
)

# ------------------------------------------------------------------------------------- the rule


def test_the_constants_are_the_documented_ones():
    assert ROSE_K == 5.0 and MIN_PIXELS == 2.0 and NOISE_BLUR_PX == 0.8 and NOISE_CORRELATED_PIXELS == 6.8


def test_correlation_factor_runs_from_one_pixel_to_the_correlated_area():
    assert correlation_factor(1) == pytest.approx(1.0)
    assert correlation_factor(25) == pytest.approx(25 * 6.8 / 30.8)
    values = [correlation_factor(a) for a in (1, 2, 5, 10, 50, 1000, 1e6)]
    assert values == sorted(values) and values[-1] == pytest.approx(6.8, rel=1e-4)


def test_snr_by_hand():
    # ΔHU 100 in noise of SD 20 over 25 pixels: (100 / 20) · sqrt(25 / c(25)), c(25) = 25·6.8/30.8.
    assert rose_snr(100, 20, 25) == pytest.approx(5.0 * math.sqrt(30.8 / 6.8))  # 10.64
    # One pixel: the noise is the pixel's own; a fill of 0.4 dilutes the contrast to 40 %.
    assert rose_snr(300, 20, 1) == pytest.approx(15.0)
    assert rose_snr(300, 20, 9, fill=0.4) == pytest.approx(0.4 * rose_snr(300, 20, 9))
    assert rose_snr(300, 20, 0) == 0.0 and rose_snr(300, 20, 9, fill=0.0) == 0.0


def test_halving_the_contrast_crosses_the_threshold_as_predicted():
    # An acute clot (40 HU) in poorly opacified blood (150 HU), noise 25 HU, 9 pixels: SNR = 4.4 · 1.475.
    snr = rose_snr(110, 25, 9)
    assert snr == pytest.approx(6.49, abs=0.01) and is_visible(110, 25, 9)
    assert rose_snr(55, 25, 9) == pytest.approx(snr / 2) and not is_visible(55, 25, 9)  # 3.25 < 5
    # Well opacified (350 HU): ΔHU 310 gives SNR 18.3; half of it, 9.1, is still above 5.
    assert is_visible(310, 25, 9) and is_visible(155, 25, 9)
    # The crossing is where the rule says: SNR(ΔHU) = 5 at ΔHU = 5 / (SNR per HU).
    threshold = ROSE_K / (rose_snr(1, 25, 9))
    assert is_visible(threshold * 1.001, 25, 9) and not is_visible(threshold * 0.999, 25, 9)


def test_halving_the_size_crosses_the_threshold_as_predicted():
    # ΔHU 110, noise 25: SNR = 4.4 · sqrt(A / c(A)). 16 pixels: 7.88; 8: 6.27; 4: 5.28; 2: 4.71.
    snrs = {a: rose_snr(110, 25, a) for a in (16, 8, 4, 2)}
    assert [round(snrs[a], 2) for a in (16, 8, 4, 2)] == [7.88, 6.27, 5.28, 4.71]
    for a, b in ((16, 8), (8, 4), (4, 2)):
        assert snrs[b] == pytest.approx(snrs[a] * math.sqrt((b / correlation_factor(b)) / (a / correlation_factor(a))))
    assert is_visible(110, 25, 4) and not is_visible(110, 25, 2)  # halving 4 pixels crosses
    # In white noise halving the area divides the SNR by sqrt(2); correlated noise loses less for small
    # areas (they average little of it away): between 4 and 2 pixels by sqrt(2·c(2)/c(4)).
    assert snrs[4] / snrs[2] < math.sqrt(2)


def test_a_couple_of_pixels_at_least_whatever_the_contrast():
    assert rose_snr(300, 8, 1.5) > 30 and not is_visible(300, 8, 1.5)  # a pixel and a half: too small to call
    assert is_visible(300, 8, 2.0)
    # Partial volume counts against both: 4 pixels filling 40 % of the slab are 1.6 pixels' worth.
    assert not is_visible(300, 8, 4, fill=0.4) and is_visible(300, 8, 4, fill=0.5)


# ------------------------------------------------------------------------------------ calibration


def test_the_correlation_factor_is_the_renderers_noise():
    """The variance of the renderer's noise summed over discs of 9-81 pixels is σ² · A · c(A) to 8 %."""
    rng = np.random.default_rng(3)
    sd = 20.0
    bank = np.concatenate([_noise_bank(rng, 192, 192, sd) for _ in range(3)])
    assert bank.std() == pytest.approx(sd, rel=1e-3)
    yy, xx = np.mgrid[-6:7, -6:7]
    for radius in (1.7, 3.0, 5.1):
        disc = (yy * yy + xx * xx) <= radius * radius
        area = int(disc.sum())
        sums = np.concatenate([fftconvolve(f, disc.astype(float), mode="valid")[::11, ::11].ravel() for f in bank])
        measured = sums.var() / (sd * sd * area)
        assert measured == pytest.approx(correlation_factor(area), rel=0.08), area


# ------------------------------------------------------------------------------- partial volume


def _grid(n_slices: int = 9, dz: float = 2.0, px: float = 0.5, size: int = 40) -> Grid:
    return Grid(
        zs=np.arange(n_slices) * dz,
        ys=(np.arange(size) - size / 2) * px,
        xs=(np.arange(size) - size / 2) * px,
    )


def test_slab_fill_is_the_fraction_of_the_slab_the_clot_fills():
    grid = _grid()
    lumen = [Segment((0.0, 0.0, -20.0), (0.0, 0.0, 40.0), 6.0, 6.0)]  # a wide artery along z
    clot = [Segment((0.0, 0.0, 4.0), (0.0, 0.0, 10.0), 3.0, 3.0)]  # a capsule from z 1 to 13
    rows, cols = slice(0, 40), slice(0, 40)
    centre = (20, 20)
    assert slab_fill(clot, lumen, grid, 3, rows, cols, 2.0)[centre] == pytest.approx(1.0)  # z 6: inside
    # Slice at z 0 with a 4 mm slab (-2 to 2): the clot's tip (z 1) fills a quarter of it at the centre.
    assert slab_fill(clot, lumen, grid, 0, rows, cols, 4.0)[centre] == pytest.approx(0.25, abs=0.07)
    # Clipped to the lumen as the rasteriser clips it: a lumen whose rounded end reaches z 6 on its axis
    # halves the 4 mm slab at z 6 there.
    short = [Segment((0.0, 0.0, -20.0), (0.0, 0.0, 0.0), 6.0, 6.0)]
    assert slab_fill(clot, short, grid, 3, rows, cols, 4.0)[centre] == pytest.approx(0.5, abs=0.07)


def test_embolus_visibility_dilutes_the_thin_ends_of_a_clot():
    from pedetect.synth.anatomy import Vessel
    from pedetect.synth.emboli import rasterise_embolus

    grid = _grid(n_slices=12, dz=2.0, px=0.7, size=48)
    vessel = Vessel("a", Tissue.PA_BLOOD, np.array([[0.0, 0.0, -10.0], [0.0, 0.0, 40.0]]), np.array([5.0, 5.0]))
    clot = [Segment((0.0, 0.0, 6.0), (0.0, 0.0, 14.0), 2.5, 2.5)]
    chunks, crossed = rasterise_embolus(clot, vessel, grid)
    thin = embolus_visibility(clot, vessel.segments(), chunks, grid, slab_mm=2.0, contrast_hu=300.0, noise_sd=20.0)
    thick = embolus_visibility(clot, vessel.segments(), chunks, grid, slab_mm=8.0, contrast_hu=300.0, noise_sd=20.0)
    np.testing.assert_array_equal(thin.pixels > 0, crossed)
    middle = 5  # z 10: the clot's middle
    assert thin.fill[middle] == pytest.approx(1.0) and thick.fill[middle] == pytest.approx(1.0)
    ends = np.flatnonzero(crossed)[[0, -1]]
    assert (thick.fill[ends] < thin.fill[ends]).all()  # a thick slab dilutes the ends more
    assert (thick.snr[ends] < thin.snr[ends]).all()
    for v in (thin, thick):
        expected = [is_visible(300.0, 20.0, p, f) for p, f in zip(v.pixels, v.fill)]
        np.testing.assert_array_equal(v.visible, np.array(expected) & crossed)
    # Faint enough, nothing shows.
    faint = embolus_visibility(clot, vessel.segments(), chunks, grid, slab_mm=8.0, contrast_hu=10.0, noise_sd=30.0)
    assert not faint.visible.any()


def test_slab_thickness_is_the_headers_thickness_on_the_phantoms_grid():
    plan = plan_study(0, seed=4, slices=40, size=64)
    sc, step = plan.scanner, plan.grid.zs[1] - plan.grid.zs[0]
    assert slab_thickness(plan.grid, sc.spacing, sc.thickness) == pytest.approx(step * sc.thickness / sc.spacing)


# ----------------------------------------------------------------------------- a rendered study


def _rendered_candidate():
    """A clean positive study (no motion, poor contrast or flow artefact) with an acute embolus visible
    on several slices, one of which has at least 1.5 times the SNR of another with 2 pixels' worth of
    clot or more: (plan, embolus number, its contrast, the low slice, the high slice)."""
    for index in range(40):
        plan = plan_study(index, seed=17, slices=40, size=192, kind="positive")
        if plan.exam["qa_motion"] or plan.exam["qa_contrast"] or plan.exam["flow_artifact"]:
            continue
        slab = slab_thickness(plan.grid, plan.scanner.spacing, plan.scanner.thickness)
        vessels = {v.name: v for v in plan.vessels}
        for number, e in enumerate(plan.emboli, start=1):
            if e.kind != "acute":
                continue
            contrast = plan.hu[int(Tissue.PA_BLOOD)] - plan.hu[int(e.tissue)]
            v = embolus_visibility(
                e.segments,
                vessels[e.vessel].segments(),
                e.chunks,
                plan.grid,
                slab_mm=slab,
                contrast_hu=contrast,
                noise_sd=plan.scanner.noise_sd,
            )
            np.testing.assert_array_equal(v.visible, e.visible)  # the plan's own verdict
            shown = np.flatnonzero(e.visible & (v.pixels * v.fill >= 2 * MIN_PIXELS))
            if len(shown) >= 2:
                low, high = shown[np.argmin(v.snr[shown])], shown[np.argmax(v.pixels[shown])]
                if v.snr[high] >= 1.5 * v.snr[low] and v.pixels[high] >= 12:
                    return plan, number, contrast, int(low), int(high)
    raise AssertionError("no study with an embolus on slices of different SNR")


def _visibility(plan, e, contrast):
    vessels = {v.name: v for v in plan.vessels}
    return embolus_visibility(
        e.segments,
        vessels[e.vessel].segments(),
        e.chunks,
        plan.grid,
        slab_mm=slab_thickness(plan.grid, plan.scanner.spacing, plan.scanner.thickness),
        contrast_hu=contrast,
        noise_sd=plan.scanner.noise_sd,
    )


def test_a_rendered_embolus_halved_in_contrast_hides_where_the_rule_says():
    """A rendered embolus whose contrast puts one slice at SNR 7.5 and another at 11 or more: halved
    in contrast (its HU moved half-way to the blood's), the first falls below 5 and the second stays
    above, as the rule predicts; and the rendered images show the contrast and the noise the rule
    reads from the plan, the halved one half the contrast."""
    plan, number, contrast, low, high = _rendered_candidate()
    e = plan.emboli[number - 1]
    blood = plan.hu[int(Tissue.PA_BLOOD)]
    scale = 7.5 / _visibility(plan, e, contrast).snr[low]  # a contrast that puts slice `low` at SNR 7.5
    plans, predicted = [], []
    for factor in (1.0, 0.5):
        hu = dict(plan.hu)
        hu[int(e.tissue)] = blood - factor * scale * contrast
        plans.append(dataclasses.replace(plan, hu=hu))
        predicted.append(_visibility(plan, e, factor * scale * contrast))
    full, half = predicted
    assert full.snr[low] == pytest.approx(7.5) and full.snr[high] >= 11.0
    np.testing.assert_allclose(half.snr, full.snr / 2)
    assert full.visible[low] and not half.visible[low]  # SNR 7.5 -> 3.75
    assert full.visible[high] and half.visible[high]  # SNR >= 11 -> >= 5.5
    for v, c in ((full, scale * contrast), (half, scale * contrast / 2)):
        expected = [is_visible(c, plan.scanner.noise_sd, p, f) for p, f in zip(v.pixels, v.fill)]
        np.testing.assert_array_equal(v.visible, np.array(expected) & e.slices)

    measured = []
    for p in plans:
        study = render_plan(p)
        clot = study.emboli[high] == number
        core = binary_erosion(clot)
        lumen = study.tissue[high] == int(Tissue.PA_BLOOD)
        ring = binary_dilation(clot, iterations=3) & ~binary_dilation(clot) & binary_erosion(lumen | clot)
        assert core.sum() >= 4 and ring.sum() >= 8
        measured.append(float(study.hu[high][ring].mean() - study.hu[high][core].mean()))
        pool = binary_erosion(study.tissue == int(Tissue.PA_BLOOD), iterations=3) & (study.emboli == 0)
        assert study.hu[pool].std() == pytest.approx(plan.scanner.noise_sd, rel=0.15)
    assert measured[0] == pytest.approx(scale * contrast, rel=0.25)
    assert measured[1] / measured[0] == pytest.approx(0.5, abs=0.12)


# ------------------------------------------------------------------------ labels, truth and mix


def test_a_study_whose_emboli_nobody_sees_is_negative_and_keeps_them_in_the_truth():
    """At 64 px (5-6 mm pixels) and 16 slices most drawn clots show nowhere: such an exam is negative
    (its location, chronicity and RV/LV labels 0), its emboli stay drawn and in clots.csv as not visible."""
    found = 0
    for index in range(30):
        plan = plan_study(index, seed=2, slices=16, size=64, kind="positive")
        if plan.kind == "positive" or not plan.emboli:
            continue
        found += 1
        assert not any(e.visible.any() for e in plan.emboli)
        assert plan.exam["negative_exam_for_pe"] == 1 and not plan.pe_slices.any()
        assert all(plan.exam[label] == 0 for label in EXAM_LABELS if label != "negative_exam_for_pe")
        rows = clot_rows(plan)
        assert len(rows) and (rows[VISIBLE] == 0).all() and set(rows["embolus"]) == set(range(1, len(plan.emboli) + 1))
    assert found >= 3


def test_generated_labels_pass_pedetect_check(tmp_path, cli):
    """The labels of studies with emboli visible on some slices, on none, and with none, written as a
    submission, break no rule of the challenge (``pedetect check``)."""
    write_dataset(
        tmp_path, 10, slices=16, size=96, seed=6, split="test", positive_fraction=0.8, indeterminate_fraction=0.1,
        progress=False,
    )  # fmt: skip
    truth = pd.read_csv(tmp_path / "test_labels.csv")
    clots = pd.read_csv(clots_path(tmp_path, "test"))
    assert (clots[VISIBLE] == 0).any() and (clots[VISIBLE] == 1).any()
    rows = []
    for study, frame in truth.groupby(STUDY, sort=False):
        rows += [(exam_id(study, label), float(frame[label].iloc[0])) for label in EXAM_LABELS]
    rows += list(zip(truth[SOP], truth[IMAGE_LABEL].astype(float)))
    submission = tmp_path / "truth_as_submission.csv"
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(submission, index=False)
    result = cli("check", submission, "--studies", tmp_path / "test.csv")
    assert result.exit_code == 0, result.output
    assert f"all {truth[STUDY].nunique()} studies are consistent" in result.output


def test_the_default_mix_has_subsegmental_clots_and_the_conspicuous_profile_keeps_its_own():
    assert set(EMBOLUS_LEVEL_WEIGHTS) == {"trunk", "main", "lobar", "segmental", "subsegmental"}
    assert CONSPICUOUS_LEVEL_WEIGHTS == {"trunk": 1.0, "main": 2.0, "lobar": 3.0, "segmental": 2.0}
    proximal, rank = [], {"trunk": 0, "main": 0, "lobar": 1, "segmental": 2, "subsegmental": 3}
    for index in range(120):
        plan = plan_study(index, seed=11, size=256, kind="positive")
        seen = [e for e in plan.emboli if e.visible.any()]
        assert seen and plan.kind == "positive"  # at 256 px every drawn positive is seen
        proximal.append(min(rank[e.level] for e in seen))
    share = np.bincount(proximal, minlength=4) / len(proximal)
    # docs/synthetic_visibility.md: central ≈ the drawn central_pe rate, lobar ≈ 0.41, segmental ≈ 0.32,
    # subsegmental ≈ 0.09 of the positive exams (120 studies: wide bounds).
    assert 0.07 <= share[0] <= 0.30 and 0.28 <= share[1] <= 0.55 and 0.2 <= share[2] <= 0.45
    assert 0.02 <= share[3] <= 0.2
    conspicuous = [
        plan_study(i, seed=11, size=256, slices=40, kind="positive", min_embolus_pixels=25) for i in range(30)
    ]
    assert not any(e.level == "subsegmental" for p in conspicuous for e in p.emboli)
