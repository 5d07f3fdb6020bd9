"""Concurrency and faults: two runs into one folder, a lock left by a dead run, a full
disk during prepare and predict. Every run here is a real ``pedetect`` process; nothing is mocked.

Two runs at once are made deterministic with signals: the first is frozen (SIGSTOP) as soon as it
holds its lock, the second runs and must refuse, then the first is let go (SIGCONT) and must finish
exactly as a run alone does. A run killed (SIGKILL) while holding its lock leaves a stale lock file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from helpers.processes import ROOT, pedetect_command, run, start, wait_for_lock
from helpers.train import tiny_config
from pedetect.io import LOCK_FILE

SIZE, SLICES = 48, 8


# ------------------------------------------------------------------------------------------ helpers
def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    return text


def store_bytes(store: Path) -> dict[str, bytes]:
    """Every series data file and marker of a store (the tables are compared as frames)."""
    return {p.name: p.read_bytes() for p in sorted((store / "series").iterdir())}


def same_store(store: Path, reference: Path) -> None:
    import pandas as pd

    from pedetect.store import SliceStore

    got, want = store_bytes(store), store_bytes(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith(
            ".json"
        ):  # markers: same slices, offsets and failures (the fingerprint holds mtimes: same input)
            assert json.loads(got[name]) == json.loads(want[name]), name
        else:
            assert got[name] == want[name], name
    for table in ("slices.parquet", "series.parquet", "failures.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(store / table), pd.read_parquet(reference / table))
    opened = SliceStore(store)
    for series in opened.slices["SeriesInstanceUID"].unique():
        assert len(opened.read_series(series)) > 0
    assert not (store / LOCK_FILE).exists()
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------ data
def synth_input(root: Path, studies: int, slices: int, size: int, seed: int) -> Path:
    from pedetect.synth import write_dataset

    write_dataset(root / "synth", studies, slices=slices, size=size, seed=seed, progress=False)
    return root / "synth" / "train"


def prepared_alone(dicom: Path, out: Path) -> Path:
    """The store a run alone makes of ``dicom``."""
    result = run("prepare", dicom, "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def dicom(tmp_path_factory) -> Path:
    return synth_input(tmp_path_factory.mktemp("faults"), 3, SLICES, SIZE, 31)


@pytest.fixture(scope="module")
def reference_store(dicom, tmp_path_factory) -> Path:
    return prepared_alone(dicom, tmp_path_factory.mktemp("reference") / "store")


# ------------------------------------------------------------------------------------------ prepare
def test_a_second_prepare_into_the_same_store_refuses_and_the_first_finishes_intact(dicom, reference_store, tmp_path):
    store, log = tmp_path / "store", tmp_path / "first.log"
    first = start("prepare", dicom, "--out", store, "--no-progress", log=log)
    record = wait_for_lock(store, first, log)
    assert record["host"] == socket.gethostname() and record["command"] == "pedetect prepare"
    os.kill(first.pid, signal.SIGSTOP)  # frozen while it holds the store
    try:
        second = run("prepare", dicom, "--out", store, "--no-progress")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stdout + second.stderr
    message = second.stderr
    assert f"{store} is in use by another pedetect run" in message
    assert f"pid {first.pid} on host {socket.gethostname()}" in message and "pedetect prepare" in message
    assert str(store / LOCK_FILE) in message
    assert "Traceback" not in message
    finish(first, log)
    same_store(store, reference_store)


def test_a_lock_left_by_a_killed_prepare_is_taken_over_and_said_so(dicom, reference_store, tmp_path):
    store, log = tmp_path / "store", tmp_path / "first.log"
    first = start("prepare", dicom, "--out", store, "--no-progress", log=log)
    wait_for_lock(store, first, log)
    first.kill()  # SIGKILL: no clean-up of any kind runs
    first.wait()
    assert (store / LOCK_FILE).exists()
    rerun = run("prepare", dicom, "--out", store, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert (
        f"took over the stale lock {store / LOCK_FILE} of pid {first.pid} on host {socket.gethostname()}"
        in rerun.stderr
    )
    assert "no longer running" in rerun.stderr
    same_store(store, reference_store)


def test_a_lock_left_by_another_host_is_refused_with_the_file_to_delete(dicom, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / LOCK_FILE).write_text(
        json.dumps(
            {
                "pid": 4242,
                "host": "scanner-node-7",
                "command": "pedetect prepare",
                "started": "2026-01-01T00:00:00+0000",
            }
        )
    )
    result = run("prepare", dicom, "--out", store, "--no-progress")
    assert result.returncode == 2
    assert f"{store / LOCK_FILE} was left by pid 4242 on host scanner-node-7" in result.stderr
    assert f"delete {store / LOCK_FILE}" in result.stderr
    assert sorted(p.name for p in store.iterdir()) == [LOCK_FILE]  # nothing else was written
    (store / LOCK_FILE).unlink()
    assert run("prepare", dicom, "--out", store, "--no-progress").returncode == 0


# ------------------------------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def training_inputs(dicom, reference_store, tmp_path_factory) -> dict[str, Path]:
    """A recipe that trains in seconds, labels and folds for the reference store's studies."""
    import pandas as pd

    from pedetect.recipe import save_config

    root = tmp_path_factory.mktemp("train_inputs")
    labels = pd.read_csv(dicom.parent / "train.csv")
    labels.to_csv(root / "labels.csv", index=False)
    studies = labels["StudyInstanceUID"].drop_duplicates().tolist()
    pd.DataFrame({"StudyInstanceUID": studies, "fold": [k % 2 for k in range(len(studies))]}).to_csv(
        root / "folds.csv", index=False
    )
    save_config(
        tiny_config("cnn.backbone.name=pedetect_small_cnn", "cnn.backbone.kwargs={}", "cnn.batch_size=8"),
        root / "tiny.yaml",
    )
    return {
        "config": root / "tiny.yaml",
        "labels": root / "labels.csv",
        "folds": root / "folds.csv",
        "store": reference_store,
    }


