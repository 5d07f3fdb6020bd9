"""``pedetect demo`` end to end, the one run of the whole pipeline in the suite: synthetic training
set (seed 1) → prepare → the whole ``pedetect train configs/demo.yaml`` (cnn → embed → seq → heart,
every fold) → ``pedetect predict`` on a test set of another seed stored as RLE lossless DICOM → evaluate.

Training: the cross-validated score beats the prior baseline and stage 1 alone, ``pedetect evaluate``
reproduces it from the out-of-fold predictions, the bundle is complete and records the preprocessing,
and a re-run of ``pedetect train`` redoes nothing. Prediction: every id of the test set in the sample
submission's order, ``pedetect check`` passes, the score against the prior's, a report per study.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers.processes import run_pedetect
from pedetect.demo.run import default_config, run_demo
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL
from pedetect.metric.evaluate import evaluate_files
from pedetect.metric.submission import expected_ids, read_studies
from pedetect.models.bundle import read_bundle, read_preprocessing

# Its own group: the other xdist worker runs it while the "train" group runs the stage tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]

# Score / prior-baseline score, cross-validated and on the test set, and the RV/LV >= 1 AUC on positive
# exams (cross-validated: the heart model's own and stacked with stage 2). Measured with the folds side
# by side (docs/stage2_notes.md; training is deterministic on one machine): seed 1 (this
# test) CV 0.36, test 0.12, RV/LV AUC 0.981 / 0.976; seeds 3, 5, 7 CV 0.28-0.36, test 0.19-0.35, RV/LV
# AUC 0.94-0.99. The bars leave the spread between seeds as margin (another CPU or thread count
# trains to other numbers within about that spread). A change to the demo recipe must re-measure.
MAX_CV_TO_PRIOR = 0.5
MAX_TEST_TO_PRIOR = 0.45
MIN_RV_LV_AUC = 0.9
# Clot candidates per embolus (docs/localisation.md, "Measured"): seed 1 (this test, the seed the
# localisation settings were chosen on) finds 26 of 29 emboli at 1 and 2 FP/scan, every side right.
# The bars leave the unseen seeds' spread as margin; chance is about 0.002.
MIN_SENSITIVITY_AT_1 = 0.6
MIN_SENSITIVITY_AT_2 = 0.7
MIN_SIDE_RIGHT = 0.9


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "demo", progress=False, echo=lambda message: None)


def test_demo_training_beats_both_baselines_and_resumes(demo):
    model, store, labels = demo.out / "model", demo.out / "store", demo.out / "data" / "train.csv"
    cv = json.loads((model / "heart" / "cv.json").read_text())  # stage 2 with the heart model's RV/LV
    prior, stage1 = cv["baselines"]["prior"]["score"], cv["baselines"]["stage1_alone"]["score"]
    aucs = [json.loads((model / "cnn" / f"fold{k}" / "metrics.json").read_text())["val_auc"] for k in range(3)]
    rv_lv = cv["rv_lv_auc_given_positive"]
    print(
        f"demo training: CV score {cv['score']:.4f} (consistent {cv['score_consistent']:.4f}; stage 2 alone "
        f"{cv['without_heart']['score']:.4f}), prior {prior:.4f}, stage 1 alone {stage1:.4f}; fold slice AUC "
        f"{[round(a, 3) for a in aucs]}; RV/LV >= 1 AUC on positive exams {rv_lv}"
    )
    assert cv["score"] <= MAX_CV_TO_PRIOR * prior
    assert cv["score"] < stage1
    assert cv["n_studies"] == demo.n_train
    # pedetect evaluate reproduces the score from the out-of-fold predictions.
    assert evaluate_files(labels, model / "heart" / "oof_predictions.csv")["score"] == pytest.approx(
        cv["score"], abs=1e-9
    )
    assert cv["score"] < cv["without_heart"]["score"]
    assert rv_lv["stacked"] >= MIN_RV_LV_AUC and rv_lv["heart_model"] >= MIN_RV_LV_AUC
    bundle = read_bundle(model)
    assert bundle.folds == [0, 1, 2]
    assert json.loads((model / "bundle.json").read_text())["stages"] == ["cnn", "embed", "seq", "heart"]
    # The bundle records how prepare read the DICOM, so predict needs no store and no flags.
    preprocessing = read_preprocessing(model)
    assert preprocessing["recorded"] is True
    assert preprocessing["windows"] == [list(w) for w in json.loads((store / "prepare.json").read_text())["windows"]]

    # The same training through the CLI finds every part finished and redoes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in model.rglob("*") if p.is_file() and p.parent.name.startswith("fold")}
    again = run_pedetect(
        "train",
        default_config(),
        "--store",
        store,
        "--labels",
        labels,
        "--out",
        model,
        "--set",
        "logging.progress_bar=false",
        timeout=300,
    )
    assert again.stderr.count("already complete") == 12  # 3 folds × (cnn, embed, seq, heart)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_demo_predicts_a_compressed_test_set_of_another_seed(demo, cli):
    data = demo.out / "data"
    submission = demo.out / "submission.csv"

    # Every id of the test set, in the sample submission's order, nothing else.
    written = pd.read_csv(submission)["id"].tolist()
    assert written == pd.read_csv(data / "sample_submission.csv")["id"].tolist()
    assert set(written) == set(expected_ids(read_studies(data / "test.csv")))
    check = cli("check", submission, "--studies", data / "test.csv")
    assert check.exit_code == 0, check.output

    score, prior = demo.evaluation["score"], demo.prior_evaluation["score"]
    print(
        f"demo: test score {score:.4f}, prior {prior:.4f}, ratio {score / prior:.3f}, "
        f"slice AUC {demo.evaluation['slice_auc']:.3f}; {demo.seconds}"
    )
    assert score <= MAX_TEST_TO_PRIOR * prior
    assert demo.evaluation["n_studies"] == demo.n_test and demo.predict_summary.ok

    table = demo.table()
    assert "ratio" in table and "report:" in table
    assert all(label in table for label in (IMAGE_LABEL, *EXAM_LABELS))
    assert (demo.out / "report" / "index.html").is_file()
    assert len(list((demo.out / "report").glob("*.png"))) == demo.n_test


def test_demo_candidates_find_the_emboli_and_change_no_prediction(demo, tmp_path):
    """The clot candidates of the demo's test set against the phantom's emboli (docs/localisation.md):
    far above chance (a random point on a 256-pixel slice lands within 3 pixels of a 6-pixel box once
    in 500), on the right side; and predicting without them writes the same submission."""
    from pedetect.infer.localise import CANDIDATE_COLUMNS
    from pedetect.infer.predict import predict

    froc = demo.localisation
    candidates = pd.read_csv(demo.out / "clots.csv")
    print(
        f"demo: candidates {len(candidates)}, emboli {froc['emboli']}, sensitivity {froc['sensitivity']}, "
        f"side {froc['side_agreement']['2']}"
    )
    assert list(candidates.columns) == list(CANDIDATE_COLUMNS)
    assert froc["emboli"] > 10 and froc["scans"] == demo.n_test
    assert froc["sensitivity"]["1"] >= MIN_SENSITIVITY_AT_1 and froc["sensitivity"]["2"] >= MIN_SENSITIVITY_AT_2
    assert froc["side_agreement"]["2"]["fraction"] >= MIN_SIDE_RIGHT
    assert "clot candidates:" in demo.table()
    # The report carries them per study, in the viewer's coordinates too.
    records = [json.loads(p.read_text()) for p in (demo.out / "report").glob("*.json")]
    assert sum(len(r["candidates"]) for r in records) == len(candidates)
    # The exam outputs and slice probabilities do not depend on localisation.
    plain = predict(
        demo.out / "data" / "test",
        [demo.out / "model"],
        tmp_path / "submission.csv",
        sample=demo.out / "data" / "sample_submission.csv",
        progress=False,
        echo=lambda message: None,
        localise=False,
    )
    assert plain.ok
    assert (tmp_path / "submission.csv").read_bytes() == (demo.out / "submission.csv").read_bytes()
