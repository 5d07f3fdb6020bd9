"""Fuzzing the whole DICOM read path (issue #22): header scan, grouping and ordering, pixel decode,
HU conversion and windowing, through :func:`pedetect.dicom.read_files` (what prepare and predict
run). The contract checked for every input: the file ends as a decoded slice or as a failure with a
reason; nothing raises, no input takes longer than :data:`TIME_LIMIT_S`, and memory does not grow
by more than :data:`MEMORY_LIMIT_MB` (the address space is capped besides, so a huge allocation
fails fast, and a failure whose reason is a MemoryError counts as a finding too).

Two drivers over the one target, :func:`check_input`:

- ``python tests/fuzz/read_fuzz.py --atheris SECONDS``: coverage-guided by atheris (``make fuzz``);
- :func:`mutation_run` (and ``--runs N --seed S``): a seeded, structure-aware mutation loop of our
  own, which the test suite runs (tests/dicom/test_read_fuzz.py) because it is reproducible.

Seeds are real files: pydicom's CT files, pydicom's MR / secondary-capture files in other transfer
syntaxes (big endian, implicit, deflate, RLE, JPEG, JPEG-LS, JPEG 2000) relabelled as CT so the
decoders are reached, and synthetic studies (``pedetect.synth``) in every transfer syntax it writes.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TIME_LIMIT_S = 5.0
MEMORY_LIMIT_MB = 512
ADDRESS_SPACE_HEADROOM = 3 << 30  # above what the process maps after its imports

MR_CLASS, SC_CLASS, CT_CLASS = (
    b"1.2.840.10008.5.1.4.1.1.4\x00",
    b"1.2.840.10008.5.1.4.1.1.7\x00",
    b"1.2.840.10008.5.1.4.1.1.2\x00",
)
# pydicom's files, each reaching another decoder once labelled as CT (the three class UIDs have one length)
RELABELLED = (
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "image_dfl.dcm",
    "JPEGLSNearLossless_16.dcm",
)
REAL_CT = ("CT_small.dcm", "693_J2KI.dcm")


class Finding(Exception):
    """An input that broke the contract."""


class _Overtime(BaseException):  # not an Exception: the read path's own handlers must not catch it
    pass


def seed_files(folder: Path) -> list[bytes]:
    """The seed corpus as bytes (synthetic studies are written under ``folder``)."""
    from pydicom.data import get_testdata_file

    from pedetect.synth import write_dataset

    seeds = [Path(get_testdata_file(name)).read_bytes() for name in REAL_CT]
    for name in RELABELLED:
        data = Path(get_testdata_file(name)).read_bytes()
        seeds.append(data.replace(MR_CLASS, CT_CLASS).replace(SC_CLASS, CT_CLASS))
    for k, syntax in enumerate(("explicit", "rle", "jpeg2000")):
        write_dataset(folder / syntax, 1, slices=2, size=32, seed=40 + k, transfer_syntax=syntax, progress=False)
        seeds += [p.read_bytes() for p in sorted((folder / syntax).rglob("*.dcm"))[:2]]
    return seeds


def limit_address_space() -> None:
    """Cap this process's address space a few GiB above its current mapping (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
    except OSError:
        return
    cap = mapped + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _on_alarm(signum, frame):
    raise _Overtime()


@dataclass
class Target:
    """The target of one fuzzing process: a scratch folder and the memory baseline."""

    folder: Path
    baseline_mb: float = field(default_factory=_peak_mb)

    def __post_init__(self) -> None:
        signal.signal(signal.SIGALRM, _on_alarm)

    def check_input(self, data: bytes) -> str:
        """Read ``data`` as one file through the read path; ``"slice"`` or ``"failure: <reason>"``,
        or :class:`Finding` when the contract is broken."""
        from pedetect.dicom import read_files

        path = self.folder / "input.dcm"
        path.write_bytes(data)
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
        try:
            series, failures = read_files([str(path)])
        except _Overtime:
            raise Finding(f"no result after {TIME_LIMIT_S} s (a hang)") from None
        except Exception as error:
            raise Finding(f"uncaught {type(error).__name__}: {error}") from error
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - started
        lost = failures + [f for s in series for f in s.failures]
        decoded = sum(len(s) for s in series)
        if decoded + len(lost) != 1:
            raise Finding(f"one file gave {decoded} slice(s) and {len(lost)} failure(s)")
        if _peak_mb() - self.baseline_mb > MEMORY_LIMIT_MB:
            raise Finding(f"memory grew by {_peak_mb() - self.baseline_mb:.0f} MB")
        if lost:
            reason = lost[0].reason
            if not reason or "MemoryError" in reason:
                raise Finding(f"failure without a usable reason: {reason!r}")
            return f"failure: {reason}"
        image = series[0].images[0]
        if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
            raise Finding(f"slice of dtype {image.dtype} and shape {image.shape}")
        return "slice" if seconds < TIME_LIMIT_S else "slice (slow)"


# ------------------------------------------------------------------------------- our mutation loop

# Tags whose values steer the decoder: sizes, formats, the transfer syntax, positions.
STEERING_TAGS = [
    (0x0028, 0x0010),
    (0x0028, 0x0011),
    (0x0028, 0x0008),
    (0x0028, 0x0100),
    (0x0028, 0x0101),
    (0x0028, 0x0102),
    (0x0028, 0x0103),
    (0x0028, 0x0002),
    (0x0028, 0x0004),
    (0x0028, 0x1052),
    (0x0028, 0x1053),
    (0x0028, 0x0120),
    (0x0020, 0x0032),
    (0x0020, 0x0037),
    (0x0002, 0x0010),
    (0x7FE0, 0x0010),
    (0x0008, 0x0016),
    (0x0020, 0x000E),
]
INTERESTING_16 = [0, 1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 64, 255, 256, 4096, 4097, 32767, 32768, 65535]
INTERESTING_TEXT = [
    b"",
    b"0",
    b"-1",
    b"1e308",
    b"nan",
    b"inf",
    b"1\\0\\0\\0\\0\\0",
    b"0\\0\\0\\0\\0\\0",
    b"999999999999",
    b"\xff\xfe",
    b"RGB",
    b"MONOCHROME1",
]


