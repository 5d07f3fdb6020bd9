"""``pedetect`` run as a process in the repository: to its end (``run``, ``run_pedetect``) or in the
background (``start``), and a run seen holding its lock (``wait_for_lock``, for the tests of two runs
into one folder: tests/test_io_faults.py, tests/test_io_locks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pedetect.io import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]  # the repository


def pedetect_command(*args) -> list[str]:
    """``python -m pedetect ARGS…`` as a process's argument list (arguments through ``str``)."""
    return [sys.executable, "-m", "pedetect", *map(str, args)]


def run_pedetect(*args, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run ``pedetect ARGS…`` as a process in the repository; a non-zero exit fails the test with
    the tail of its output. ``timeout`` only catches a hang: the demo recipe's stage 1 on one fold
    takes about 3 minutes on an idle 2-core machine and took over 10 on one shared with a demo run."""
    result = subprocess.run(pedetect_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def start(*args, log: Path) -> subprocess.Popen:
    """``pedetect ARGS…`` as a background process, its output in ``log``."""
    handle = open(log, "w")
    process = subprocess.Popen(
        pedetect_command(*args),
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    handle.close()
    return process


def run(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``pedetect ARGS…`` run to its end with one OpenMP thread, its output captured (any exit code)."""
    return subprocess.run(
        pedetect_command(*args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_lock(
    folder: Path, process: subprocess.Popen, log: Path, timeout: float = 120, name: str = LOCK_FILE
) -> dict:
    """The lock record of ``process`` once it holds ``FOLDER/pedetect.lock`` (or ``FOLDER/NAME``)."""
    path = folder / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the first run ended (exit {process.returncode}) before it was seen holding the lock:\n{log.read_text()[-3000:]}"
            )
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if record and record.get("pid") == process.pid:
            return record
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"{path} was not taken by pid {process.pid} within {timeout} s")
