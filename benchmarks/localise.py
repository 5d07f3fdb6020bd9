"""What clot localisation adds to ``pedetect predict``: seconds per 250-slice 512 × 512 study.

One synthetic positive study, one random-weight bundle of the demo recipe (weights do not change the
time), ``predict`` run in this process with localisation off (``localise=False``: no activation maps,
no candidates) and on (maps from the same CNN pass, peaks, outlines, sides), alternately, ``--repeats``
times each; the ratio is on / off in the same process. The summary's ``localise`` timing is the
candidate search alone (the maps' share is in ``model``).

    python benchmarks/localise.py [--slices 250] [--size 512] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    args = parser.parse_args()

    from pedetect.infer.predict import predict
    from pedetect.recipe import load_experiment
    from pedetect.synth.dataset import write_dataset
    from pedetect.testing import write_random_bundle

    with tempfile.TemporaryDirectory(prefix="pedetect-bench-localise-") as scratch:
        root = Path(scratch)
        write_dataset(
            root / "data",
            1,
            slices=args.slices,
            size=args.size,
            seed=11,
            split="test",
            positive_fraction=0.98,
            progress=False,
        )
        config = load_experiment(args.config)
        model = write_random_bundle(config, root / "model", folds=config.data.folds)
        times: dict[bool, list[float]] = {False: [], True: []}
        search: list[float] = []
        for repeat in range(args.repeats + 1):  # the first round warms up (imports, allocator)
            for localise in (False, True):
                started = time.perf_counter()
                summary = predict(
                    root / "data" / "test",
                    [model],
                    root / "submission.csv",
                    progress=False,
                    echo=lambda line: None,
                    threads=args.threads,
                    runtime="torch",
                    localise=localise,
                    clots=root / "clots.csv" if localise else None,
                )
                seconds = time.perf_counter() - started
                if repeat:
                    times[localise].append(seconds)
                    if localise:
                        search.append(summary.timings.get("localise", 0.0))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"predict, one {args.slices}-slice {args.size}x{args.size} study, {config.name} recipe, median of {args.repeats}:"
        )
        print(f"  localisation off {off:.2f} s, on {on:.2f} s: +{on - off:.2f} s ({on / off:.2f} x)")
        print(f"  of which the candidate search (peaks, outlines, sides): {statistics.median(search):.2f} s")


if __name__ == "__main__":
    main()