def train_args(inputs: dict[str, Path], out: Path) -> list:
    return [
        "train",
        inputs["config"],
        "--store",
        inputs["store"],
        "--labels",
        inputs["labels"],
        "--folds",
        inputs["folds"],
        "--out",
        out,
        "--stage",
        "cnn",
        "--fold",
        "0",
    ]


def test_a_second_train_into_the_same_model_folder_refuses_and_the_first_finishes_intact(training_inputs, tmp_path):
    from pedetect.models.layout import cnn_dir, is_complete
    from pedetect.models.slice_classifier import load_slice_classifier

    out, log = tmp_path / "model", tmp_path / "first.log"
    first = start(*train_args(training_inputs, out), log=log)
    record = wait_for_lock(out, first, log)
    assert record["command"] == "pedetect train"
    os.kill(first.pid, signal.SIGSTOP)
    try:
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        second = run(*train_args(training_inputs, out), "--force")
        after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stdout + second.stderr
    assert (
        f"{out} is in use by another pedetect run: pid {first.pid} on host {socket.gethostname()} (pedetect train)"
        in second.stderr
    )
    assert "Traceback" not in second.stderr
    assert after == before  # the second run changed nothing (not even with --force)
    finish(first, log)
    assert is_complete(cnn_dir(out, 0))
    load_slice_classifier(out, 0)  # the weights read back whole
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------ a full disk
# Two ways to fill a disk: a small tmpfs (needs root: mount), or RLIMIT_FSIZE in the child process
# (any user: every file the process writes is capped, EFBIG past it). Both run where they can.
FAULTS = ("tmpfs", "fsize")


def _mount(folder: Path, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True, capture_output=True
    )


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=False, capture_output=True)


def tmpfs_allowed(tmp_path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    probe = tmp_path / "probe"
    try:
        _mount(probe, 1 << 20)
    except (OSError, subprocess.CalledProcessError):
        return False
    _umount(probe)
    return True


class Disk:
    """Where a run writes, and how its room runs out: ``run(args)`` fills it, ``grow()`` frees it."""

    def __init__(self, fault: str, tmp_path: Path, size: int):
        self.fault, self.size = fault, size
        self.folder = tmp_path / "disk"
        if fault == "tmpfs":
            if not tmpfs_allowed(tmp_path):
                pytest.skip("a tmpfs cannot be mounted here (needs root); the fsize case makes the same fault")
            _mount(self.folder, size)
        else:
            self.folder.mkdir()

    def run(self, *args, limited: bool = True) -> subprocess.CompletedProcess:
        import resource

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.size))

        return subprocess.run(
            pedetect_command(*args),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=cap if limited and self.fault == "fsize" else None,
        )

    def grow(self) -> None:
        if self.fault == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.folder)], check=True, capture_output=True)

    def close(self) -> None:
        if self.fault == "tmpfs":
            _umount(self.folder)


@pytest.fixture(params=FAULTS)
def disk_fault(request, tmp_path):
    made = []

    def make(size: int) -> Disk:
        made.append(Disk(request.param, tmp_path, size))
        return made[-1]

    make.fault = request.param
    yield make
    for disk in made:
        disk.close()


def FAULT_IS_TMPFS(make) -> bool:  # noqa: N802
    return make.fault == "tmpfs"


def no_partial_store_file(store: Path) -> None:
    """Whatever a stopped prepare left: no temporary file, and every marker's data file complete
    (exactly the bytes its slices add up to, every frame a whole JPEG)."""
    from pedetect.store.format import decode_frame

    assert not [p for p in store.rglob("*") if ".tmp-" in p.name], sorted(store.rglob("*"))
    for marker_file in (store / "series").glob("*.json"):
        marker = json.loads(marker_file.read_text())
        data = (store / marker["file"]).read_bytes()
        offsets, lengths = marker["slices"]["offset"], marker["slices"]["length"]
        assert len(data) == (offsets[-1] + lengths[-1] if offsets else 0), marker_file
        for offset, length in zip(offsets, lengths):
            assert decode_frame(data[offset : offset + length]).ndim == 3


