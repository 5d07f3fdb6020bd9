"""Clot candidates from activation maps (pedetect.infer.localise): peaks, points, outlines, sides."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pedetect.dicom.pixels import DEFAULT_WINDOWS, resize_keep_aspect, window_hu
from pedetect.infer.localise import (
    CANDIDATE_COLUMNS,
    ActivationMaps,
    LocaliseSettings,
    SliceGeometry,
    _side,
    candidate_rows,
    find_candidates,
    number_candidates,
    picture_to_image,
)
from pedetect.synth import render_study

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _blob(shape, centre, sigma, peak):
    k, i, j = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    d2 = ((k - centre[0]) / sigma[0]) ** 2 + ((i - centre[1]) / sigma[1]) ** 2 + ((j - centre[2]) / sigma[2]) ** 2
    return peak * np.exp(-0.5 * d2)


def _study(size=256, slices=12):
    """A rendered positive phantom study (its windowed slices and each slice's geometry)."""
    study = render_study(3, seed=5, size=size, slices=slices, kind="positive", min_embolus_pixels=25)
    sc = study.plan.scanner
    pictures = np.stack([window_hu(hu, DEFAULT_WINDOWS) for hu in study.hu])
    geometries = [
        SliceGeometry(sc.size, sc.size, (sc.x0, sc.y0, float(z)), IDENTITY, (sc.pixel_spacing,) * 2) for z in sc.z()
    ]
    return study, pictures, geometries


def test_peaks_become_candidates_strongest_first_with_their_place():
    _, pictures, geometries = _study(slices=12)
    shape = (12, 16, 16)
    probabilities = np.maximum(
        _blob(shape, (3, 4, 5), (1.0, 1.0, 1.0), 0.9), _blob(shape, (8, 10, 12), (1.5, 1.0, 1.0), 0.6)
    )
    region = (64, 64, 192, 192)  # the central half of a 256-px slice: 8 pixels per cell
    sops = [f"1.2.{k}" for k in range(12)]
    positions = np.arange(12, dtype=float) + 2  # two slices lost before this series' first decoded one
    found = find_candidates(
        ActivationMaps(probabilities.astype(np.float32), region),
        np.ones(12),  # every slice certain: the map alone orders the peaks
        pictures,
        geometries,
        sops,
        positions,
        series="1.2.3",
        windows=DEFAULT_WINDOWS,
        picture_offset=5,
        # the map's own point, no neighbouring defects (both below)
        settings=LocaliseSettings(defect_search=0, neighbour_reach=0),
    )
    assert [round(c.score, 3) for c in found] == [0.9, 0.6]
    first, second = found
    assert (first.sop, first.slice_index, first.picture_index) == ("1.2.3", 5, 8)
    assert (second.sop, second.slice_index) == ("1.2.8", 10)
    # The point: the cell's centre in pixels of the slice (cell i covers rows 64 + 8i ... 64 + 8i + 7).
    assert first.row == pytest.approx(64 + 8 * 4 + 3.5, abs=0.6) and first.col == pytest.approx(
        64 + 8 * 5 + 3.5, abs=0.6
    )
    assert second.row == pytest.approx(64 + 8 * 10 + 3.5, abs=0.6)
    # The region (cells at least half the peak) spans the slices where the blob is above half its peak.
    assert (first.slice_first, first.slice_last) == (2 + 2, 2 + 4)
    assert (second.slice_first, second.slice_last) == (2 + 7, 2 + 9)  # |dz| <= 1.5 * sqrt(2 ln 2)
    # The outline surrounds the point, in the image's pixel grid.
    outline = np.array(first.outline)
    assert len(outline) >= 4
    assert (
        outline[:, 0].min() < first.row < outline[:, 0].max() and outline[:, 1].min() < first.col < outline[:, 1].max()
    )
    assert np.all(np.abs(outline - [first.row, first.col]) < 16)
    # Patient coordinates: the slice's position plus the point times the pixel spacing.
    g = geometries[3]
    expected = np.array(g.position) + np.array([first.col, first.row, 0.0]) * g.pixel_spacing[0]
    np.testing.assert_allclose(first.patient_mm, expected, atol=0.01)
    # Picture fractions, what the viewer draws.
    assert first.picture_point == pytest.approx((first.row / 256, first.col / 256), abs=1e-4)


def test_nothing_above_the_minimum_score_gives_no_candidate():
    _, pictures, geometries = _study(slices=6)
    maps = ActivationMaps(np.full((6, 8, 8), 0.04, np.float32), (0, 0, 256, 256))
    assert (
        find_candidates(
            maps, np.ones(6), pictures, geometries, list("abcdef"), range(6), series="s", windows=DEFAULT_WINDOWS
        )
        == []
    )


def test_suppression_and_the_limit_per_series():
    _, pictures, geometries = _study(slices=10)
    probabilities = np.zeros((10, 16, 16), np.float32)
    for k in range(0, 10, 2):  # one peak every other slice at the same cell, stronger upwards
        probabilities[k, 8, 8] = 0.5 + 0.04 * k
    maps = ActivationMaps(probabilities, (0, 0, 256, 256))
    sops, window = [str(k) for k in range(10)], DEFAULT_WINDOWS
    certain = np.ones(10)
    # By default a peak within 1 slice and 2 cells of a stronger one is the same finding: every peak stands.
    peaks_only = LocaliseSettings(neighbour_reach=0)  # the phantom's other emboli stay out of this test
    found = find_candidates(
        maps, certain, pictures, geometries, sops, range(10), series="s", windows=window, settings=peaks_only
    )
    assert [c.slice_index for c in found] == [8, 6, 4, 2, 0]
    wider = LocaliseSettings(suppress_slices=2, neighbour_reach=0)
    found = find_candidates(
        maps, certain, pictures, geometries, sops, range(10), series="s", windows=window, settings=wider
    )
    assert [c.slice_index for c in found] == [8, 4, 0]
    limited = find_candidates(
        maps, certain, pictures, geometries, sops, range(10), series="s", windows=window,
        settings=LocaliseSettings(suppress_slices=2, max_candidates=2, neighbour_reach=0),
    )  # fmt: skip
    assert [c.slice_index for c in limited] == [8, 4]
    # The slice's probability scales the score: a peak on an unlikely slice falls below the minimum.
    doubtful = np.where(np.arange(10) == 8, 0.01, 1.0)
    unlikely = find_candidates(
        maps, doubtful, pictures, geometries, sops, range(10), series="s", windows=window, settings=wider
    )
    assert [c.slice_index for c in unlikely] == [6, 2] and unlikely[0].score == pytest.approx(0.74, abs=1e-6)
    numbered = number_candidates(found[::-1])
    assert [c.candidate for c in numbered] == [1, 2, 3] and [c.slice_index for c in numbered] == [8, 4, 0]
    rows = candidate_rows("study", [c.record() for c in numbered])
    assert (
        list(rows[0]) == list(CANDIDATE_COLUMNS)
        and rows[0]["candidate"] == 1
        and rows[0]["StudyInstanceUID"] == "study"
    )


def test_the_point_and_outline_come_from_the_filling_defect_near_the_maps_peak():
    """A map peak a few pixels off a phantom embolus (as a CNN's learnt offset puts it): the point
    moves into the embolus and the outline follows the defect; without the search it stays off."""
    study, pictures, geometries = _study(slices=40)
    sc = study.plan.scanner
    number = 1
    mask = study.emboli == number
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    rows, cols = np.nonzero(mask[k])
    box = rows.min(), rows.max(), cols.min(), cols.max()
    # One peak on slice k, in the cell 5 pixels below and left of the embolus's centre (8-pixel cells over the slice).
    probabilities = np.full((40, 32, 32), 0.2, np.float32)
    i, j = int((rows.mean() + 5) // 8), int((cols.mean() - 5) // 8)
    probabilities[k, i, j] = 0.95
    maps = ActivationMaps(probabilities, (0, 0, sc.size, sc.size))
    args = (maps, np.ones(40), pictures, geometries, [str(n) for n in range(40)], range(40))
    refined = find_candidates(*args, series="s", windows=DEFAULT_WINDOWS)[0]
    assert box[0] <= refined.row <= box[1] and box[2] <= refined.col <= box[3]
    outline = np.array(refined.outline)
    assert outline[:, 0].min() >= box[0] - 1 and outline[:, 0].max() <= box[1] + 1
    assert outline[:, 1].min() >= box[2] - 1 and outline[:, 1].max() <= box[3] + 1
    plain = find_candidates(*args, series="s", windows=DEFAULT_WINDOWS, settings=LocaliseSettings(defect_search=0))[0]
    assert not (box[0] <= plain.row <= box[1] and box[2] <= plain.col <= box[3])


@pytest.mark.parametrize("shape", [(512, 384), (300, 512), (256, 256)])
def test_picture_coordinates_map_back_to_the_image(shape):
    """A bright pixel of the DICOM image, resized as the reader resizes, maps back to where it was."""
    rows, cols = shape
    image = np.zeros((rows, cols, 3), np.uint8)
    r, c = rows // 3, 2 * cols // 3
    image[r - 2 : r + 3, c - 2 : c + 3] = 255
    picture = resize_keep_aspect(image, 256).astype(float)[:, :, 0]
    ys, xs = np.mgrid[0 : picture.shape[0], 0 : picture.shape[1]]
    y, x = (picture * ys).sum() / picture.sum(), (picture * xs).sum() / picture.sum()
    back_r, back_c = picture_to_image(np.array([y]), np.array([x]), (256, 256), shape)
    assert back_r[0] == pytest.approx(r, abs=0.6) and back_c[0] == pytest.approx(c, abs=0.6)


def test_the_side_comes_from_the_patients_own_lungs():
    """Each phantom embolus's centre on its largest slice: lobar and segmental ones on their own
    side, the trunk's central, a main artery's central or its own side (the labels call it both)."""
    outcome = Counter()
    for index in range(8):
        study = render_study(index, seed=5, size=256, slices=40, kind="positive", min_embolus_pixels=25)
        sc = study.plan.scanner
        vessels = {v.name: v for v in study.plan.vessels}
        for number, embolus in enumerate(study.plan.emboli, start=1):
            mask = study.emboli == number
            k = int(np.argmax(mask.sum(axis=(1, 2))))
            rows, cols = np.nonzero(mask[k])
            hu = study.hu[k]
            g = SliceGeometry(sc.size, sc.size, (sc.x0, sc.y0, float(sc.z()[k])), IDENTITY, (sc.pixel_spacing,) * 2)
            side = _side(g, hu, rows.mean(), cols.mean(), 20.0)
            vessel = vessels[embolus.vessel]
            truth = "central" if vessel.level == "trunk" else vessel.side
            ok = side == truth or (vessel.level == "main" and side == "central")
            outcome[ok] += 1
            # The same slice stored mirrored (columns running to the patient's right): the same side.
            mirrored = SliceGeometry(
                sc.size, sc.size, (sc.x0 + (sc.size - 1) * sc.pixel_spacing, sc.y0, 0.0), (-1.0, 0, 0, 0, 1, 0),
                (sc.pixel_spacing,) * 2,
            )  # fmt: skip
            assert _side(mirrored, hu[:, ::-1], rows.mean(), sc.size - 1 - cols.mean(), 20.0) == side
    assert outcome[True] >= 12 and outcome[False] == 0


def test_the_activation_map_is_the_slice_head_on_each_position():
    """With global max pooling, the slice logit is at least the largest position's logit when every
    head weight is positive; and embed_with_map leaves embed's numbers as they are."""
    from helpers.train import tiny_config
    from pedetect.models.slice_classifier import build_slice_classifier

    config = tiny_config()
    model = build_slice_classifier(config.cnn, load_pretrained=False, location_grid=3).eval()
    x = torch.randint(0, 256, (4, config.cnn.input.channels, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        embedding, logit = model.embed(x)
        same_embedding, same_logit, activation = model.embed_with_map(x)
        model.head.weight.abs_()
        _, positive_logit, positive_map = model.embed_with_map(x)
    assert torch.equal(embedding, same_embedding) and torch.equal(logit, same_logit)
    assert activation.shape[0] == 4 and activation.ndim == 3
    assert torch.all(positive_logit >= positive_map.amax(dim=(1, 2)) - 1e-5)


def test_a_coarse_map_over_a_noisy_slice_searches_near_its_point_only():
    """One map cell over a whole 1024-pixel slice of noise (a CNN that pools to one position): the
    defect search stays within defect_search_max pixels of the map's point, however many pieces the
    noise makes."""
    rng = np.random.default_rng(0)
    hu = rng.normal(200.0, 150.0, (1, 1024, 1024)).astype(np.float32)  # contrast and defects everywhere
    pictures = window_hu(hu[0], DEFAULT_WINDOWS)[None]
    geometry = SliceGeometry(1024, 1024, (0.0, 0.0, 0.0), IDENTITY, (0.5, 0.5))
    maps = ActivationMaps(np.full((1, 1, 1), 0.9, np.float32), (0, 0, 1024, 1024))
    found = find_candidates(maps, np.ones(1), pictures, [geometry], ["s"], [0], series="s", windows=DEFAULT_WINDOWS)
    settings = LocaliseSettings()
    limit = settings.defect_search_max
    assert abs(found[0].row - 511.5) <= limit + 1 and abs(found[0].col - 511.5) <= limit + 1
    # The noise's other "defects" near the point: at most neighbour_max of them, within the same reach.
    assert 1 < len(found) <= 1 + settings.neighbour_max
    for neighbour in found[1:]:
        assert np.hypot(neighbour.row - found[0].row, neighbour.col - found[0].col) <= limit + 1
        assert neighbour.score == pytest.approx(settings.neighbour_score * found[0].score, abs=1e-6)


def test_a_defect_in_the_neighbouring_artery_is_a_candidate_of_its_own():
    """Two opacified arteries side by side, a clot in each, one map peak over the first (a stronger
    neighbour's peak would suppress a second one): the second clot is a candidate too, scored
    neighbour_score × the peak's, on the same key slice; a third clot beyond neighbour_reach is not."""
    hu = np.full((256, 256), -800.0, np.float32)  # lung
    rows, cols = np.mgrid[0:256, 0:256]
    arteries = [(100, 100), (100, 116), (100, 160)]  # 8-pixel map cells: 2 and 7.5 cells from the first
    for r, c in arteries:
        hu[(rows - r) ** 2 + (cols - c) ** 2 <= 7**2] = 350.0  # contrast
        hu[(rows - r) ** 2 + (cols - c) ** 2 <= 3**2] = 40.0  # the clot: soft tissue inside it
    pictures = window_hu(hu, DEFAULT_WINDOWS)[None]
    geometry = SliceGeometry(256, 256, (0.0, 0.0, 0.0), IDENTITY, (0.7, 0.7))
    probabilities = np.full((1, 32, 32), 0.01, np.float32)  # below min_score: one peak
    probabilities[0, 100 // 8, 100 // 8] = 0.9
    maps = ActivationMaps(probabilities, (0, 0, 256, 256))
    args = (maps, np.ones(1), pictures, [geometry], ["key"], [3])
    found = find_candidates(*args, series="s", windows=DEFAULT_WINDOWS)
    assert [(round(c.row), round(c.col)) for c in found] == [(100, 100), (100, 116)]
    assert [c.score for c in found] == [pytest.approx(0.9), pytest.approx(0.9 * LocaliseSettings().neighbour_score)]
    assert {(c.sop, c.slice_index, c.slice_first, c.slice_last) for c in found} == {("key", 3, 3, 3)}
    assert len(found[1].outline) >= 4  # the second clot's own contour
    alone = find_candidates(*args, series="s", windows=DEFAULT_WINDOWS, settings=LocaliseSettings(neighbour_reach=0))
    assert [(round(c.row), round(c.col)) for c in alone] == [(100, 100)]
