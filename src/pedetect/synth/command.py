"""``pedetect synth``: write synthetic CTPA studies in the RSNA-STR layout (docs/design.md, "Synthetic data").

Only Typer and pathlib at import time; the generator is imported when the command runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from pedetect import options
from pedetect.console import fail

# Keep in step with pedetect.synth.phantom (not imported here to keep `pedetect --help` fast).
_POSITIVE_FRACTION = 0.31
_INDETERMINATE_FRACTION = 0.02


class Split(str, Enum):
    train = "train"
    test = "test"


class Syntax(str, Enum):
    explicit = "explicit"
    rle = "rle"
    jpeg2000 = "jpeg2000"


def synth_command(
    out: Path | None = typer.Argument(
        None,
        help="Output folder: `OUT/<split>/<Study>/<Series>/<SOP>.dcm` plus the CSVs (labels, and the clot truth "
        "OUT/clots.csv or OUT/test_clots.csv) and, with --clot-seg, OUT/train_seg/ or OUT/test_seg/. "
        "Optional with --preview.",
    ),
    studies: int = typer.Option(10, "--studies", "-n", min=0, help="Number of studies to write."),
    slices: int | None = typer.Option(
        None, "--slices", min=1, help="Slices per study (default: drawn per study, 60-140)."
    ),
    size: int = typer.Option(256, "--size", min=32, help="Rows and columns of each slice, in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical pixels and labels."),
    split: Split = typer.Option(
        Split.train,
        "--split",
        help="train: OUT/train.csv and OUT/clots.csv. test: OUT/test.csv, OUT/test_labels.csv, "
        "OUT/sample_submission.csv and OUT/test_clots.csv. The clot truth has one row per embolus and slice "
        "its mask crosses (study, series, embolus number, slice name and index, its bounding box in image rows "
        "and columns, pixels, side, level, kind, artery, visible: 1 where a reader sees it, the labelled slices).",
    ),
    transfer_syntax: Syntax = typer.Option(
        Syntax.explicit, "--transfer-syntax", help="explicit VR little endian, RLE Lossless or JPEG 2000 Lossless."
    ),
    enhanced: bool = typer.Option(
        False,
        "--enhanced",
        help="Write each study as one multi-frame Enhanced CT file (frames in InstanceNumber order; "
        "slices named SOPInstanceUID#frame in the labels and the clot truth; the SEG references its frames).",
    ),
    clot_seg: bool = typer.Option(
        True,
        "--clot-seg/--no-clot-seg",
        help="Also write a DICOM Segmentation of each study's emboli, visible or not (BINARY, one segment per "
        "embolus, referencing its CT slices) as `OUT/<split>_seg/<StudyInstanceUID>.dcm` (OUT/train_seg, OUT/test_seg): "
        "beside the split's DICOM folder and not in it, since prepare and predict read every file there. "
        "About 50 ms a positive study of 40 slices at 256 px.",
    ),
    positive_fraction: float = typer.Option(
        _POSITIVE_FRACTION, "--positive-fraction", min=0.0, max=1.0, help="Expected fraction of PE-positive exams."
    ),
    indeterminate_fraction: float = typer.Option(
        _INDETERMINATE_FRACTION,
        "--indeterminate-fraction",
        min=0.0,
        max=1.0,
        help="Expected fraction of indeterminate exams (poor contrast or motion, no PE).",
    ),
    min_embolus_pixels: int = typer.Option(
        0,
        "--min-embolus-pixels",
        min=0,
        help="Conspicuous emboli: each is cut to the slices where it shows at least this many pixels, drawn "
        "in trunk to segmental arteries as before the visibility rule (0: drawn in trunk to subsegmental "
        "arteries, labelled on the slices where a reader would see it, docs/synthetic_visibility.md). "
        "pedetect demo uses 25 at 256 px, so a small CPU model trained for minutes can see them.",
    ),
    preview: Path | None = typer.Option(
        None, "--preview", help="Write a PNG montage of one positive study here (PE window, emboli outlined)."
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        "-w",
        min=1,
        help="Processes rendering studies at once (the files are the same whatever the number).",
    ),
    progress: bool = options.progress(),
) -> None:
    """Write synthetic CT pulmonary angiography studies with ground-truth PE labels.

    A chest phantom (body, lungs and vessels, heart, aorta, pulmonary arteries, spine and ribs) with
    emboli as filling defects; every label comes from the phantom's own geometry and obeys the
    challenge's consistency rules. A slice is labelled where a reader would see an embolus on it (its
    contrast, size and partial volume against the study's noise, at the slice's pixel size and
    thickness); emboli too small or faint to see stay drawn and in the clot truth, marked not visible. Scanners vary per study (slice count and spacing, pixel size,
    noise, rescale, signed/unsigned storage, instance order).
    """
    if out is None and preview is None:
        raise fail("give an output folder OUT, or --preview FILE.png")
    if positive_fraction + indeterminate_fraction > 1.0:
        raise fail("--positive-fraction plus --indeterminate-fraction must be at most 1")
    fractions = dict(positive_fraction=positive_fraction, indeterminate_fraction=indeterminate_fraction)
    if out is not None:
        from pedetect.synth.dataset import write_dataset

        labels = write_dataset(
            out,
            studies,
            slices=slices,
            size=size,
            seed=seed,
            split=split.value,
            transfer_syntax=transfer_syntax.value,
            min_embolus_pixels=min_embolus_pixels,
            progress=progress,
            enhanced=enhanced,
            workers=workers,
            clot_seg=clot_seg,
            **fractions,
        )
        import pandas as pd

        from pedetect.synth.dataset import EMBOLUS, VISIBLE, clot_seg_folder, clots_path

        n_studies = labels["StudyInstanceUID"].nunique() if len(labels) else 0
        n_pos = int(labels.groupby("StudyInstanceUID")["pe_present_on_image"].max().sum()) if len(labels) else 0
        clots = clots_path(out, split.value)
        truth = pd.read_csv(clots)
        n_emboli = len(truth.drop_duplicates(["StudyInstanceUID", EMBOLUS]))
        n_seen = len(truth[truth[VISIBLE] == 1].drop_duplicates(["StudyInstanceUID", EMBOLUS]))
        unseen = f" ({n_emboli - n_seen} visible on no slice)" if n_seen < n_emboli else ""
        segs = f", SEGs in {clot_seg_folder(out, split.value)}" if clot_seg and n_emboli else ""
        typer.echo(
            f"wrote {n_studies} studies ({n_pos} positive), {len(labels)} slices to {out / split.value}; "
            f"{n_emboli} emboli in {clots}{unseen}{segs}"
        )
    if preview is not None:
        from pedetect.synth.preview import write_preview

        write_preview(preview, seed=seed, size=size, slices=slices, split=split.value, **fractions)
        typer.echo(f"wrote preview {preview}")
