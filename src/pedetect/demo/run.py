"""``pedetect demo``: the whole pipeline on synthetic CTPA, small enough for a CPU in minutes.

synth (training set seed 1, test set seed 2 in RLE lossless) → prepare → train (configs/demo.yaml,
every stage and fold) → predict with report → evaluate against the test truth and the prior
baseline. Everything lands under ``--out``; a re-run resumes (prepare and train skip finished work).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pedetect.console import echo as console_echo
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, NEGATIVE_LABELS, STUDY

NEGATIVE_EXAM = NEGATIVE_LABELS[0]  # negative_exam_for_pe: below 0.5 the exam is called positive

POSITIVE_FRACTION_SYNTH = 0.31  # pedetect.synth.phantom.POSITIVE_FRACTION (not imported: --help stays fast)

SLICES = 40
SIZE = 256


@dataclass(frozen=True)
class Profile:
    """The synthetic studies a demo trains and tests on, and the recipe it trains by default."""

    name: str
    min_embolus_pixels: int  # pedetect synth --min-embolus-pixels; 0: synth's own emboli
    positive_fraction: float
    config: str  # a recipe of the repository's configs/
    test_studies: int
    about: str


PROFILES = {
    # Conspicuous emboli of at least 25 pixels on every slice they mark, half the studies positive (RSNA:
    # about a third): what a from-scratch CPU model learns in minutes (docs/stage1_notes.md).
    "conspicuous": Profile(
        "conspicuous", 25, 0.5, "demo.yaml", 30, "emboli of at least 25 pixels, half the studies positive"
    ),
    # synth's own emboli (central to subsegmental, labelled where visible: docs/synthetic_visibility.md)
    # at synth's positive rate; 60 test studies, as the twice fewer positives need.
    "realistic": Profile(
        "realistic", 0, POSITIVE_FRACTION_SYNTH, "realistic.yaml", 60, "synth's own emboli, 31 % positive"
    ),
}
DEFAULT_PROFILE = "conspicuous"
# The training set's seed; the test set's is the next one, so every --seed K gives studies the model
# never saw (the default: training seed 1, test seed 2).
TRAIN_SEED = 1
# 480 training studies (each fold's sequence head learns from 320 series): stage 2 learns the exam labels from
# whole series, so it gains most from more of them (120 -> 240 -> 480: CV 0.296 -> 0.253 -> 0.228).
TRAIN_STUDIES = 480
TEST_SYNTAX = "rle"


def seed_of_test_set(train_seed: int) -> int:
    """The test set's seed for a training seed."""
    return train_seed + 1


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step."""


def default_config(profile: str = DEFAULT_PROFILE) -> Path:
    """The profile's recipe in configs/ of the repository this package is installed from (an editable install)."""
    return Path(__file__).resolve().parents[3] / "configs" / PROFILES[profile].config


@dataclass
class DemoResult:
    out: Path
    n_train: int
    n_test: int
    evaluation: dict[str, Any]
    prior_evaluation: dict[str, Any]
    report: Path
    predict_summary: Any
    seconds: dict[str, float] = field(default_factory=dict)
    seed: int = TRAIN_SEED  # of the training set; the test set's is seed_of_test_set(seed)
    profile: str = DEFAULT_PROFILE
    localisation: dict[str, Any] | None = None  # the clot candidates' FROC (pedetect.metric.froc.froc)
    # Positive exams found at the decision by their most proximal visible clot's level, and the
    # negative exams called negative (pedetect.metric.froc.exam_sensitivity_by_level).
    exams_by_level: dict[str, dict[str, int]] | None = None
    negatives_right: tuple[int, int] | None = None

    @property
    def ratio(self) -> float:
        return self.evaluation["score"] / self.prior_evaluation["score"]

    def table(self) -> str:
        def auc(value: float | None) -> str:
            return "   n/a" if value is None else f"{value:.3f}"

        ev, prior = self.evaluation, self.prior_evaluation
        lines = [
            f"pedetect demo ({self.profile}: {PROFILES[self.profile].about}): model trained on {self.n_train} "
            f"synthetic studies (seed {self.seed}), tested on {self.n_test} others (seed {seed_of_test_set(self.seed)}, "
            f"{TEST_SYNTAX.upper()} DICOM)",
            "",
            f"{'':<24} {'model':>8} {'prior':>8}",
            f"{'score (lower is better)':<24} {ev['score']:>8.4f} {prior['score']:>8.4f}   ratio {self.ratio:.2f}",
            f"{'slice AUC':<24} {auc(ev['slice_auc']):>8} {auc(prior['slice_auc']):>8}",
            "",
            f"{'label':<24} {'AUC':>8} {'log loss':>9} {'positives':>10}",
        ]
        for label in (IMAGE_LABEL, *EXAM_LABELS):
            row = ev["labels"][label]
            loss = "n/a" if row["log_loss"] is None else f"{row['log_loss']:.4f}"
            lines.append(f"{label:<24} {auc(row['auc']):>8} {loss:>9} {row['positives']:>10}")
        if self.localisation is not None:
            froc = self.localisation
            sens, side = froc["sensitivity"], froc.get("side_agreement") or {}

            def share(value: float | None) -> str:
                return "n/a" if value is None else f"{100 * value:.0f} %"

            lines += [
                "",
                f"clot candidates: {froc['candidates']} on {froc['scans']} scans, {froc['emboli']} emboli; "
                f"found at 1 FP/scan {share(sens['1'])}, at 2 FP/scan {share(sens['2'])}; "
                f"side right for {share((side.get('2') or {}).get('fraction'))} of those found at 2 FP/scan",
            ]
        if self.exams_by_level is not None and self.negatives_right is not None:
            found = ", ".join(f"{level} {v['found']}/{v['exams']}" for level, v in self.exams_by_level.items())
            right, negatives = self.negatives_right
            lines += [
                f"exams at the decision: positives found by their most proximal visible clot: {found}; "
                f"negatives called negative {right}/{negatives}",
            ]
        lines += [
            "",
            f"report: {self.report / 'index.html'}",
            f"submission: {self.predict_summary.out}",
            "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()),
        ]
        return "\n".join(lines)


