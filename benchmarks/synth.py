"""Throughput of `pedetect synth`: slices per second, end to end (plan, render, write DICOM), one core.

    python benchmarks/synth.py [--studies N] [--slices S] [--sizes 256 512] [--syntaxes explicit rle jpeg2000]

Writes into a temporary folder (deleted afterwards) and prints a table; the issue's target is at
least 200 slices/s at 256×256 with explicit VR little endian.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _one_core() -> None:
    """Pin BLAS/OpenCV threads and the process to one core, so the number is per core."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    import cv2

    cv2.setNumThreads(1)


def measure(size: int, syntax: str, studies: int, slices: int | None, seed: int = 0) -> tuple[int, float]:
    from pedetect.synth import write_dataset

    folder = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    try:
        start = time.perf_counter()
        labels = write_dataset(
            folder, studies, slices=slices, size=size, seed=seed, transfer_syntax=syntax, progress=False
        )
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return len(labels), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4, help="studies per measurement (default 4)")
    parser.add_argument("--slices", type=int, default=None, help="slices per study (default: drawn, 60-140)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--syntaxes", nargs="+", default=["explicit", "rle", "jpeg2000"])
    args = parser.parse_args()
    _one_core()
    measure(64, "explicit", 1, 4)  # warm up imports and codecs

    rows = []
    for size in args.sizes:
        for syntax in args.syntaxes:
            n, seconds = measure(size, syntax, args.studies, args.slices)
            rows.append((size, syntax, n, seconds, n / seconds))
    print(f"pedetect synth throughput, one core, {args.studies} studies per row")
    print(f"{'size':>5} {'syntax':>9} {'slices':>7} {'seconds':>8} {'slices/s':>9}")
    for size, syntax, n, seconds, rate in rows:
        print(f"{size:>5} {syntax:>9} {n:>7} {seconds:>8.2f} {rate:>9.1f}")


if __name__ == "__main__":
    main()
