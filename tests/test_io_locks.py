"""Two runs into one output: ``pedetect export`` and ``pedetect predict`` hold locks
(:func:`pedetect.io.folder_lock`, as prepare and train do): export on MODEL_DIR (or, with ``--out``,
on the copy), predict on its submission (a lock file beside it) and on its ``--report`` and
``--dicom-out`` folders. Real processes, made deterministic with signals as in
tests/test_io_faults.py: the first is frozen (SIGSTOP) once it holds its locks, the second
must refuse (exit 2, naming the holder) without touching anything, then the first is let go and
must finish exactly as a run alone does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from helpers.processes import run, start, wait_for_lock
from helpers.train import tiny_config
from pedetect.io import LOCK_FILE

SIZE, SLICES = 48, 8


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result: subprocess.CompletedProcess, what: Path, lock: Path, pid: int, command: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"{what} is in use by another pedetect run: pid {pid} on host {socket.gethostname()} ({command})"
        in result.stderr
    )
    assert f"holds {lock}" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from pedetect.testing import write_random_bundle

    root = tmp_path_factory.mktemp("locks")
    assert (
        run(
            "synth", root / "synth", "-n", 2, "--slices", SLICES, "--size", SIZE, "--seed", 6, "--no-progress"
        ).returncode
        == 0
    )
    assert run("prepare", root / "synth" / "train", "--out", root / "store", "--no-progress").returncode == 0
    bundle = write_random_bundle(
        tiny_config(),
        root / "bundle",
        folds=1,
        store_settings={"windows": [[-600, 1500], [100, 700], [40, 400]], "image_size": SIZE},
    )
    return {"dicom": root / "synth" / "train", "store": root / "store", "bundle": bundle}


def predict_args(inputs: dict[str, Path], out: Path, report: Path) -> list:
    return [
        "predict",
        inputs["dicom"],
        "--model",
        inputs["bundle"],
        "--out",
        out,
        "--report",
        report,
        "--no-progress",
        "--device",
        "cpu",
    ]


def test_a_second_predict_into_the_same_submission_or_report_refuses_and_the_first_finishes_intact(inputs, tmp_path):
    alone = tmp_path / "alone"
    assert run(*predict_args(inputs, alone / "sub.csv", alone / "report")).returncode == 0
    out, report, log = tmp_path / "sub.csv", tmp_path / "report", tmp_path / "first.log"
    first = start(*predict_args(inputs, out, report), log=log)
    record = wait_for_lock(report, first, log, timeout=180)  # taken after the submission's lock: both are held
    assert record["command"] == "pedetect predict"
    os.kill(first.pid, signal.SIGSTOP)
    try:
        before = files(tmp_path)
        same_out = run(*predict_args(inputs, out, tmp_path / "other_report"))
        same_report = run(*predict_args(inputs, tmp_path / "other.csv", report))
        after = files(tmp_path)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    refused(same_out, out, tmp_path / f".sub.csv.{LOCK_FILE}", first.pid, "pedetect predict")
    refused(same_report, report, report / LOCK_FILE, first.pid, "pedetect predict")
    assert after == before and not (tmp_path / "other_report").exists() and not (tmp_path / "other.csv").exists()
    first.wait(timeout=600)
    assert first.returncode == 0, log.read_text()[-3000:]
    assert out.read_bytes() == (alone / "sub.csv").read_bytes()
    assert sorted(files(report)) == sorted(files(alone / "report"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(LOCK_FILE) and "alone" not in p.parts]


def export_args(inputs: dict[str, Path], model: Path, *extra) -> list:
    return ["export", model, "--store", inputs["store"], "--check-series", 2, *extra]


def test_a_second_export_into_the_same_model_folder_or_copy_refuses_and_the_first_finishes(inputs, tmp_path):
    import shutil

    from pedetect.models.bundle import read_bundle

    model = tmp_path / "model"
    shutil.copytree(inputs["bundle"], model)
    log = tmp_path / "first.log"
    first = start(*export_args(inputs, model), log=log)
    record = wait_for_lock(model, first, log, timeout=180)
    assert record["command"] == "pedetect export"
    os.kill(first.pid, signal.SIGSTOP)
    try:
        before = files(model)
        second = run(*export_args(inputs, model))
        after = files(model)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    refused(second, model, model / LOCK_FILE, first.pid, "pedetect export")
    assert after == before
    first.wait(timeout=600)
    assert first.returncode == 0, log.read_text()[-3000:]
    export = json.loads((model / "onnx" / "export.json").read_text())
    assert export["folds"] and not (model / LOCK_FILE).exists()
    read_bundle(model)

    # --out: the copy is the output (locked beside it, so the copy still starts into an empty folder).
    copy, log = tmp_path / "copy", tmp_path / "first_copy.log"
    first = start(*export_args(inputs, model, "--out", copy), log=log)
    lock = tmp_path / f".copy.{LOCK_FILE}"
    wait_for_lock(tmp_path, first, log, timeout=180, name=lock.name)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run(*export_args(inputs, model, "--out", copy))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    refused(second, copy, lock, first.pid, "pedetect export")
    first.wait(timeout=600)
    assert first.returncode == 0, log.read_text()[-3000:]
    assert (copy / "onnx" / "export.json").exists() and not lock.exists()
    read_bundle(copy)
