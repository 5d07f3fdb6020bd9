"""Benchmark of the stage-1 input pipeline: slices per second per DataLoader worker (docs/benchmarks.md).

    .venv/bin/python benchmarks/loader.py [--studies 4] [--slices 64] [--size 512] [--store DIR]
        [--config configs/rsna_4th_rexnet200.yaml] [--batches 40] [--workers 0,1,2] [--json OUT.json]

1. Makes a slice store of synthetic 512×512 studies (``pedetect.synth.write_dataset`` →
   ``pedetect.store.prepare``), or uses ``--store``.
2. Per slice, one process, one thread: read + JPEG decode, augmentation (the recipe's: resize, flips,
   shift-scale-rotate, brightness/contrast, cutout), and collation into a batch.
3. Training batches delivered by ``torch.utils.data.DataLoader`` over :class:`SliceDataset` with the
   training sampler, for each worker count: slices/s in all and per worker (0 workers: the main process
   does the work, counted as one). Input modes windows (1 read), adjacent and both (3 reads).
4. The workers an H100 needs to train efficientnet_b0 at 512, from an *estimated* H100 throughput
   (no GPU measured here; see ``H100_EFFICIENTNET_B0_512``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Estimate, not a measurement: timm's published training benchmark gives efficientnet_b0 1,752 img/s at
# 224 px on an RTX 3090 (AMP, channels-last; results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv).
# At 512 px a step costs (512/224)² ≈ 5.2× more → ≈ 335 img/s on the 3090. An H100 (SXM, bf16) trains
# such memory-bound convnets about 3–4× faster than a 3090 (HBM3 3.35 TB/s vs 0.94 TB/s) → ≈ 1,000–1,300.
H100_EFFICIENTNET_B0_512 = 1200.0


def make_store(work: Path, studies: int, slices: int, size: int) -> tuple[Path, Path]:
    from pedetect.store import prepare
    from pedetect.synth import write_dataset

    dicom, store = work / "dicom", work / "store"
    if not (store / "slices.parquet").exists():
        write_dataset(dicom, studies, slices=slices, size=size, seed=0, progress=False)
        prepare(dicom, store, workers=min(2, os.cpu_count() or 1), progress=False, echo=lambda m: None)
    return store, dicom / "train.csv"


def per_stage(dataset, n: int, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per slice for read+decode, augmentation, and collation, in this process."""
    import torch

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(dataset), n)
    t0 = time.perf_counter()
    raw = [dataset.read(int(i)) for i in rows]
    t1 = time.perf_counter()
    tensors = [torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1) for r in raw]
    augmented = [dataset.transform(t, rng) for t in tensors]
    t2 = time.perf_counter()
    for start in range(0, n - batch_size + 1, batch_size):
        torch.stack(augmented[start : start + batch_size])
    t3 = time.perf_counter()
    n_collated = (n // batch_size) * batch_size
    return {
        "read_decode_ms": (t1 - t0) / n * 1000,
        "augment_ms": (t2 - t1) / n * 1000,
        "collate_ms": (t3 - t2) / max(n_collated, 1) * 1000,
    }


def loader_rate(dataset, sampler, workers: int, batches: int, batch_size: int) -> float:
    """Slices per second that a DataLoader delivers as training batches (after a warm-up)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        drop_last=True,
    )

    def cycle():
        epoch = 0
        while True:  # a small store gives few batches per epoch: go round
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    iterator = cycle()
    warm = 2 + 2 * workers
    for _ in range(warm):
        next(iterator)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        images, _, _ = next(iterator)
        n += len(images)
    rate = n / (time.perf_counter() - start)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--store", type=Path, help="an existing slice store (with --labels)")
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--work", type=Path, help="keep the synthetic store here (default: a temporary folder)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "rsna_4th_rexnet200.yaml")
    parser.add_argument("--image-size", type=int, help="default: the config's")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--modes", default="windows,adjacent,both")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import cv2
    import pandas as pd
    import torch

    from pedetect.data.dataset import SliceDataset, open_store, slice_items
    from pedetect.data.sampler import EpochSampler
    from pedetect.recipe import load_experiment

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    config = load_experiment(args.config)
    image_size = args.image_size or config.cnn.input.image_size
    temp = None
    if args.store is None:
        if args.work is None:
            temp = tempfile.TemporaryDirectory(prefix="pedetect-loader-")
            args.work = Path(temp.name)
        t = time.perf_counter()
        store_path, labels_path = make_store(args.work, args.studies, args.slices, args.size)
        print(f"store: {store_path} ({time.perf_counter() - t:.1f} s to make)", file=sys.stderr)
    else:
        store_path, labels_path = args.store, args.labels
    store = open_store(store_path)
    labels = pd.read_csv(labels_path, dtype=str)
    labels["pe_present_on_image"] = labels["pe_present_on_image"].astype(int)
    items = slice_items(labels, store.slices)
    stored_size = int(store.read_slice(items["SeriesInstanceUID"].iloc[0], 0).shape[0])

    results: dict = {
        "slices": len(items),
        "stored_size": stored_size,
        "image_size": image_size,
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "batch_size": args.batch_size,
        "cpu": os.cpu_count(),
        "modes": {},
    }
    worker_counts = [int(w) for w in args.workers.split(",")]
    for mode in args.modes.split(","):
        dataset = SliceDataset(store_path, items, mode=mode, image_size=image_size, augment=config.cnn.augment)
        sampler = EpochSampler(dataset.positive, mode="all", seed=0)
        stages = per_stage(dataset, 8 * args.batch_size, args.batch_size)
        rates = {}
        for workers in worker_counts:
            rate = loader_rate(dataset, sampler, workers, args.batches, args.batch_size)
            rates[workers] = {"slices_per_s": rate, "per_worker": rate / max(workers, 1)}
        results["modes"][mode] = {"stages_ms": stages, "loader": rates}
        line = ", ".join(
            f"{w} workers {r['slices_per_s']:.0f}/s ({r['per_worker']:.0f}/worker)" for w, r in rates.items()
        )
        print(
            f"{mode:9s} read+decode {stages['read_decode_ms']:.2f} ms, augment {stages['augment_ms']:.2f} ms, "
            f"collate {stages['collate_ms']:.2f} ms per slice; {line}",
            file=sys.stderr,
        )

    single = results["modes"].get("windows", next(iter(results["modes"].values())))["loader"]
    one_worker = single.get(1) or single.get(0)
    per_worker = one_worker["per_worker"]
    results["h100_efficientnet_b0_512_estimate"] = H100_EFFICIENTNET_B0_512
    results["workers_for_h100"] = math.ceil(H100_EFFICIENTNET_B0_512 / per_worker)
    print(
        f"H100 training efficientnet_b0 at 512 (estimate, not measured): ≈ {H100_EFFICIENTNET_B0_512:.0f} slices/s → "
        f"{results['workers_for_h100']} workers at {per_worker:.0f} slices/s each (windows input)",
        file=sys.stderr,
    )
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