@pytest.fixture(scope="module")
def bigger_dicom(tmp_path_factory) -> Path:
    """Four series of about 55 kB of store each: a 140 kB disk holds two."""
    return synth_input(tmp_path_factory.mktemp("bigger"), 4, 16, 64, 51)


@pytest.fixture(scope="module")
def bigger_reference(bigger_dicom, tmp_path_factory) -> Path:
    return prepared_alone(bigger_dicom, tmp_path_factory.mktemp("bigger_reference") / "store")


def test_prepare_on_a_full_disk_says_so_keeps_no_partial_file_and_the_rerun_finishes(
    disk_fault, bigger_dicom, bigger_reference
):
    # tmpfs of 140 kB: two of the four series fit; RLIMIT_FSIZE of 40 kB: every series' data file
    # (52-62 kB) is over the cap, its marker and the tables are not.
    disk = disk_fault(140 * 1024 if FAULT_IS_TMPFS(disk_fault) else 40 * 1024)
    store = disk.folder / "store"
    first = disk.run("prepare", bigger_dicom, "--out", store, "--no-progress")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    reason = "No space left on device" if disk.fault == "tmpfs" else "File too large"
    assert f"error: no room to write the slice store {store}: {reason}" in " ".join(first.stderr.split())
    assert "run the same command again to finish" in " ".join(first.stderr.split())
    no_partial_store_file(store)
    if not (store / "slices.parquet").exists():
        from pedetect.store import SliceStore

        with pytest.raises(Exception):  # noqa: B017 (whatever the error, an unfinished store is not opened)
            SliceStore(store)  # an unfinished store is not opened as a finished one
    assert not (store / LOCK_FILE).exists()
    disk.grow()
    rerun = disk.run("prepare", bigger_dicom, "--out", store, "--no-progress", limited=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "lost: nothing" in rerun.stdout
    if disk.fault == "tmpfs":  # the series that fitted were kept, not redone
        assert "of 4 series already done" in rerun.stderr
    same_store(store, bigger_reference)


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory) -> Path:
    from pedetect.testing import write_random_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    return write_random_bundle(
        tiny_config(), out, folds=2, store_settings={"windows": [[-600, 1500], [100, 700], [40, 400]], "image_size": 48}
    )


def predict_args(dicom: Path, bundle: Path, folder: Path) -> list:
    return [
        "predict",
        dicom,
        "--model",
        bundle,
        "--out",
        folder / "sub.csv",
        "--report",
        folder / "report",
        "--no-progress",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def reference_submission(bigger_dicom, random_bundle, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("predicted")
    result = run(*predict_args(bigger_dicom, random_bundle, folder))
    assert result.returncode == 0, result.stderr
    return (folder / "sub.csv").read_text()


def no_partial_report_file(folder: Path) -> None:
    """No temporary file; every report file present is whole (JSON parses, images decode, HTML ends)."""
    from PIL import Image

    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]
    for path in folder.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".html":
            assert path.read_text().rstrip().endswith("</html>"), path
        elif path.suffix == ".csv":
            pytest.fail(f"{path} was written although the run failed")


def test_predict_on_a_full_disk_keeps_no_partial_file_and_the_rerun_finishes(
    disk_fault, bigger_dicom, random_bundle, reference_submission
):
    # tmpfs of 200 kB: the report of one or two studies fits; RLIMIT_FSIZE of 4 kB: the report's slice
    # JPEGs fit, its pages and pictures do not.
    disk = disk_fault(200 * 1024 if FAULT_IS_TMPFS(disk_fault) else 4 * 1024)
    first = disk.run(*predict_args(bigger_dicom, random_bundle, disk.folder))
    assert first.returncode != 0, first.stdout + first.stderr
    reason = "No space left on device" if disk.fault == "tmpfs" else "File too large"
    assert reason in first.stderr
    assert not (disk.folder / "sub.csv").exists()  # no submission from a run that failed
    no_partial_report_file(disk.folder / "report")
    disk.grow()
    rerun = disk.run(*predict_args(bigger_dicom, random_bundle, disk.folder), limited=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (disk.folder / "sub.csv").read_text() == reference_submission
    no_partial_report_file(disk.folder / "report")


def test_predict_on_a_full_disk_says_so_without_a_traceback(disk_fault, bigger_dicom, random_bundle):
    disk = disk_fault(200 * 1024 if FAULT_IS_TMPFS(disk_fault) else 4 * 1024)
    first = disk.run(*predict_args(bigger_dicom, random_bundle, disk.folder))
    assert first.returncode == 1
    assert "Traceback" not in first.stderr
    assert "error: no room to write" in first.stderr
