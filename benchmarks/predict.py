"""How fast ``pedetect predict`` is, end to end, and how much memory it needs.

Seconds per 250-slice 512×512 study (scan, read, window, CNN, sequence head, consistency fix, CSV),
slices/s, and the peak resident memory of ``pedetect predict`` on one 1,000-slice study (target:
under 3 GB), for two bundles with random weights (weights do not change the time):

- the demo recipe (configs/demo.yaml: 3 folds of pedetect_small_cnn at 128 px);
- a full-size recipe (default configs/rsna_4th_rexnet200.yaml: rexnet_200 at 512 px), with
  ``--full-folds`` folds (default 1: the time of its 3 folds is 3 × that CNN part).

Each run is a fresh ``pedetect predict`` process, so its peak memory is its own.

    python benchmarks/predict.py [--slices 250] [--memory-slices 1000] [--full-config FILE] [--skip-full]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_study(root: Path, slices: int, size: int = 512, seed: int = 11) -> Path:
    from pedetect.synth import write_dataset

    write_dataset(root, 1, slices=slices, size=size, seed=seed, split="test", progress=False)
    return root / "test"


def make_bundle(config_path: Path, out: Path, folds: int | None) -> Path:
    from pedetect.testing import write_random_bundle
    from pedetect.recipe import load_experiment

    config = load_experiment(config_path)
    return write_random_bundle(config, out, folds=folds or config.data.folds)


def _high_water_kib(pid: int) -> int:
    """VmHWM of a running process in KiB (Linux /proc); 0 once it is gone or elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_predict(study: Path, model: Path, out: Path, extra: list[str] = ()) -> dict:
    """One ``pedetect predict`` process: wall seconds, its own summary numbers, peak RSS (GB)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pedetect", "predict", str(study), "--model", str(model), "--out", str(out),
                                    "--device", "cpu", "--no-progress", *extra], stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        # The child's own high-water mark (VmHWM of its address space after exec), polled until it
        # exits. Not ru_maxrss: Linux carries the forking parent's resident size (here: the synthetic
        # studies just rendered) into the child's ru_maxrss across exec.
        peak_kib = 0
        while process.poll() is None:
            peak_kib = max(peak_kib, _high_water_kib(process.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - started
        stderr.seek(0)
        log = stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"pedetect predict failed ({process.returncode}):\n{log[-3000:]}")
    summary = re.search(r"predicted \d+ studies, (\d+) slices read, .* in ([0-9.]+) s \(([0-9.]+) slices/s\)", log)
    timing = re.search(r"time: (.*)", log)
    return {
        "wall_s": wall,
        "slices": int(summary.group(1)),
        "predict_s": float(summary.group(2)),
        "slices_per_s": float(summary.group(3)),
        "parts": timing.group(1) if timing else "",
        "peak_gb": peak_kib / 2**20 if peak_kib else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--memory-slices", type=int, default=1000)
    parser.add_argument("--full-config", type=Path, default=ROOT / "configs" / "rsna_4th_rexnet200.yaml")
    parser.add_argument("--full-folds", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="pedetect-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        study = make_study(tmp / "study", args.slices)
        big = make_study(tmp / "big", args.memory_slices, seed=12)
        print(f"synthetic studies ({args.slices} and {args.memory_slices} slices, 512x512) in {time.perf_counter() - started:.0f} s; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        demo = make_bundle(ROOT / "configs" / "demo.yaml", tmp / "demo", None)
        memory = run_predict(big, demo, tmp / "b.csv")
        print(f"{args.memory_slices}-slice study, demo bundle: {memory}", flush=True)
        rows = [("demo (3 folds, pedetect_small_cnn 128 px)", run_predict(study, demo, tmp / "a.csv"))]
        print(rows[-1], flush=True)
        if not args.skip_full:
            full = make_bundle(args.full_config, tmp / "full", args.full_folds)
            rows.append((f"{args.full_config.stem} ({args.full_folds} fold, random weights)", run_predict(study, full, tmp / "c.csv")))
            print(rows[-1], flush=True)
    print()
    print(f"| bundle | s per {args.slices}-slice study (process) | predict s | slices/s | peak GB | parts |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['wall_s']:.1f} | {r['predict_s']:.1f} | {r['slices_per_s']:.1f} | {_gb(r['peak_gb'])} | {r['parts']} |")
    print(f"\npeak memory, {args.memory_slices}-slice 512x512 study, demo bundle: {_gb(memory['peak_gb'])} GB "
          f"({memory['predict_s']:.1f} s, {memory['slices_per_s']:.1f} slices/s)")


if __name__ == "__main__":
    main()
