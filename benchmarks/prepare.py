"""Benchmark of ``pedetect prepare`` and of the slice-store format (docs/benchmarks.md).

    .venv/bin/python benchmarks/prepare.py [--studies 4] [--slices 64] [--size 512] [--work DIR] [--json OUT.json]

1. Writes synthetic CTPA studies (``pedetect.synth.write_dataset``, explicit VR little endian).
2. Throughput, one worker each, on the same files:
   - baseline: the challenge repos' way: per file ``dcmread`` → float HU from the header's
     slope/intercept → three float windows → ``cv2.imwrite`` JPEG (OpenCV defaults: quality 95, 4:2:0);
   - pedetect: ``prepare(..., workers=1)`` in process (scan, order, lookup-table windows, JPEG frames,
     markers, parquet tables), and with ``--workers`` = the machine's cores for scaling.
   Reports slices/s per core (wall and CPU time) and bytes per slice, and projects the RSNA
   training set (1.79 M slices) on 16 cores.
3. Store format candidates on the same windowed slices: bytes/slice, encode time, random-access
   single-slice read+decode time, and error against the exact uint8 windows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom

RSNA_SLICES = 1_790_000
WINDOWS = ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0))


def baseline(files: list[Path], out: Path) -> dict:
    """The naive per-file converter of the challenge repos."""
    wall, cpu = time.perf_counter(), time.process_time()
    total = 0
    for path in files:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        channels = []
        for level, width in WINDOWS:
            lo, hi = level - width / 2, level + width / 2
            x = np.clip(hu, lo, hi)
            x = (x - lo) / (hi - lo) * 255.0
            channels.append(x.astype(np.uint8))
        image = np.stack(channels[::-1], axis=-1)  # BGR for OpenCV: red = lung
        target = out / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        target.mkdir(parents=True, exist_ok=True)
        name = target / f"{ds.SOPInstanceUID}.jpg"
        cv2.imwrite(str(name), image)
        total += name.stat().st_size
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "bytes": total,
        "slices": len(files),
    }


def run_prepare(input_dir: Path, out: Path, workers: int) -> dict:
    from pedetect.store import SliceStore, prepare

    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = prepare(input_dir, out, workers=workers, progress=False, echo=lambda m: None)
    result = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "slices": summary.slices_prepared,
    }
    store = SliceStore(out)
    result["bytes"] = int(store.slices["length"].sum())
    result["failures"] = len(store.failures)
    return result


# --------------------------------------------------------------------------------------------------
# Format candidates


def _jpeg(quality: int, sampling: int):
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    return (
        lambda img: cv2.imencode(".jpg", img[:, :, ::-1].copy(), params)[1].tobytes(),
        lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB),
    )


def _png():
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    return (
        lambda img: cv2.imencode(".png", img[:, :, ::-1].copy(), params)[1].tobytes(),
        lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB),
    )


def _zlib(shape):
    return (
        lambda img: zlib.compress(img.tobytes(), 1),
        lambda b: np.frombuffer(zlib.decompress(b), np.uint8).reshape(shape),
    )


def _raw(shape):
    return (lambda img: img.tobytes(), lambda b: np.frombuffer(b, np.uint8).reshape(shape))


def formats(images: list[np.ndarray], work: Path, reads: int = 400) -> list[dict]:
    """Each candidate: bytes/slice, encode ms, random single-slice read+decode ms, error vs exact."""
    shape = images[0].shape
    candidates = [
        (
            "JPEG per slice file, q95 4:2:0 (challenge repos, cv2 default)",
            _jpeg(95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420),
            "files",
        ),
        (
            "per-series container of JPEG frames, q90 4:4:4 (pedetect)",
            _jpeg(90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
            "container",
        ),
        (
            "per-series container of JPEG frames, q95 4:4:4",
            _jpeg(95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
            "container",
        ),
        (
            "per-series container of JPEG frames, q90 4:2:0",
            _jpeg(90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420),
            "container",
        ),
        ("PNG per slice (lossless, level 1)", _png(), "files"),
        ("per-series container of zlib-1 arrays (lossless)", _zlib(shape), "container"),
        ("per-series raw uint8 (lossless, uncompressed)", _raw(shape), "container"),
    ]
    rng = random.Random(0)
    order = [rng.randrange(len(images)) for _ in range(reads)]
    rows = []
    for name, (encode, decode), layout in candidates:
        folder = work / f"fmt{len(rows)}"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        blobs = [encode(img) for img in images]
        encode_ms = (time.perf_counter() - start) / len(images) * 1e3
        if layout == "files":
            paths = []
            for i, blob in enumerate(blobs):
                paths.append(folder / f"{i}.bin")
                paths[-1].write_bytes(blob)

            def read(i: int, paths=paths, decode=decode) -> np.ndarray:
                with open(paths[i], "rb") as f:
                    return decode(f.read())
        else:
            offsets = np.cumsum([0] + [len(b) for b in blobs])
            container = folder / "series.bin"
            container.write_bytes(b"".join(blobs))
            fd = os.open(container, os.O_RDONLY)

            def read(i: int, fd=fd, offsets=offsets, decode=decode) -> np.ndarray:
                return decode(os.pread(fd, int(offsets[i + 1] - offsets[i]), int(offsets[i])))

        read(0)
        start = time.perf_counter()
        for i in order:
            read(i)
        read_ms = (time.perf_counter() - start) / len(order) * 1e3
        errors = np.concatenate(
            [
                np.abs(read(i).astype(np.int16) - images[i]).reshape(-1, 3)
                for i in range(0, len(images), max(1, len(images) // 32))
            ]
        )
        rows.append(
            {
                "format": name,
                "bytes_per_slice": int(np.mean([len(b) for b in blobs])),
                "encode_ms": round(encode_ms, 2),
                "read_decode_ms": round(read_ms, 2),
                "slices_per_s_per_core": round(1e3 / read_ms),
                "mae_lung_pe_med": [round(float(v), 2) for v in errors.mean(0)],
                "p99_9_err": [int(v) for v in np.percentile(errors, 99.9, axis=0)],
                "max_err": [int(v) for v in errors.max(0)],
            }
        )
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--work", type=Path, default=None, help="Scratch folder (default: a temporary one, removed after)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--repeat", type=int, default=2, help="Runs of each throughput measurement (best kept).")
    args = parser.parse_args()

    from pedetect.dicom import read_files
    from pedetect.synth import write_dataset

    cv2.setNumThreads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="pedetect-bench-"))
    data = work / "dicom"
    if not data.exists():
        print(f"writing {args.studies} synthetic studies ({args.slices} slices of {args.size}²) …", file=sys.stderr)
        write_dataset(data, args.studies, slices=args.slices, size=args.size, seed=7, progress=False)
    files = sorted(data.rglob("*.dcm"))
    print(f"{len(files)} DICOM files", file=sys.stderr)
    for path in files:  # warm the page cache for both contenders alike
        path.read_bytes()

    results: dict = {"slices": len(files), "size": args.size, "cores": os.cpu_count()}
    best = lambda runs: min(runs, key=lambda r: r["wall_s"])  # noqa: E731
    results["baseline"] = best([baseline(files, Path(tempfile.mkdtemp(dir=work))) for _ in range(args.repeat)])
    results["pedetect_1"] = best([run_prepare(data, work / "store1", 1) for _ in range(args.repeat)])
    cores = os.cpu_count() or 1
    if cores > 1:
        results[f"pedetect_{cores}"] = run_prepare(data, work / "storeN", cores)

    def rates(r: dict) -> dict:
        return {
            "slices_per_s_wall": r["slices"] / r["wall_s"],
            "slices_per_s_cpu": r["slices"] / r["cpu_s"] if r["cpu_s"] else None,
            "bytes_per_slice": r["bytes"] / r["slices"],
        }

    base, ours = rates(results["baseline"]), rates(results["pedetect_1"])
    results["speedup_wall"] = ours["slices_per_s_wall"] / base["slices_per_s_wall"]
    results["speedup_cpu"] = ours["slices_per_s_cpu"] / base["slices_per_s_cpu"]
    per_core = ours["slices_per_s_wall"]
    scaling = 1.0
    if cores > 1:
        n = rates(results[f"pedetect_{cores}"])
        scaling = n["slices_per_s_wall"] / (cores * per_core)
        results["parallel_efficiency"] = scaling
    dicom_bytes = float(np.mean([p.stat().st_size for p in files]))
    results["dicom_bytes_per_slice"] = dicom_bytes
    results["projection_rsna_16_cores_min"] = RSNA_SLICES / (per_core * 16) / 60  # CPU-bound, linear in cores
    results["projection_baseline_16_cores_min"] = RSNA_SLICES / (base["slices_per_s_wall"] * 16) / 60
    results["projection_read_gb_per_s_needed"] = per_core * 16 * dicom_bytes / 1e9

    print("format candidates …", file=sys.stderr)
    volumes, _ = read_files(files[: min(len(files), 96)])
    images = [img for v in volumes for img in v.images]
    results["formats"] = formats(images, work / "formats")

    print()
    print(
        f"{len(files)} synthetic slices of {args.size}×{args.size}, one worker each ({cores} cores on this machine)\n"
    )
    print("| contender | slices/s (wall) | slices/s (CPU) | bytes/slice |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (
        ("baseline", "naive baseline (dcmread, float windows, cv2.imwrite JPEG q95 4:2:0)"),
        ("pedetect_1", "pedetect prepare --workers 1"),
    ):
        r = rates(results[key])
        print(f"| {label} | {r['slices_per_s_wall']:.1f} | {r['slices_per_s_cpu']:.1f} | {r['bytes_per_slice']:,.0f} |")
    if cores > 1:
        r = rates(results[f"pedetect_{cores}"])
        print(
            f"| pedetect prepare --workers {cores} | {r['slices_per_s_wall']:.1f} | – | {r['bytes_per_slice']:,.0f} |"
        )
    print(f"\nspeed-up per core: {results['speedup_wall']:.2f}× (wall), {results['speedup_cpu']:.2f}× (CPU)")
    if cores > 1:
        print(
            f"parallel efficiency with {cores} workers on this machine: {results['parallel_efficiency']:.2f} (1.0 = linear; low when the cores are shared)"
        )
    print(
        f"RSNA training set (1.79 M slices) on 16 cores, CPU-bound: {results['projection_rsna_16_cores_min']:.1f} min "
        f"(baseline {results['projection_baseline_16_cores_min']:.1f} min); that pace reads "
        f"{results['projection_read_gb_per_s_needed']:.1f} GB/s of DICOM ({dicom_bytes / 1e3:.0f} kB a slice): slower storage makes it I/O-bound\n"
    )
    print(
        "| format | bytes/slice | encode ms | random read+decode ms | MAE (lung, PE, med) | 99.9th pct error | max error |"
    )
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    for row in results["formats"]:
        print(
            f"| {row['format']} | {row['bytes_per_slice']:,} | {row['encode_ms']} | {row['read_decode_ms']} | "
            f"{', '.join(map(str, row['mae_lung_pe_med']))} | {', '.join(map(str, row['p99_9_err']))} | {', '.join(map(str, row['max_err']))} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