def _tag_offsets(data: bytes, group: int, element: int) -> list[int]:
    needle = struct.pack("<HH", group, element)
    found, start = [], 0
    while len(found) < 4:
        at = data.find(needle, start)
        if at < 0:
            return found
        found.append(at)
        start = at + 1
    return found


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: byte flips, interesting values in a steering tag's value or length,
    cuts, duplications, insertions."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if not out:
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            continue
        if kind < 0.45:  # a steering tag: its value (or its length field) set to something interesting
            group, element = rng.choice(STEERING_TAGS)
            offsets = _tag_offsets(bytes(out), group, element)
            if offsets:
                at = rng.choice(offsets)
                explicit_vr = out[at + 4 : at + 6].isalpha()
                value_at = at + 8
                if rng.random() < 0.3:  # the length field
                    length_at = at + 6 if explicit_vr else at + 4
                    size = 2 if explicit_vr else 4
                    if out[at + 4 : at + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
                        length_at, size = at + 8, 4
                    value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 16)]) & ((1 << (8 * size)) - 1)
                    out[length_at : length_at + size] = value.to_bytes(size, "little")
                elif rng.random() < 0.5:
                    out[value_at : value_at + 2] = struct.pack("<H", rng.choice(INTERESTING_16))
                else:
                    text = rng.choice(INTERESTING_TEXT)
                    out[value_at : value_at + len(text)] = text
                continue
        if kind < 0.65:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind < 0.75:
            del out[rng.randrange(len(out)) :]
        elif kind < 0.85:
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 256)]
        elif kind < 0.93:
            start = rng.randrange(len(out))
            out[start:start] = out[start : start + rng.randint(1, 512)]
        else:
            start = rng.randrange(len(out))
            out[start:start] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(out)


@dataclass
class RunReport:
    inputs: int = 0
    seconds: float = 0.0
    slices: int = 0
    failures: int = 0
    findings: list[tuple[str, bytes]] = field(default_factory=list)  # (what, input)


def mutation_run(
    runs: int, seed: int, folder: Path, *, on_finding: Callable[[str, bytes], None] | None = None
) -> RunReport:
    """``runs`` mutated inputs from the seed corpus (the seeds themselves first), reproducible by ``seed``."""
    rng = random.Random(seed)
    seeds = seed_files(folder / "seeds")
    target = Target(folder)
    report = RunReport()
    started = time.perf_counter()
    for k in range(runs):
        data = seeds[k] if k < len(seeds) else mutate(rng.choice(seeds), rng)
        try:
            outcome = target.check_input(data)
        except Finding as finding:
            report.findings.append((str(finding), data))
            if on_finding is not None:
                on_finding(str(finding), data)
            continue
        report.inputs += 1
        if outcome.startswith("slice"):
            report.slices += 1
        else:
            report.failures += 1
    report.inputs = runs
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------------------- the drivers


def _atheris_main(seconds: int, corpus: Path) -> None:
    import atheris

    with atheris.instrument_imports():
        import pydicom  # noqa: F401  (instrumented for coverage)

        import pedetect.dicom  # noqa: F401
    folder = Path(tempfile.mkdtemp(prefix="pedetect_fuzz_"))
    corpus.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(seed_files(folder / "seeds")):
        (corpus / f"seed_{k:02d}.dcm").write_bytes(data)
    limit_address_space()
    target = Target(folder)

    def one_input(data: bytes) -> None:
        target.check_input(data)  # a Finding is atheris's crash: it saves the input and stops

    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={seconds}",
            "-timeout=30",
            "-max_len=300000",
            f"-artifact_prefix={corpus.parent}/crash-",
            "-print_final_stats=1",
        ],
        one_input,
    )
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--atheris", type=int, metavar="SECONDS", help="coverage-guided fuzzing for SECONDS (make fuzz)"
    )
    parser.add_argument("--corpus", type=Path, default=Path("fuzz_output/corpus"), help="atheris's corpus folder")
    parser.add_argument("--runs", type=int, default=3000, help="inputs of the seeded mutation loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="write each finding's input into this folder")
    parser.add_argument("--replay", type=Path, help="check each file of this folder once (tests/data/fuzz_regressions)")
    args = parser.parse_args(argv)
    if args.atheris:
        _atheris_main(args.atheris, args.corpus)
        return 0
    limit_address_space()
    if args.replay:
        with tempfile.TemporaryDirectory(prefix="pedetect_fuzz_") as folder:
            target, broken = Target(Path(folder)), 0
            for path in sorted(args.replay.iterdir()):
                try:
                    print(f"{path.name}: {target.check_input(path.read_bytes())}", flush=True)
                except Finding as finding:
                    broken += 1
                    print(f"{path.name}: FINDING: {finding}", flush=True)
        return 1 if broken else 0

    def save(what: str, data: bytes) -> None:
        print(f"FINDING: {what}", flush=True)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"finding_{abs(hash(data)) % 10**10}.dcm").write_bytes(data)

    with tempfile.TemporaryDirectory(prefix="pedetect_fuzz_") as folder:
        report = mutation_run(args.runs, args.seed, Path(folder), on_finding=save)
    print(
        f"{report.inputs} inputs in {report.seconds:.1f} s: {report.slices} slices, {report.failures} failures, {len(report.findings)} findings"
    )
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
    sys.exit(main())
