"""The whole ``pedetect train configs/demo.yaml`` (cnn → embed → seq, every fold) on synthetic studies,
through the CLI: the cross-validated score beats both baselines, the bundle is complete, and a re-run
skips everything."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pedetect.metric.evaluate import evaluate_files
from pedetect.models.bundle import read_bundle, read_preprocessing
from train_fixtures import demo_chain

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def run(args, timeout=900):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_full_training_of_the_demo_recipe(tmp_path):
    store, labels, _ = demo_chain(tmp_path / "chain")
    out = tmp_path / "model"
    # No --folds and no --stage: the demo's own 3 folds, all three stages.
    args = [sys.executable, "-m", "pedetect", "train", str(DEMO), "--store", str(store), "--labels", str(labels),
            "--out", str(out), "--set", "logging.progress_bar=false"]
    started = time.perf_counter()
    result = run(args)
    seconds = time.perf_counter() - started
    cv = json.loads((out / "seq" / "cv.json").read_text())
    prior, stage1 = cv["baselines"]["prior"]["score"], cv["baselines"]["stage1_alone"]["score"]
    print(f"demo, all stages: CV score {cv['score']:.4f} (consistent {cv['score_consistent']:.4f}), "
          f"prior {prior:.4f}, stage 1 alone {stage1:.4f}; {seconds:.0f} s; {result.stderr.splitlines()[-1]}")
    # Issue #5 asks for a score at most 0.6 × the prior's. Not reached yet: measured 0.380 against a
    # prior of 0.413 and stage 1 alone 0.405, because the demo CNN does not tell positive studies from
    # negative ones (AUC of the series' highest slice logit: 0.47; its slice AUC of 0.85 comes from
    # where emboli lie along the series, not from seeing them). Stage 2 cannot add what its input
    # lacks; the ratio is asserted once stage 1 detects emboli. What holds now:
    assert cv["score"] < prior
    assert cv["score"] < stage1
    assert cv["n_studies"] == 150
    assert "cross-validated score" in result.stdout
    # pedetect evaluate reproduces the score from the out-of-fold predictions.
    assert evaluate_files(labels, out / "seq" / "oof_predictions.csv")["score"] == pytest.approx(cv["score"], abs=1e-9)
    bundle = read_bundle(out)
    assert bundle.folds == [0, 1, 2]
    assert json.loads((out / "bundle.json").read_text())["stages"] == ["cnn", "embed", "seq"]
    # The bundle records how prepare read the DICOM, so predict needs no store and no flags.
    preprocessing = read_preprocessing(out)
    assert preprocessing["recorded"] is True
    assert preprocessing["windows"] == [list(w) for w in json.loads((store / "prepare.json").read_text())["windows"]]

    # A re-run finds every part finished and redoes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name.startswith("fold")}
    again = run(args)
    assert again.stderr.count("already complete") == 9  # 3 folds × (cnn, embed, seq)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
