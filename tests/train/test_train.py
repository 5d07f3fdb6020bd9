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
import time

import pandas as pd
import pytest

from helpers.processes import ROOT, pedetect_command, run_pedetect
from helpers.train import DEMO_CHAIN, fold_slice_auc, synthetic_chain
from pedetect.demo.run import default_config
from pedetect.store import SliceStore

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

# Measured with configs/demo.yaml on these studies (2 CPU cores): 0.888, 0.950, 0.998 after epochs 1-3
# (128 s), and 0.982 / 0.985 / 0.981 per fold in pedetect demo (docs/stage1_notes.md); the recipe trains a
# fourth epoch (docs/stage2_notes.md, "2026-12-01 — epochs of stage 1: four instead of three").
DEMO_MIN_AUC = 0.90


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return synthetic_chain(tmp_path_factory.mktemp("chain"), **DEMO_CHAIN)


def train_args(store, labels, folds, out, *overrides) -> list:
    """``pedetect train`` of the demo recipe's fold 0, stage 1 only, with ``--set`` overrides."""
    args = [
        "train",
        default_config(),
        "--store",
        store,
        "--labels",
        labels,
        "--folds",
        folds,
        "--out",
        out,
        "--stage",
        "cnn",
        "--fold",
        "0",
        "--set",
        "logging.progress_bar=false",
    ]
    for item in overrides:
        args += ["--set", item]
    return args


def test_demo_recipe_learns_on_synthetic_studies(chain, tmp_path):
    store, labels, folds = chain
    out = tmp_path / "model"
    started = time.perf_counter()
    result = run_pedetect(*train_args(store, labels, folds, out))
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
    ddp = [
        "runtime.accelerator=cpu",
        "runtime.devices=2",
        "runtime.strategy=ddp",
        "cnn.epochs=1",
        "cnn.sampling.samples_per_epoch=256",
        "data.num_workers=0",
    ]
    run_pedetect(*train_args(store, labels, folds, out, *ddp))
    metrics = json.loads((out / "cnn" / "fold0" / "metrics.json").read_text())
    n_val = int((pd.read_csv(folds)["fold"] == 0).sum()) * 40
    assert metrics["devices"] == 2
    assert metrics["epochs"][0]["val_slices"] == n_val  # gathered from both processes, none twice
    # ... each prediction with its own slice's label: the AUC is the exported model's, computed here in
    # one process. Measured 0.5894 vs 0.5893 (near-ties of this barely trained model fall the other way
    # in other batches); predictions gathered against the wrong slices' labels would score about 0.5.
    single = fold_slice_auc(out, 0, SliceStore(store), pd.read_csv(labels))
    print(f"DDP fold 0: AUC {metrics['val_auc']:.4f}, one process {single:.4f}")
    assert metrics["val_auc"] == pytest.approx(single, abs=5e-3)


def test_resume_after_sigkill(chain, tmp_path):
    store, labels, folds = chain
    out = tmp_path / "killed"
    args = train_args(
        store, labels, folds, out, "cnn.epochs=3", "cnn.sampling.samples_per_epoch=320", "data.num_workers=0"
    )
    last = out / "cnn" / "fold0" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        pedetect_command(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.exists(), "no checkpoint before the deadline"
        os.killpg(process.pid, signal.SIGKILL)  # the whole session: no graceful shutdown
    finally:
        process.wait()
    assert not (out / "cnn" / "fold0" / "COMPLETE").exists()
    run_pedetect(*args)
    metrics = json.loads((out / "cnn" / "fold0" / "metrics.json").read_text())
    assert metrics["resumed_after_epoch"] in (0, 1)  # killed after epoch 0 or 1 was saved, before the end
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
