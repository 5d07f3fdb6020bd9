"""``pedetect predict``: raw DICOM → a consistent submission (and a report), one study at a time.

Every study of the input (a folder or zip, any layout) goes through one
:class:`~pedetect.infer.predictor.Predictor` (reading with the settings of the store each bundle was
trained on, every fold of every bundle, lost slices filled in, the label rules' repair, clot
candidates); the next study is read in a background thread while the models work on this one, so
memory is two studies at most, whatever the input. Each study's
:class:`~pedetect.infer.predictor.StudyPrediction` feeds the submission rows and the report of the
study (:mod:`pedetect.infer.report`: JSON, PNG, viewer page and slices, with the model's own values
beside the final ones), written in a background thread meanwhile.

Then one CSV, in the order of ``--sample`` when given (ids the input lacks get the prior: no id of
the sample is ever missing), else the nine exam rows of every study followed by every slice.
Nothing identifies a patient here but UIDs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pedetect.console import echo as console_echo
from pedetect.dicom.guard import DEFAULT_DECODE_TIMEOUT_S
from pedetect.dicom.pixels import WINDOW_NAMES
from pedetect.dicom.series import Failure
from pedetect.infer.localise import CANDIDATE_COLUMNS, candidate_rows
from pedetect.infer.predictor import Predictor, StudyPrediction, StudyRead, study_pictures, value_text
from pedetect.infer.reader import StudyPlan, scan_input, slice_decoder
from pedetect.infer.report import ReportWriter, write_index
from pedetect.io import write_csv_atomic
from pedetect.labels import EXAM_LABELS, split_exam_id
from pedetect.metric.submission import read_submission


@dataclass
class PredictSummary:
    out: Path
    report: Path | None = None
    models: str = ""
    n_files: int = 0
    n_studies: int = 0
    n_slices_read: int = 0
    n_rows: int = 0
    n_fixed: int = 0  # studies whose rows the consistency fix changed
    studies_failed: list[tuple[str, str]] = field(default_factory=list)  # (StudyInstanceUID, error)
    lost: list[Failure] = field(
        default_factory=list
    )  # files or slices not used (each still has a row when its id is known)
    unplaced: list[Failure] = field(default_factory=list)  # unreadable files whose study is unknown
    ignored: int = 0  # files that are not DICOM and do not look like slices
    absent_from_input: int = 0  # ids of --sample that no file of the input gave (prior written)
    not_in_sample: int = 0  # ids the input gave that --sample lacks (appended at the end)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    clots: Path | None = None  # the clot candidates' CSV, when asked for
    n_candidates: int = 0

    def add(self, outcome) -> None:
        """What one study's :class:`~pedetect.infer.predictor.StudyPrediction` adds to the run's summary."""
        self.n_fixed += outcome.changed
        self.n_slices_read += outcome.n_slices_read
        self.lost += outcome.lost
        self.unplaced += outcome.unplaced
        if outcome.error is not None:
            self.studies_failed.append((outcome.result.study_uid, outcome.error))

    @property
    def ok(self) -> bool:
        return not (self.studies_failed or self.lost or self.unplaced or self.absent_from_input)

    def text(self) -> str:
        rate = self.n_slices_read / self.seconds if self.seconds > 0 else 0.0
        lines = [f"models: {self.models}"] if self.models else []
        lines += [
            f"predicted {self.n_studies} studies, {self.n_slices_read} slices read, {self.n_rows} rows written to {self.out} "
            f"in {self.seconds:.1f} s ({rate:.1f} slices/s); consistency fix changed {self.n_fixed} studies",
        ]
        if self.clots is not None:
            lines.append(f"{self.n_candidates} clot candidate(s) written to {self.clots}")
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        if self.ignored:
            lines.append(f"ignored {self.ignored} file(s) that are not DICOM")
        if self.not_in_sample:
            lines.append(
                f"warning: {self.not_in_sample} predicted id(s) are not in the sample submission (written at the end)"
            )
        if self.ok:
            lines.append("lost: nothing")
            return "\n".join(lines)
        lines.append("lost:")
        for study, error in self.studies_failed:
            lines.append(f"  study {study}: {error}")
        failed = {study for study, _ in self.studies_failed}  # their files are listed in the report
        for failure in (f for f in self.lost if f.study not in failed):
            lines.append(f"  {failure.path}: {failure.reason}" + (f" (study {failure.study})" if failure.study else ""))
        for failure in self.unplaced:
            lines.append(f"  {failure.path}: {failure.reason} (study unknown: no row)")
        if self.absent_from_input:
            lines.append(
                f"  {self.absent_from_input} id(s) of the sample submission are in no readable file: training prior written"
            )
        return "\n".join(lines)


def predict(
    input_path: str | Path,
    model_dirs: list[str | Path],
    out: str | Path,
    *,
    report_dir: str | Path | None = None,
    device: str = "auto",
    tta: bool = False,
    sample: str | Path | None = None,
    batch_size: int = 32,
    runtime: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = console_echo,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S,
    clots: str | Path | None = None,
    localise: bool = True,
    choose_series: Callable[[StudyPlan], tuple[StudyPlan | None, list[str]]] | None = None,
    on_prediction: Callable[[Predictor, StudyPrediction, StudyPlan], str | None] | None = None,
) -> PredictSummary:
    """Predict every study of ``input_path``; write ``out`` (and the report). Raises
    :class:`~pedetect.models.bundle.BundleError`, :class:`~pedetect.metric.submission.InputError`,
    ``FileNotFoundError`` or ``ValueError`` before any work when an argument is unusable; problems
    with single files or studies are in the returned summary instead. ``decode_timeout``: seconds one
    slice may take to decode, past that it is lost (:func:`pedetect.infer.reader.slice_decoder`; 0: no limit)."""
    started = time.perf_counter()
    out = Path(out)
    summary = PredictSummary(out, Path(report_dir) if report_dir else None)
    sample_ids = read_submission(sample)["id"].tolist() if sample else None
    if not Path(input_path).exists():
        raise FileNotFoundError(f"input not found: {input_path}")
    if decode_timeout < 0:
        raise ValueError(f"--decode-timeout must be 0 (no limit) or positive, got {decode_timeout:g}")
    predictor = Predictor(
        model_dirs, device=device, tta=tta, batch_size=batch_size, runtime=runtime, threads=threads, localise=localise
    )
    ensemble = predictor.ensemble
    summary.models = ensemble.description
    for path, (name, why) in zip(model_dirs, ensemble.runtimes):
        echo(f"runtime of {path}: {name} ({why})")
    for path, preprocessing in zip(model_dirs, ensemble.preprocessing):
        if not preprocessing["recorded"]:
            echo(
                f"note: {path} does not record its store's settings (preprocessing.json): reading with the prepare defaults"
            )
    timings = {"scan": 0.0, "read": 0.0, "model": 0.0, "localise": 0.0, "fix": 0.0, "report": 0.0}

    scan_started = time.perf_counter()
    with tqdm(desc="scan", unit="file", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        scan = scan_input(input_path, progress=bar.update)
    timings["scan"] = time.perf_counter() - scan_started
    summary.n_files, summary.ignored, summary.unplaced = scan.n_files, len(scan.ignored), list(scan.unplaced)
    studies = scan.studies
    if choose_series is not None:
        studies = []
        for plan in scan.studies:
            chosen, notes = choose_series(plan)
            for note in notes:
                echo(f"study {plan.study}: {note}")
            if chosen is None:
                summary.studies_failed.append((plan.study, "; ".join(notes) or "no usable series"))
            else:
                studies.append(chosen)
    summary.n_studies = len(studies)
    echo(
        f"predict: {len(scan.studies)} studies in {scan.n_files} file(s) of {input_path}; models {ensemble.description}"
    )

    rows: dict[str, str] = {}
    results = []
    # The report is written in a background thread; "report" in the timings is what prediction waited for it.
    reports = _report_writer(summary.report, ensemble) if summary.report is not None else contextlib.nullcontext()
    with reports as writer, slice_decoder(decode_timeout) as decode:
        # The viewer's slice JPEGs are encoded as soon as a study is read, while the models work on it.
        on_read = (
            (lambda read: writer.prepare(read.plan.study, study_pictures(read, ensemble.reads[0]))) if writer else None
        )
        for plan, outcome in _predict_studies(predictor, studies, progress=progress, on_read=on_read, decode=decode):
            outcome.result.timings = {k: round(v, 3) for k, v in outcome.seconds.items()}
            if on_prediction is not None:
                error = on_prediction(predictor, outcome, plan)
                if error is not None:
                    summary.studies_failed.append((plan.study, error))
            if writer is not None:
                timings["report"] += writer.submit(outcome.result, outcome.pictures, outcome.location)
            outcome.pictures = outcome.location = None  # the study's images live on only in the report's queue
            summary.add(outcome)
            rows.update(outcome.rows)
            for key, seconds in outcome.seconds.items():
                timings[key] += seconds
            results.append(outcome.result)
        if writer is not None:
            timings["report"] += writer.finish()

    if sample_ids is not None:
        order, extra = _sample_order(sample_ids, rows, predictor.prior_slice, predictor.prior_exam, summary)
    else:  # every study's nine exam rows, then every slice
        order, extra = (
            [i for i in rows if split_exam_id(i) is not None] + [i for i in rows if split_exam_id(i) is None],
            [],
        )
    submission = pd.DataFrame({"id": order + extra, "label": [rows[i] for i in order + extra]})
    write_csv_atomic(submission, out)
    summary.n_rows = len(submission)
    if clots is not None:
        found = [row for result in results for row in candidate_rows(result.study_uid, result.candidates)]
        write_csv_atomic(pd.DataFrame(found, columns=list(CANDIDATE_COLUMNS)), Path(clots))
        summary.clots = Path(clots)
        summary.n_candidates = len(found)
    summary.seconds = time.perf_counter() - started
    summary.timings = {k: round(v, 2) for k, v in timings.items()}
    if summary.report is not None:
        write_index(summary.report, results, notes=summary.text().splitlines())
    return summary


def _predict_studies(
    predictor: Predictor,
    studies: list,
    *,
    progress: bool,
    on_read: Callable[[StudyRead], None] | None = None,
    decode=None,
):
    """Each study's plan and :class:`~pedetect.infer.predictor.StudyPrediction`, in order, the next study read in
    a background thread while the models work on this one (memory: two studies at most); ``on_read``
    sees each study as soon as it is read, before the models; ``decode``: what decodes a slice (None:
    in this thread)."""
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="pedetect-read") as pool,
        tqdm(
            total=len(studies), desc="predict", unit="study", disable=not progress, file=sys.stderr, dynamic_ncols=True
        ) as bar,
    ):
        pending = pool.submit(predictor.read, studies[0], decode) if studies else None
        for i in range(len(studies)):
            assert pending is not None  # study i was submitted before the loop or in the previous turn
            read = pending.result()
            pending = pool.submit(predictor.read, studies[i + 1], decode) if i + 1 < len(studies) else None
            if on_read is not None:
                on_read(read)
            outcome = predictor.predict_read(read)
            plan = read.plan
            del read
            yield plan, outcome
            bar.update(1)


def _report_writer(report_dir: Path, ensemble):
    """The report's writer for slices read with the first bundle's settings (the images predict keeps)."""
    preprocessing = ensemble.preprocessing[0]
    view = ensemble.location_view
    return ReportWriter(
        report_dir,
        window_names=preprocessing.get("window_names") or WINDOW_NAMES,
        windows=preprocessing["windows"],
        crop=view.crop if view is not None else 1.0,
    )


def _sample_order(
    sample_ids: list[str], rows: dict[str, str], prior_slice: float, prior_exam: np.ndarray, summary: PredictSummary
):
    """The sample's ids in its order (absent ones get the prior), then predicted ids it lacks."""
    position = {label: k for k, label in enumerate(EXAM_LABELS)}
    for row_id in sample_ids:
        if row_id in rows:
            continue
        summary.absent_from_input += 1
        parsed = split_exam_id(row_id)
        rows[row_id] = value_text(prior_exam[position[parsed[1]]] if parsed else prior_slice)
    in_sample = set(sample_ids)
    extra = [row_id for row_id in rows if row_id not in in_sample]
    summary.not_in_sample = len(extra)
    return list(sample_ids), extra
