"""Each RSNA recipe on one GPU: stage-1 training throughput and predict time per study.

For every recipe (default: configs/rsna_*.yaml):

- **stage 1, slices/s**: optimiser steps of the recipe's CNN (its backbone, head, input channels,
  image size, batch size, loss, optimiser) on random uint8 batches, under bf16 autocast with the
  model and inputs channels-last (as ``pedetect train`` runs on a GPU with ``precision: auto``).
  Data loading is not in it: this is the ceiling the loader has to feed (benchmarks/loader.py
  measures the loader). Warm-up steps first (cuDNN autotuning, allocator), then timed steps;
  gradient accumulation does not change slices/s and is left out.
- **predict, s per study**: ``pedetect predict`` (the library call, in this process) on one
  synthetic 250-slice 512 × 512 study with a bundle of the recipe's models (random weights, all
  its folds: weights do not change the time), after one warm-up study: reading and windowing the
  DICOM, the lung box where the recipe crops, every fold's CNN and sequence head, the consistency fix.

    python benchmarks/train_gpu.py [--recipes FILE ...] [--device cuda] [--steps 20] [--warmup 5] [--json OUT]
    python benchmarks/train_gpu.py --device cpu --tiny      # smoke run: 64 px, batch 4, 16-slice study

Prints one line per measurement and a table at the end; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def recipe_config(path: Path, tiny: bool):
    """The recipe with random backbone weights (the time does not depend on them); tiny: 64 px, batch 4."""
    from pedetect.recipe import apply_overrides, load_experiment

    overrides = ["cnn.backbone.weights=null", "data.num_workers=0", "embed.num_workers=0"]
    if tiny:
        overrides += ["cnn.input.image_size=64", "cnn.batch_size=4", "data.folds=2"]
    return apply_overrides(load_experiment(path), overrides)


def stage1_throughput(config, device: str, steps: int, warmup: int) -> dict:
    """Slices per second of optimiser steps of the recipe's CNN on random batches."""
    import torch

    from pedetect.models.slice_classifier import build_slice_classifier
    from pedetect.train.module import build_optimizer, slice_loss

    cnn = config.cnn
    torch.manual_seed(0)
    model = build_slice_classifier(cnn, load_pretrained=False).to(device).train()  # channels-last already
    optimizer = build_optimizer(cnn.optimizer, model.parameters())
    size, batch, channels = cnn.input.image_size, cnn.batch_size, cnn.input.channels
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.full((batch, 1 + len(cnn.targets.head_labels)), float("nan"), device=device)
    targets[:, 0] = (torch.rand(batch, device=device) < 0.25).float()
    targets[targets[:, 0] > 0, 1:] = 0.0
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
            loss = slice_loss(cnn, model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "slices_per_second": batch * steps / seconds,
        "batch_size": batch,
        "image_size": size,
        "precision": "bf16-mixed" if use_bf16 else "32-true",
        "steps": steps,
        "peak_gpu_gib": peak,
    }


def predict_seconds(config, device: str, slices: int, size: int, work: Path) -> dict:
    """Seconds of ``predict`` per study (one warm-up study first) with all the recipe's folds."""
    from pedetect.infer.predict import predict
    from pedetect.synth import write_dataset
    from pedetect.testing import write_random_bundle

    bundle = write_random_bundle(config, work / "bundle", folds=config.data.folds)
    write_dataset(work / "warmup", 1, slices=slices, size=size, seed=31, split="test", progress=False)
    write_dataset(work / "study", 1, slices=slices, size=size, seed=32, split="test", progress=False)
    quiet = lambda message: None  # noqa: E731
    predict(
        work / "warmup" / "test",
        [bundle],
        work / "warmup.csv",
        device=device,
        runtime="torch",
        progress=False,
        echo=quiet,
    )
    started = time.perf_counter()
    predict(
        work / "study" / "test",
        [bundle],
        work / "study.csv",
        device=device,
        runtime="torch",
        progress=False,
        echo=quiet,
    )
    return {
        "seconds_per_study": time.perf_counter() - started,
        "slices": slices,
        "size": size,
        "folds": config.data.folds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", type=Path, default=sorted((ROOT / "configs").glob("rsna_*.yaml")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--slices", type=int, default=250, help="slices of the predicted study")
    parser.add_argument(
        "--tiny", action="store_true", help="smoke run: 64 px inputs, batch 4, a 16-slice 64 px study, 2 steps"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; --device cpu --tiny runs the smoke test")
    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    slices, size = (16, 64) if args.tiny else (args.slices, 512)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    results = []
    for path in args.recipes:
        config = recipe_config(path, args.tiny)
        train = stage1_throughput(config, args.device, steps, warmup)
        print(
            f"{config.name}: stage 1 {train['slices_per_second']:.1f} slices/s (batch {train['batch_size']}, "
            f"{train['image_size']} px, {train['precision']})",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="pedetect-bench-") as work:
            timed = predict_seconds(config, args.device, slices, size, Path(work))
        print(
            f"{config.name}: predict {timed['seconds_per_study']:.2f} s per {slices}-slice study ({timed['folds']} folds)",
            flush=True,
        )
        results.append(
            {
                "recipe": path.name,
                "name": config.name,
                "device": gpu,
                "tiny": args.tiny,
                "stage1": train,
                "predict": timed,
            }
        )
    print(
        "\n| recipe | stage 1 slices/s | batch | px | predict s/study | folds |\n| --- | --- | --- | --- | --- | --- |"
    )
    for r in results:
        print(
            f"| {r['recipe']} | {r['stage1']['slices_per_second']:.1f} | {r['stage1']['batch_size']} | {r['stage1']['image_size']} "
            f"| {r['predict']['seconds_per_study']:.2f} | {r['predict']['folds']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
