"""The heart model: localisation from Hounsfield units against the phantom's own heart, the crop,
the stacker and its label rules, the heart stage of training, and predict with a heart bundle."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from pedetect.data.heart_box import HeartBox, estimate_hu, heart_crop, locate_heart, series_heart_crop
from pedetect.dicom.pixels import window_hu
from pedetect.labels import EXAM_LABELS, RV_LV_LABELS, STUDY
from pedetect.models.heart import GTE, LT, HeartStack
from pedetect.synth.anatomy import ANATOMY_HEIGHT, Tissue, heart_scale
from pedetect.synth.render import render_study

WINDOWS = [(-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0)]  # the store's default (lung, PE, mediastinal)


def ventricles(study) -> tuple[int, list[np.ndarray]]:
    """The slice where the phantom's ventricles are widest and each ventricle's blood pool on it
    (the connected region of right-heart or left-heart blood around the ventricle's centre)."""
    an, grid = study.plan.anatomy, study.plan.grid
    th = an.heart_angle
    along, across = np.array([np.cos(th), np.sin(th)]), np.array([np.sin(th), -np.cos(th)])
    centre = np.array(an.heart_centre)
    lv = centre - across * (an.septum / 2 + an.w_lv / 2) + along * 8.0  # as synth/render.py paints them
    rv = centre + across * (an.septum / 2 + an.w_rv / 2) - along * 6.0
    k = int(np.argmax(heart_scale(grid.zs / ANATOMY_HEIGHT)))
    pools = []
    for c, tissue in ((rv, Tissue.PA_BLOOD), (lv, Tissue.SYS_BLOOD)):
        row, col = int(np.argmin(abs(grid.ys - c[1]))), int(np.argmin(abs(grid.xs - c[0])))
        labels, _ = ndimage.label(study.tissue[k] == tissue)
        assert labels[row, col] > 0, "the ventricle's centre is not blood: the test's geometry is out of date"
        pools.append(labels == labels[row, col])
    return k, pools


@pytest.mark.parametrize("index", range(8))
def test_heart_box_holds_both_ventricles_where_they_are_largest(index):
    study = render_study(index, seed=31, slices=40, size=256, positive_fraction=0.5)
    hu = estimate_hu(window_hu(study.hu, WINDOWS), WINDOWS)
    box = locate_heart(hu)
    k, pools = ventricles(study)
    assert box.found
    assert box.z0 <= k < box.z1
    for pool in pools:
        rows, cols = np.nonzero(pool)
        assert box.y0 <= rows.min() and rows.max() < box.y1 and box.x0 <= cols.min() and cols.max() < box.x1, (
            box,
            rows.min(),
            rows.max(),
            cols.min(),
            cols.max(),
        )
    # A box around the heart, not around the chest: under 60 % of the side (the heart is ~130 mm of a ~350 mm field).
    assert box.y1 - box.y0 < 0.6 * 256 and box.z1 - box.z0 < 0.6 * 40


def test_estimate_hu_takes_the_narrowest_unclipped_window():
    hu = np.array([[[-1000.0, -300.0, 45.0, 300.0, 2000.0]]], dtype=np.float32)
    estimate = estimate_hu(window_hu(hu, WINDOWS), WINDOWS)[0, 0]
    # -1000 and -300: only the lung window holds them (5.9 HU steps); 45: the mediastinal (1.6 HU steps);
    # 300: the PE window (2.7 HU steps); 2000: clipped everywhere, at the highest top (the PE window's 450).
    for value, truth, step in zip(estimate[:4], hu[0, 0, :4], (5.9, 5.9, 1.6, 2.75)):
        assert value == pytest.approx(truth, abs=step)
    assert estimate[4] == pytest.approx(450.0, abs=1e-3)


def test_an_unenhanced_series_gets_the_cavity_centre_and_says_so():
    study = render_study(2, seed=31, slices=40, size=256, positive_fraction=0.5)
    hu = study.hu.copy()
    blood = np.isin(study.tissue, [int(Tissue.PA_BLOOD), int(Tissue.SYS_BLOOD), int(Tissue.SVC_BLOOD)])
    hu[blood] = 40.0  # no contrast: blood as soft tissue
    box = locate_heart(estimate_hu(window_hu(hu, WINDOWS), WINDOWS))
    assert not box.found
    assert 0 <= box.y0 < box.y1 <= 256 and 0 <= box.x0 < box.x1 <= 256 and 0 <= box.z0 < box.z1 <= 40
    crop = heart_crop(hu, box, depth=8, size=32, window=(50, 350))
    assert crop.shape == (8, 32, 32) and crop.dtype == np.uint8


def test_heart_crop_resamples_the_box_in_the_window():
    hu = np.full((10, 40, 40), -1000.0, dtype=np.float32)
    hu[2:8, 10:30, 10:30] = 225.0  # the window's top (L50/W350: -125 ... 225)
    crop = heart_crop(hu, HeartBox(2, 8, 10, 30, 10, 30, True), depth=4, size=16, window=(50, 350))
    assert crop.shape == (4, 16, 16) and (crop == 255).all()
    crop = heart_crop(hu, HeartBox(0, 10, 0, 40, 0, 40, True), depth=10, size=40, window=(50, 350))
    assert crop[0].max() == 0 and crop[5, 20, 20] == 255 and crop[5, 0, 0] == 0


def test_series_heart_crop_of_windowed_slices_matches_the_hu_path():
    study = render_study(4, seed=31, slices=40, size=256, positive_fraction=0.5)
    volume = window_hu(study.hu, WINDOWS)
    crop, box = series_heart_crop(volume, WINDOWS, depth=16, size=64, window=(50, 350))
    direct = heart_crop(study.hu, box, depth=16, size=64, window=(50, 350))
    assert crop.shape == (16, 64, 64)
    # The windowed slices lose < 2 HU in L50/W350 (1.5 HU per grey level): within 2 grey levels.
    assert np.abs(crop.astype(int) - direct.astype(int)).max() <= 2


# -------------------------------------------------------------------------------------------- stacker


def exam_rows(positive: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Exam probabilities with P(positive) ``positive`` split into RV/LV by ``given``."""
    exam = np.full((len(positive), len(EXAM_LABELS)), 0.1)
    exam[:, GTE], exam[:, LT] = positive * given, positive * (1 - given)
    return exam


def test_stacker_recovers_the_weights_that_made_the_labels():
    rng = np.random.default_rng(0)
    n = 4000
    given = rng.uniform(0.05, 0.95, n)
    heart = rng.normal(0, 2, n)
    z = 0.5 * np.log(given / (1 - given)) + 1.5 * heart - 0.3
    target = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    stack = HeartStack.fit(exam_rows(np.full(n, 0.8), given), heart, target, l2=0.0)
    assert (stack.a, stack.b, stack.c) == pytest.approx((0.5, 1.5, -0.3), abs=0.15)


def test_stacker_keeps_p_positive_and_the_rules():
    rng = np.random.default_rng(1)
    positive, given = rng.uniform(0.01, 0.99, 50), rng.uniform(0.01, 0.99, 50)
    exam = exam_rows(positive, given)
    stacked = HeartStack(a=0.7, b=1.3, c=0.2).apply(exam, rng.normal(0, 3, 50))
    np.testing.assert_allclose(stacked[:, GTE] + stacked[:, LT], positive, rtol=1e-9)
    other = [i for i in range(len(EXAM_LABELS)) if i not in (GTE, LT)]
    np.testing.assert_array_equal(stacked[:, other], exam[:, other])
    assert not np.allclose(stacked[:, GTE], exam[:, GTE])
    # One class only: nothing to fit, stage 2's own split.
    same = HeartStack.fit(exam, rng.normal(size=50), np.ones(50))
    np.testing.assert_allclose(same.apply(exam, 0.0), exam)


def test_stacker_file_must_hold_finite_numbers(tmp_path):
    path = tmp_path / "stack.json"
    HeartStack(0.5, 1.0, -0.2).save(path, note="x")
    assert HeartStack.load(path) == HeartStack(0.5, 1.0, -0.2)
    path.write_text(json.dumps({"a": 1.0, "b": "NaN", "c": 0.0}))
    with pytest.raises(ValueError, match="b is 'NaN'"):
        HeartStack.load(path)


# ------------------------------------------------------------------------------------ training, predict


def test_heart_stage_trains_stacks_and_scores(trained_model, trained_copy):
    """The heart stage on the session's trained model (FakeStore, 12 studies of which 6 positive):
    folds, out-of-fold logits, the stacker, heart/cv.json, and a bundle predict can load."""
    from pedetect.models.bundle import read_bundle
    from pedetect.models.layout import HEART_STACK_FILE, heart_dir, stage_root
    from pedetect.recipe import apply_overrides
    from pedetect.train.pipeline import train

    labels = trained_model.labels.copy()
    positive_studies = sorted(labels.loc[labels.negative_exam_for_pe == 0, STUDY].unique())
    gte = set(positive_studies[::2])  # both RV/LV classes among the positives
    labels[RV_LV_LABELS[0]] = labels[STUDY].isin(gte).astype(int) * (labels.negative_exam_for_pe == 0)
    labels[RV_LV_LABELS[1]] = (labels.negative_exam_for_pe == 0).astype(int) - labels[RV_LV_LABELS[0]]
    config = apply_overrides(
        trained_model.config, ["heart={depth: 4, size: 16, widths: [4, 8], epochs: 2, batch_size: 2}"]
    )
    messages: list[str] = []
    result = train(
        config, stage="heart", store=trained_model.store, labels=labels, out=trained_copy, echo=messages.append
    )
    cv = result["heart"]
    assert cv is not None and np.isfinite(cv["score"])
    assert set(cv["folds"]) == {"0", "1", "2"}
    assert (stage_root(trained_copy, "heart") / HEART_STACK_FILE).is_file()
    oof = pd.read_csv(stage_root(trained_copy, "heart") / "oof_predictions.csv")
    seq_oof = pd.read_csv(stage_root(trained_copy, "seq") / "oof_predictions.csv")
    merged = oof.merge(seq_oof, on="id", suffixes=("", "_seq"))
    assert len(merged) == len(seq_oof)
    rv_lv = merged["id"].str.endswith(RV_LV_LABELS[0]) | merged["id"].str.endswith(RV_LV_LABELS[1])
    np.testing.assert_allclose(merged.loc[~rv_lv, "label"], merged.loc[~rv_lv, "label_seq"])  # only RV/LV re-split
    for k in range(3):
        assert (heart_dir(trained_copy, k) / "model.safetensors").is_file()
    # A second run finds every fold complete and retrains nothing.
    messages.clear()
    train(config, stage="heart", store=trained_model.store, labels=labels, out=trained_copy, echo=messages.append)
    assert sum("already complete" in m for m in messages) == 3
    from pedetect.models.bundle import write_bundle_info

    write_bundle_info(
        trained_copy, folds=[0, 1, 2], embedding_dim=None, cv_score=cv["score"], stages=["cnn", "embed", "seq", "heart"]
    )
    bundle = read_bundle(trained_copy)
    assert bundle.config.heart is not None
    (heart_dir(trained_copy, 1) / "model.safetensors").unlink()
    from pedetect.models.bundle import BundleError

    with pytest.raises(BundleError, match="heart"):
        read_bundle(trained_copy)


def test_heart_stage_without_a_heart_section_is_refused(trained_model, trained_copy):
    from pedetect.train.heart import HeartTrainError
    from pedetect.train.pipeline import train

    with pytest.raises(HeartTrainError, match="no heart section"):
        train(
            trained_model.config,
            stage="heart",
            store=trained_model.store,
            labels=trained_model.labels,
            out=trained_copy,
        )


def test_predict_with_a_heart_bundle_re_splits_rv_lv_only(tmp_path):
    """The same random CNN and head with and without a heart model, on the same series: every exam
    output but the two RV/LV labels is identical, and so is their sum (P(positive)); ``predict``
    with the heart bundle writes a consistent submission."""
    from helpers.train import tiny_config
    from pedetect.infer.ensemble import Ensemble
    from pedetect.infer.predict import predict
    from pedetect.metric.consistency import find_violations
    from pedetect.metric.submission import align, read_studies, read_submission
    from pedetect.recipe import apply_overrides
    from pedetect.synth import write_dataset
    from pedetect.testing import write_random_bundle

    plain = tiny_config("seq.exam_structure=conditional")
    with_heart = apply_overrides(plain, ["heart={depth: 8, size: 32, widths: [4, 8]}"])
    bundles = {
        name: write_random_bundle(config, tmp_path / name, folds=2)
        for name, config in (("plain", plain), ("heart", with_heart))
    }
    exams = {}
    for name, bundle in bundles.items():
        ensemble = Ensemble([bundle])
        outputs = []
        for index in range(3):
            study = render_study(index, seed=9, slices=24, size=128, kind="positive")
            outputs.append(
                ensemble.predict_series({ensemble.reads[0]: window_hu(study.hu, ensemble.reads[0][0])}).exams
            )
        exams[name] = np.array(outputs)
    other = [i for i in range(len(EXAM_LABELS)) if i not in (GTE, LT)]
    np.testing.assert_allclose(exams["heart"][:, other], exams["plain"][:, other], rtol=1e-6)
    np.testing.assert_allclose(
        exams["heart"][:, GTE] + exams["heart"][:, LT], exams["plain"][:, GTE] + exams["plain"][:, LT], rtol=1e-5
    )
    assert np.abs(exams["heart"][:, GTE] - exams["plain"][:, GTE]).max() > 1e-3

    labels = write_dataset(tmp_path / "data", 2, slices=24, size=128, seed=9, split="test", progress=False)
    out = tmp_path / "heart.csv"
    predict(tmp_path / "data" / "test", [bundles["heart"]], out, progress=False, echo=lambda m: None)
    frame = read_submission(out)
    assert find_violations(align(frame, read_studies(tmp_path / "data" / "test.csv"), out)) == []
    assert len(frame) == len(labels) + 9 * labels[STUDY].nunique()


def test_both_kinds_of_heart_model_give_one_logit_per_crop():
    import torch

    from pedetect.models.heart import HeartCNN

    crops = np.random.default_rng(0).integers(0, 256, (3, 8, 32, 32), dtype=np.uint8)
    for kind, first in (("2.5d", (4, 8, 3, 3)), ("3d", (4, 1, 3, 3, 3))):
        model = HeartCNN(8, widths=(4, 8), kind=kind)
        assert tuple(model.stages[0][0][0].weight.shape) == first
        logits = model.predict(crops)
        assert logits.shape == (3,) and np.isfinite(logits).all()
        model.train()
        model(torch.from_numpy(crops).float()[:, None] / 255).sum().backward()  # trainable end to end
    with pytest.raises(ValueError, match="2.5d"):
        HeartCNN(8, kind="4d")


def test_a_changed_heart_section_removes_only_the_heart_stage(tmp_path):
    from pedetect.recipe import ExperimentConfig, apply_overrides
    from pedetect.train.setup import prepare_model_dir

    base = apply_overrides(ExperimentConfig(), ["heart={depth: 8}"])
    prepare_model_dir(base, tmp_path, force=False, echo=lambda m: None)
    for name in ("cnn/fold0", "embed/fold0", "seq/fold0", "heart/fold0"):
        (tmp_path / name).mkdir(parents=True)
    said: list[str] = []
    prepare_model_dir(apply_overrides(base, ["heart.epochs=3"]), tmp_path, force=False, echo=said.append)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cnn", "embed", "seq"]
    assert "heart config changed (heart.epochs)" in said[0]
    (tmp_path / "heart/fold0").mkdir(parents=True)
    prepare_model_dir(
        apply_overrides(base, ["heart.epochs=3", "seq.hidden=8"]), tmp_path, force=False, echo=said.append
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cnn", "embed"]  # the stacker stacks on stage 2


def test_heart_crops_in_worker_processes_equal_the_serial_ones(tmp_path):
    """The heart stage finds the hearts of a real slice store in spawned processes (the embedding
    pass's reader processes plus one): the same crops and boxes, in the same order, as in this process."""
    from pedetect.store import prepare
    from pedetect.store.reader import SliceStore
    from pedetect.synth import write_dataset
    from pedetect.train.heart import _crops_of

    write_dataset(tmp_path / "data", 5, slices=24, size=128, seed=13, positive_fraction=0.5, progress=False)
    prepare(tmp_path / "data" / "train", tmp_path / "store", workers=1, progress=False, echo=lambda m: None)
    store = SliceStore(tmp_path / "store")
    settings = {"depth": 8, "size": 32, "window": [50.0, 350.0], "store_windows": store.settings["windows"]}
    serial = list(_crops_of(store, store.series_uids, settings, 0))
    spawned = list(_crops_of(store, store.series_uids, settings, 2))
    assert len(serial) == len(spawned) == 5
    for (crop_a, box_a), (crop_b, box_b) in zip(serial, spawned):
        np.testing.assert_array_equal(crop_a, crop_b)
        assert box_a == box_b and box_a.found
