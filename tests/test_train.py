"""The real chain: synthetic DICOM → pedetect prepare → pedetect train --stage cnn (CLI).

- the demo recipe learns: validation slice AUC on studies of another seed;
- DDP with two CPU processes (gloo): every validation slice counted once, one bundle written;
- a run killed with SIGKILL resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from train_fixtures import DEMO_CHAIN, synthetic_chain

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# Issue #4's bar. Measured with configs/demo.yaml on these studies (2 CPU cores): 0.888, 0.950, 0.998
# after epochs 1-3 (128 s), and 0.982 / 0.985 / 0.981 per fold in pedetect demo (docs/stage1_notes.md).
DEMO_MIN_AUC = 0.90


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return synthetic_chain(tmp_path_factory.mktemp("chain"), **DEMO_CHAIN)


def train_args(store, labels, folds, out, *overrides):
    args = [sys.executable, "-m", "pedetect", "train", str(DEMO), "--store", str(store), "--labels", str(labels)]
    args += ["--folds", str(folds), "--out", str(out), "--stage", "cnn", "--fold", "0", "--set", "logging.progress_bar=false"]
    for item in overrides:
        args += ["--set", item]
    return args


def run(args, timeout=600):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_demo_recipe_learns_on_synthetic_studies(chain, tmp_path):
    store, labels, folds = chain
    out = tmp_path / "model"
    started = time.perf_counter()
    result = run(train_args(store, labels, folds, out))
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "cnn" / "fold0" / "metrics.json").read_text())
    print(f"demo fold 0: AUC {metrics['val_auc']:.4f}, {seconds:.0f} s, epochs {metrics['epochs']}")
    assert metrics["val_studies"] == 30 and metrics["train_studies"] == 120  # validation: the other seed only
    assert metrics["val_auc"] >= DEMO_MIN_AUC
    assert "validation slice AUC" in result.stdout
    for name in ("model.safetensors", "metrics.json", "metrics.csv", "curves.png", "COMPLETE"):
        assert (out / "cnn" / "fold0" / name).is_file()
    assert (out / "config.yaml").is_file() and (out / "folds.csv").is_file()


def test_ddp_with_two_cpu_processes(chain, tmp_path):
    store, labels, folds = chain
    out = tmp_path / "ddp"
    ddp = ["runtime.accelerator=cpu", "runtime.devices=2", "runtime.strategy=ddp", "cnn.epochs=1",
           "cnn.sampling.samples_per_epoch=256", "data.num_workers=0"]
    run(train_args(store, labels, folds, out, *ddp))
    metrics = json.loads((out / "cnn" / "fold0" / "metrics.json").read_text())
    n_val = int((pd.read_csv(folds)["fold"] == 0).sum()) * 40
    assert metrics["devices"] == 2
    assert metrics["epochs"][0]["val_slices"] == n_val  # gathered from both processes, none twice
    assert 0.0 <= metrics["val_auc"] <= 1.0


def test_resume_after_sigkill(chain, tmp_path):
    store, labels, folds = chain
    out = tmp_path / "killed"
    args = train_args(store, labels, folds, out, "cnn.epochs=3", "cnn.sampling.samples_per_epoch=320", "data.num_workers=0")
    last = out / "cnn" / "fold0" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.exists(), "no checkpoint before the deadline"
        os.killpg(process.pid, signal.SIGKILL)  # the whole session: no graceful shutdown
    finally:
        process.wait()
    assert not (out / "cnn" / "fold0" / "COMPLETE").exists()
    run(args)
    metrics = json.loads((out / "cnn" / "fold0" / "metrics.json").read_text())
    assert metrics["resumed_after_epoch"] is not None and metrics["resumed_after_epoch"] < 2
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