def run_demo(
    out: str | Path,
    *,
    train_studies: int = TRAIN_STUDIES,
    test_studies: int | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    seed: int = TRAIN_SEED,
    profile: str = DEFAULT_PROFILE,
    workers: int = 2,
    progress: bool = True,
    echo: Callable[[str], None] = console_echo,
) -> DemoResult:
    # The pipeline is imported here, not at the top: pedetect --help imports this module (the demo
    # command's defaults above), and must not import torch, pandas or pydicom.
    from pedetect.infer.predict import predict
    from pedetect.metric.baselines import prior_submission
    from pedetect.metric.evaluate import evaluate_files, evaluate_frames
    from pedetect.metric.froc import exam_sensitivity_by_level, froc, read_candidates, read_clots
    from pedetect.metric.submission import read_labels, read_submission
    from pedetect.models.bundle import read_bundle
    from pedetect.store import prepare
    from pedetect.synth import write_dataset
    from pedetect.synth.dataset import clots_path
    from pedetect.train.pipeline import train
    from pedetect.train.setup import read_config_for_training

    if profile not in PROFILES:
        raise DemoError(f"unknown profile {profile!r}; choose {' or '.join(PROFILES)}")
    data_profile = PROFILES[profile]
    test_studies = data_profile.test_studies if test_studies is None else test_studies
    out = Path(out)
    data, store, model = out / "data", out / "store", out / "model"
    config = Path(config) if config else default_config(profile)
    if not config.is_file():
        raise DemoError(f"demo config not found: {config} (give --config configs/{data_profile.config})")
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str) -> None:
        nonlocal started
        seconds[name] = time.perf_counter() - started
        started = time.perf_counter()

    echo(f"demo: synthetic studies into {data}")
    for split, count, split_seed, syntax in (
        ("train", train_studies, seed, "explicit"),
        ("test", test_studies, seed_of_test_set(seed), TEST_SYNTAX),
    ):
        write_dataset(
            data,
            count,
            slices=SLICES,
            size=SIZE,
            seed=split_seed,
            split=split,
            transfer_syntax=syntax,
            positive_fraction=data_profile.positive_fraction,
            min_embolus_pixels=data_profile.min_embolus_pixels,
            progress=progress,
            workers=workers,
        )
    step("synth")
    summary = prepare(data / "train", store, workers=workers, progress=progress, echo=echo)
    if not summary.ok:
        raise DemoError(f"prepare lost slices:\n{summary.text()}")
    step("prepare")
    try:
        experiment = read_config_for_training(
            config, list(overrides or []) + ([] if progress else ["logging.progress_bar=false"])
        )
        # synth's clot truth of the training studies, for recipes that learn the emboli's boxes.
        clots = clots_path(data, "train") if experiment.cnn.loss.clot_map_weight > 0 else None
        result = train(experiment, store=store, labels=data / "train.csv", out=model, clots=clots, echo=echo)
    except Exception as error:
        raise DemoError(f"train failed: {error}") from error
    cv = result.get("heart") or result.get("seq") or {}  # with a heart model, its stacked RV/LV
    if cv:
        echo(f"demo: cross-validated score {cv['score']:.4f} (prior {cv['baselines']['prior']['score']:.4f})")
    step("train")
    submission, report, candidates = out / "submission.csv", out / "report", out / "clots.csv"
    predicted = predict(
        data / "test",
        [model],
        submission,
        report_dir=report,
        sample=data / "sample_submission.csv",
        progress=progress,
        echo=echo,
        clots=candidates,
    )
    echo(predicted.text())
    if not predicted.ok:
        raise DemoError(f"predict lost data:\n{predicted.text()}")
    step("predict")
    labels = read_labels(data / "test_labels.csv")
    evaluation = evaluate_files(data / "test_labels.csv", submission)
    prior = evaluate_frames(labels, prior_submission(read_bundle(model).prior, labels), "prior baseline")
    truth = clots_path(data, "test")
    truth_frame = read_clots(truth)
    localisation = froc(truth_frame, read_candidates(candidates), studies=labels[STUDY].unique())
    predicted_rows = read_submission(submission).set_index("id")["label"]
    negative = {s: float(predicted_rows[f"{s}_{NEGATIVE_EXAM}"]) for s in labels[STUDY].unique()}
    by_level = exam_sensitivity_by_level(truth_frame, negative) if "level" in truth_frame.columns else None
    negative_studies = labels.loc[labels[NEGATIVE_EXAM] == 1, STUDY].unique()
    negatives_right = (int(sum(negative[s] >= 0.5 for s in negative_studies)), len(negative_studies))
    step("evaluate")
    seconds["total"] = sum(seconds.values())
    return DemoResult(
        out,
        train_studies,
        test_studies,
        evaluation,
        prior,
        report,
        predicted,
        seconds,
        seed=seed,
        profile=profile,
        localisation=localisation,
        exams_by_level=by_level,
        negatives_right=negatives_right,
    )
