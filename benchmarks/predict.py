"""How fast ``pedetect predict`` is, end to end, and how much memory it needs.

Seconds per 250-slice 512×512 study (scan, read, window, CNN, sequence head, consistency fix, CSV),
slices/s, and the peak resident memory of ``pedetect predict`` on one 1,000-slice study (target:
under 3 GB), for two bundles with random weights (weights do not change the time):

- the demo recipe (configs/demo.yaml: 3 folds of pedetect_small_cnn at 128 px);
- a full-size recipe (default configs/rsna_4th_rexnet200.yaml: rexnet_200 at 512 px), with
  ``--full-folds`` folds (default 1: the time of its 3 folds is 3 × that CNN part).

Every bundle is exported first (``pedetect export --int8``, checked and calibrated on the 250-slice
study's store) and predicted in each runtime (``--runtime torch``, ``onnx``, ``onnx-int8``): the
ratios are against PyTorch in the same run. Each run is a fresh ``pedetect predict`` process, so its
peak memory is its own. ``--demo-dir DIR`` (a finished ``pedetect demo --out DIR``) adds each
runtime's score and slice AUC on that demo's test set.

    python benchmarks/predict.py [--slices 250] [--memory-slices 1000] [--full-config FILE] [--skip-full] [--demo-dir DIR] [--threads N]
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
    from pedetect.recipe import load_experiment
    from pedetect.testing import write_random_bundle

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
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pedetect",
                "predict",
                str(study),
                "--model",
                str(model),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
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


RUNTIMES = ("torch", "onnx", "onnx-int8")


def prepare_store(study: Path, out: Path) -> Path:
    """The study as a slice store: what pedetect export checks and calibrates on."""
    subprocess.run(
        [sys.executable, "-m", "pedetect", "prepare", str(study), "--out", str(out), "--no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out


def export(model: Path, store: Path, *extra: str) -> float:
    """``pedetect export MODEL --int8`` (fp32 and int8); its wall seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pedetect", "export", str(model), "--store", str(store), "--int8", *extra],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"pedetect export failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def demo_accuracy(demo_dir: Path, tmp: Path) -> list[tuple[str, dict]]:
    """Each runtime's score and slice AUC on a finished ``pedetect demo --out DIR``'s test set, the
    export checked on the demo's training store with its labels."""
    from pedetect.metric.evaluate import evaluate_files

    model = tmp / "demo-trained"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pedetect",
            "export",
            str(demo_dir / "model"),
            "--store",
            str(demo_dir / "store"),
            "--labels",
            str(demo_dir / "data" / "train.csv"),
            "--out",
            str(model),
            "--int8",
        ],
        check=True,
    )
    rows = []
    for runtime in RUNTIMES:
        out = tmp / f"demo-{runtime}.csv"
        run_predict(
            demo_dir / "data" / "test",
            model,
            out,
            ["--runtime", runtime, "--sample", str(demo_dir / "data" / "sample_submission.csv")],
        )
        report = evaluate_files(demo_dir / "data" / "test_labels.csv", out)
        rows.append((runtime, {"score": report["score"], "slice_auc": report["slice_auc"]}))
    return rows


def model_seconds(run: dict) -> float:
    """The 'model' part of predict's own timing line (CNN and sequence head)."""
    found = re.search(r"model ([0-9.]+) s", run["parts"])
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--memory-slices", type=int, default=1000)
    parser.add_argument("--full-config", type=Path, default=ROOT / "configs" / "rsna_4th_rexnet200.yaml")
    parser.add_argument("--full-folds", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument(
        "--skip-demo", action="store_true", help="Only the full-size recipe (no demo bundle, no memory runs)."
    )
    parser.add_argument(
        "--demo-dir", type=Path, help="A finished pedetect demo --out DIR: also each runtime's score on its test set."
    )
    parser.add_argument("--threads", type=int, help="predict --threads (default: every core).")
    args = parser.parse_args()
    import torch

    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory(prefix="pedetect-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        study = make_study(tmp / "study", args.slices)
        big = make_study(tmp / "big", args.memory_slices, seed=12)
        store = prepare_store(study, tmp / "store")
        print(
            f"synthetic studies ({args.slices} and {args.memory_slices} slices, 512x512) in {time.perf_counter() - started:.0f} s; "
            f"torch threads {torch.get_num_threads()}",
            flush=True,
        )
        bundles = (
            []
            if args.skip_demo
            else [
                (
                    "demo (3 folds, pedetect_small_cnn 128 px)",
                    make_bundle(ROOT / "configs" / "demo.yaml", tmp / "demo", None),
                )
            ]
        )
        if not args.skip_full:
            name = f"{args.full_config.stem} ({args.full_folds} fold, random weights)"
            bundles.append((name, make_bundle(args.full_config, tmp / "full", args.full_folds)))
        rows, memory, exports = [], [], []
        for name, bundle in bundles:
            exports.append((name, export(bundle, store, *threads)))
            print(f"{name}: exported in {exports[-1][1]:.0f} s", flush=True)
            for runtime in RUNTIMES:
                rows.append(
                    (name, runtime, run_predict(study, bundle, tmp / "a.csv", ["--runtime", runtime, *threads]))
                )
                print(rows[-1], flush=True)
        for runtime in RUNTIMES if not args.skip_demo else ():
            memory.append((runtime, run_predict(big, bundles[0][1], tmp / "b.csv", ["--runtime", runtime, *threads])))
            print(f"{args.memory_slices}-slice study, demo bundle, {runtime}: {memory[-1][1]}", flush=True)
        accuracy = demo_accuracy(args.demo_dir, tmp) if args.demo_dir else []
    print()
    # The speed-up is on the models' own time (CNN and head, summed over the study): the process
    # time also holds Python's start and the imports (torch and timm's cost seconds on a busy machine).
    print(
        f"| bundle | runtime | s per {args.slices}-slice study (process) | predict s | model s | model × PyTorch | peak GB | parts |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    baseline = {name: model_seconds(r) for name, runtime, r in rows if runtime == "torch"}
    for name, runtime, r in rows:
        model = model_seconds(r)
        speedup = baseline[name] / model if model > 0 else float("nan")
        print(
            f"| {name} | {runtime} | {r['wall_s']:.1f} | {r['predict_s']:.1f} | {model:.1f} | {speedup:.2f} | {_gb(r['peak_gb'])} | {r['parts']} |"
        )
    print(
        "\nexport (fp32 and int8, checked on the study): "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in exports)
    )
    if memory:
        print(
            f"peak memory, {args.memory_slices}-slice 512x512 study, demo bundle: "
            + ", ".join(f"{runtime} {_gb(r['peak_gb'])} GB ({r['predict_s']:.1f} s)" for runtime, r in memory)
        )
    if accuracy:
        print(
            f"\n{args.demo_dir} test set: "
            + ", ".join(f"{runtime} score {a['score']:.4f}, slice AUC {a['slice_auc']:.4f}" for runtime, a in accuracy)
        )


if __name__ == "__main__":
    main()
