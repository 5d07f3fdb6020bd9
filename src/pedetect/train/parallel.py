"""Folds trained at once on a CPU (``runtime.parallel_folds``), each in a process of its own.

A fold's work in stage 1, the embedding pass and stage 2 depends on its fold number and its seed
alone, so folds can run side by side. On a CPU that is faster than one fold after another with
every core: the demo's small CNN ran 163 slices/s on one core and only 190-200 on two (its
convolutions on 8-16 channels split poorly across threads), and a stage-2 head steps through a
series' slices one at a time. Each process gets an equal share of the cores (one at least).

What a process needs travels as plain data: the config, the labelled slices with their folds and
the store's path (each process opens the store itself). A fold that fails is reported with its
number once the others end; the folds that finished keep their COMPLETE markers, so a re-run does
only what is left.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pedetect.console import echo as console_echo
from pedetect.data.dataset import open_store
from pedetect.train.setup import TrainError, TrainingInputs


def processes_for(
    inputs: TrainingInputs, pending: Sequence[int], *, device: Any = "cpu", needs_store: bool = True
) -> int:
    """How many folds run at once: ``runtime.parallel_folds`` for work on a CPU (with its store on
    disk when it reads one), never more than the folds left; 1 otherwise (GPUs, several devices or
    nodes, an in-memory store)."""
    runtime = inputs.config.runtime
    if str(device) != "cpu" or runtime.devices not in ("auto", 1) or runtime.num_nodes != 1:
        return 1
    if needs_store and not isinstance(inputs.store, (str, Path)):
        return 1
    return max(1, min(runtime.parallel_folds, len(pending)))


def threads_per_process(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def shipped_inputs(inputs: TrainingInputs, *, needs_store: bool = True) -> TrainingInputs:
    """``inputs`` for the folds' processes: without the opened store (each process opens its own from
    ``inputs.store``; work that reads no store gets none), without progress bars (several processes'
    bars on one terminal would interleave) and without loader processes: each fold reads its own
    slices between its steps while the other folds' processes keep the cores busy. (Three demo folds
    side by side trained at 260 slices/s in all that way and at 165 with a loader process each.)"""
    config = inputs.config.model_copy(deep=True)
    config.logging.progress_bar = False
    config.data.num_workers = 0
    config.embed.num_workers = 0
    return dataclasses.replace(inputs, config=config, source=None, store=inputs.store if needs_store else None)


def reopened(inputs: TrainingInputs) -> TrainingInputs:
    """In a fold's process: ``inputs`` with its store opened again."""
    return dataclasses.replace(inputs, source=open_store(inputs.store))


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies

# The processes of the last parallel stage, kept for the next (stage 1, the embedding pass and stage 2
# of one `pedetect train` reuse them: each spawn imports torch and Lightning again, 10-15 s of the
# demo's two cores per stage). pedetect.train.pipeline shuts them down when training ends.
_pool: tuple[int, Any] | None = None


def _end_with(parent: int) -> None:
    """A fold process's initializer: it ends when ``parent`` (the ``pedetect train`` that started it)
    does. A parent stopped by SIGTERM or SIGKILL cannot shut its pool down, and folds left training on
    their own kept every core busy for the rest of their schedule. Linux sends SIGKILL at the parent's
    death (PR_SET_PDEATHSIG; not SIGTERM, which Lightning catches to stop at the end of a step, and
    nothing is lost: every write is a temporary file renamed); elsewhere a thread polls for the
    parent once a second."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="pedetect-parent-watch", daemon=True).start()


def _executor(processes: int):
    global _pool
    if _pool is not None and _pool[0] != processes:
        shutdown_fold_processes()
    if _pool is None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        _pool = (
            processes,
            ProcessPoolExecutor(processes, mp_context=context, initializer=_end_with, initargs=(os.getpid(),)),
        )
    return _pool[1]


def shutdown_fold_processes() -> None:
    """End the folds' processes kept between stages (if any)."""
    global _pool
    if _pool is not None:
        _pool[1].shutdown(wait=True, cancel_futures=True)
        _pool = None


def _run_fold(work: Callable[[int], Any], fold: int, threads: int) -> Any:
    torch.set_num_threads(threads)
    return work(fold)


def run_folds_in_processes(
    work: Callable[[int], Any],
    folds: Sequence[int],
    processes: int,
    *,
    stage: str,
    echo: Callable[[str], None] = console_echo,
) -> list[Any]:
    """``work(fold)`` for every fold, ``processes`` at a time in spawned processes; the results in
    fold order. ``work`` must be picklable (a module-level function or a partial of one)."""
    threads = threads_per_process(processes)
    echo(f"{stage}: folds {list(folds)} in {processes} processes at a time, {threads} thread(s) each")
    pool = _executor(processes)
    futures = [pool.submit(_run_fold, work, k, threads) for k in folds]
    errors = [f.exception() for f in futures]  # waits for every fold
    failed = [(k, e) for k, e in zip(folds, errors) if e is not None]
    if failed:
        shutdown_fold_processes()  # a process that died takes the pool with it: start afresh next time
        fold, error = failed[0]
        others = f" (and folds {[k for k, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise TrainError(f"{stage} fold {fold} failed in its process{others}: {error}") from error
    return [f.result() for f in futures]


def run_folds(
    inputs: TrainingInputs,
    pending: Sequence[int],
    processes: int,
    *,
    in_process: Callable[[TrainingInputs, int], Any],
    in_turn: Callable[[int], Any],
    stage: str,
    needs_store: bool = True,
    echo: Callable[[str], None] = console_echo,
) -> None:
    """A stage's pending folds: ``in_process(shipped inputs, fold)`` in ``processes`` spawned processes
    when that is more than one (``in_process`` a module-level function), else ``in_turn(fold)`` for
    one fold after another in this process."""
    if processes > 1:
        shipped = shipped_inputs(inputs, needs_store=needs_store)
        run_folds_in_processes(partial(in_process, shipped), pending, processes, stage=stage, echo=echo)
        return
    for k in pending:
        in_turn(k)
