"""``pedetect predict``: raw DICOM → a consistent submission (and a report), one study at a time.

For each study of the input (a folder or zip, any layout):

1. read: prepare's scan, ordering, decoding and windowing (:mod:`pedetect.infer.reader`), with the
   settings of the store the bundle was trained on (``MODEL_DIR/preprocessing.json``); the next
   study is read in a background thread while the models work on this one, so memory is two studies
   at most, whatever the input;
2. every fold of every bundle (:class:`~pedetect.infer.ensemble.Ensemble`): CNN → sequence head,
   probabilities averaged;
3. slices that could not be decoded get the probability interpolated from their neighbours in
   position order (unknown position: the study's mean); a study with no readable slice gets the
   training prior (made consistent) and an error line;
4. the label rules: the study's rows are repaired by ``pedetect check --fix``'s function
   (:func:`pedetect.metric.consistency.fix_submission`), on the values exactly as written;
5. the report of the study (:mod:`pedetect.infer.report`: JSON, PNG, viewer page and slices), with
   the model's own values beside the final ones, written in a background thread meanwhile.

Then one CSV, in the order of ``--sample`` when given (ids the input lacks get the prior: no id of
the sample is ever missing), else the nine exam rows of every study followed by every slice.
Nothing identifies a patient here but UIDs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from pedetect.console import echo as console_echo
from pedetect.dicom.guard import DEFAULT_DECODE_TIMEOUT_S
from pedetect.dicom.series import Failure
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SERIES, SOP, STUDY, exam_id, split_exam_id
from pedetect.metric.consistency import LOWERED

DUPLICATE = "duplicate SOPInstanceUID"


def value_text(value: float) -> str:
    """How a probability is written; the rules are checked on the value read back from this text."""
    return f"{float(value):.6g}"


@dataclass
class PredictSummary:
    out: Path
    report: Optional[Path] = None
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
    clots: Optional[Path] = None  # the clot candidates' CSV, when asked for
    n_candidates: int = 0

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


@dataclass
class _StudyRead:
    plan: Any  # reader.StudyPlan
    series: list[dict[tuple, Any]]  # per series: preprocessing key -> reader.SeriesRead
    failures: list[Failure]  # series that could not be read at all
    seconds: float


def _read_study(plan, reads: list[tuple], decode=None) -> _StudyRead:
    from pedetect.dicom.header import describe_error
    from pedetect.infer.reader import read_series_planned

    started = time.perf_counter()
    series, failures = [], []
    for headers in plan.series.values():
        try:
            series.append({key: read_series_planned(headers, key[0], key[1], decode) for key in reads})
        except Exception as error:  # a whole series unusable: its slices are lost, the batch goes on
            failures.extend(Failure.of(h, f"series unreadable ({describe_error(error)})") for h in headers)
    return _StudyRead(plan, series, failures, time.perf_counter() - started)


def consistent_prior(prior: dict[str, float]) -> tuple[float, np.ndarray]:
    """(slice value, exam values) for a study nothing is known about: the training prior, made a
    consistent negative exam by the fix's own edit (slices just below 0.5 at most)."""
    from pedetect.metric.consistency import cheapest_negative_edit

    exam = {label: float(prior[label]) for label in EXAM_LABELS}
    exam.update(cheapest_negative_edit(np.zeros(0), exam).exam)
    return min(float(prior[IMAGE_LABEL]), LOWERED), np.array([exam[label] for label in EXAM_LABELS])


def fix_study(
    study: str, slice_rows: list[tuple[str, str, float]], exam: np.ndarray
) -> tuple[list[tuple[str, str]], bool]:
    """The study's rows ``(id, text)`` (nine exam rows, then the slices) after ``check --fix``'s repair;
    ``slice_rows``: (series, sop, value). Returns the rows and whether the fix changed any."""
    from pedetect.metric.consistency import fix_submission
    from pedetect.metric.submission import align

    ids = [exam_id(study, label) for label in EXAM_LABELS] + [sop for _, sop, _ in slice_rows]
    texts = [value_text(v) for v in exam] + [value_text(v) for _, _, v in slice_rows]
    frame = pd.DataFrame({"id": ids, "label": [float(t) for t in texts], "label_text": texts})
    studies = pd.DataFrame(
        {STUDY: study, SERIES: [s for s, _, _ in slice_rows], SOP: [sop for _, sop, _ in slice_rows]}
    )
    fixed, changes = fix_submission(frame, align(frame, studies, "prediction"))
    return list(zip(fixed["id"], fixed["label_text"])), bool(changes)


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
    dicom_out: str | Path | None = None,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S,
    clots: str | Path | None = None,
    localise: bool = True,
) -> PredictSummary:
    """Predict every study of ``input_path``; write ``out`` (and the report). Raises
    :class:`~pedetect.models.bundle.BundleError`, :class:`~pedetect.metric.submission.InputError`,
    ``FileNotFoundError`` or ``ValueError`` before any work when an argument is unusable; problems
    with single files or studies are in the returned summary instead. ``decode_timeout``: seconds one
    slice may take to decode, past that it is lost (:func:`pedetect.infer.reader.slice_decoder`; 0: no limit)."""
    from tqdm.auto import tqdm

    from pedetect.infer.ensemble import Ensemble
    from pedetect.infer.reader import scan_input, slice_decoder
    from pedetect.infer.report import write_index
    from pedetect.io import write_csv_atomic
    from pedetect.metric.submission import read_submission
    from pedetect.runtime import resolve_device

    started = time.perf_counter()
    out = Path(out)
    # --dicom-out: DICOM results (pedetect.hospital) made from the report's pictures; a temporary report without --report.
    scratch = _ScratchReport(dicom_out is not None and report_dir is None)
    report_dir = report_dir or scratch.path
    summary = PredictSummary(out, Path(report_dir) if report_dir else None)
    sample_ids = read_submission(sample)["id"].tolist() if sample else None
    if not Path(input_path).exists():
        raise FileNotFoundError(f"input not found: {input_path}")
    if decode_timeout < 0:
        raise ValueError(f"--decode-timeout must be 0 (no limit) or positive, got {decode_timeout:g}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    ensemble = Ensemble(
        model_dirs,
        device=resolve_device(device),
        tta=tta,
        batch_size=batch_size,
        runtime=runtime,
        threads=threads,
        localise=localise,
    )
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
    summary.n_studies = len(scan.studies)
    echo(
        f"predict: {len(scan.studies)} studies in {scan.n_files} file(s) of {input_path}; models {ensemble.description}"
    )

    prior_slice, prior_exam = consistent_prior(ensemble.prior)
    rows: dict[str, str] = {}
    results = []
    # The report is written in a background thread; "report" in the timings is what prediction waited for it.
    reports = _report_writer(summary.report, ensemble) if summary.report is not None else contextlib.nullcontext()
    with reports as writer, slice_decoder(decode_timeout) as decode:
        # The viewer's slice JPEGs are encoded as soon as a study is read, while the models work on it.
        on_read = (
            (lambda read: writer.prepare(read.plan.study, _study_pictures(read, ensemble.reads[0]))) if writer else None
        )
        for outcome in _predict_studies(
            ensemble, scan.studies, prior_slice, prior_exam, progress=progress, on_read=on_read, decode=decode
        ):
            outcome.result.timings = {k: round(v, 3) for k, v in outcome.seconds.items()}
            if writer is not None:
                timings["report"] += writer.submit(outcome.result, outcome.pictures, outcome.location)
            outcome.pictures = outcome.location = None  # the study's images live on only in the report's queue
            outcome.add_to(summary)
            rows.update(outcome.rows)
            for key, seconds in outcome.seconds.items():
                timings[key] += seconds
            results.append(outcome.result)
        if writer is not None:
            timings["report"] += writer.finish()

    if sample_ids is not None:
        order, extra = _sample_order(sample_ids, rows, prior_slice, prior_exam, summary)
    else:  # every study's nine exam rows, then every slice
        order, extra = (
            [i for i in rows if split_exam_id(i) is not None] + [i for i in rows if split_exam_id(i) is None],
            [],
        )
    submission = pd.DataFrame({"id": order + extra, "label": [rows[i] for i in order + extra]})
    write_csv_atomic(submission, out)
    summary.n_rows = len(submission)
    if clots is not None:
        from pedetect.infer.localise import CANDIDATE_COLUMNS, candidate_rows

        found = [row for result in results for row in candidate_rows(result.study_uid, result.candidates)]
        write_csv_atomic(pd.DataFrame(found, columns=list(CANDIDATE_COLUMNS)), Path(clots))
        summary.clots = Path(clots)
        summary.n_candidates = len(found)
    summary.seconds = time.perf_counter() - started
    summary.timings = {k: round(v, 2) for k, v in timings.items()}
    if summary.report is not None:
        write_index(summary.report, results, notes=summary.text().splitlines())
    if dicom_out is not None:
        from pedetect.hospital.results import describe, write_results

        sources = {plan.study: {h.sop: h.source for hs in plan.series.values() for h in hs} for plan in scan.studies}
        for study, written, error in write_results(results, sources, summary.report, ensemble.bundles, Path(dicom_out)):
            if error is not None:
                summary.studies_failed.append((study, error))
            else:
                echo(describe(written))
        if scratch.path is not None:
            summary.report = None
    scratch.cleanup()
    return summary


class _ScratchReport:
    """A temporary report folder (removed by ``cleanup``) when ``wanted``; else ``path`` is None."""

    def __init__(self, wanted: bool):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="pedetect-report-") if wanted else None
        self.path = self._dir.name if self._dir else None

    def cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


def _predict_studies(
    ensemble,
    studies: list,
    prior_slice: float,
    prior_exam: np.ndarray,
    *,
    progress: bool,
    on_read: Optional[Callable[[_StudyRead], None]] = None,
    decode=None,
):
    """Each study's :class:`StudyOutcome`, in order, the next study read in a background thread
    while the models work on this one (memory: two studies at most); ``on_read`` sees each study
    as soon as it is read, before the models; ``decode``: what decodes a slice (None: in this thread)."""
    from tqdm.auto import tqdm

    reads = ensemble.reads
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="pedetect-read") as pool,
        tqdm(
            total=len(studies), desc="predict", unit="study", disable=not progress, file=sys.stderr, dynamic_ncols=True
        ) as bar,
    ):
        pending = pool.submit(_read_study, studies[0], reads, decode) if studies else None
        for i in range(len(studies)):
            read = pending.result()
            pending = pool.submit(_read_study, studies[i + 1], reads, decode) if i + 1 < len(studies) else None
            if on_read is not None:
                on_read(read)
            outcome = _predict_study(ensemble, read, prior_slice, prior_exam)
            del read
            yield outcome
            bar.update(1)


def _report_writer(report_dir: Path, ensemble):
    """The report's writer for slices read with the first bundle's settings (the images predict keeps)."""
    from pedetect.dicom.pixels import WINDOW_NAMES
    from pedetect.infer.report import ReportWriter

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


@dataclass
class StudyOutcome:
    """What predicting one study gives: its rows after the fix and its report record, and what it
    adds to the run's summary (the caller adds it: predicting a study changes nothing else)."""

    result: Any  # report.StudyResult
    rows: list[tuple[str, str]]  # (id, text), nine exam rows then the slices
    changed: bool  # the consistency fix changed the rows
    pictures: Optional[np.ndarray]  # the decoded slices (N, H, W, 3), for the report
    location: Optional[np.ndarray]  # (N, G, G): where on each decoded slice the CNNs see PE (Ensemble.location_view)
    n_slices_read: int
    lost: list[Failure]  # files or slices with a row but no pixels
    unplaced: list[Failure]  # lost files whose SOPInstanceUID is unknown (no row)
    error: Optional[str]  # the study had no readable slice
    seconds: dict[str, float]  # read, model, fix

    def add_to(self, summary: PredictSummary) -> None:
        summary.n_fixed += self.changed
        summary.n_slices_read += self.n_slices_read
        summary.lost += self.lost
        summary.unplaced += self.unplaced
        if self.error is not None:
            summary.studies_failed.append((self.result.study_uid, self.error))


@dataclass
class _SeriesOutputs:
    """Every series of a study through the ensemble, before the lost slices are filled in."""

    decoded: list[tuple[str, str, float, float]]  # (series, sop, z, probability), position order
    placed: list[tuple[str, Failure, float]]  # lost slices between decoded neighbours: (series, failure, probability)
    unplaced: list[tuple[str, Failure]]  # lost slices whose place is unknown: (series, failure)
    exams: list[np.ndarray]  # each series' exam probabilities
    weights: list[int]  # each series' decoded slices
    locations: list[Optional[np.ndarray]]  # each series' location grid per slice (None: no grid)
    candidates: list = field(default_factory=list)  # localise.Candidate of every series
    localise_seconds: float = 0.0


def _run_series(ensemble, read: _StudyRead) -> _SeriesOutputs:
    """Each readable series through the ensemble; lost slices with a known place get the value
    interpolated between their decoded neighbours in position order."""
    outputs = _SeriesOutputs([], [], [], [], [], [])
    for series in read.series:
        first = series[ensemble.reads[0]]
        lost = [(first.series, failure, place) for failure, place in first.lost]
        if not len(first):
            outputs.unplaced += [(series_uid, failure) for series_uid, failure, _ in lost]
            continue
        prediction = ensemble.predict_series({key: s.images for key, s in series.items()})
        if prediction.maps is not None:
            started = time.perf_counter()
            outputs.candidates += _series_candidates(ensemble, first, prediction, len(outputs.decoded))
            outputs.localise_seconds += time.perf_counter() - started
        probabilities = prediction.slices
        outputs.exams.append(prediction.exams)
        outputs.weights.append(len(first))
        outputs.locations.append(prediction.location)
        outputs.decoded += [
            (first.series, sop, float(z), float(p)) for sop, z, p in zip(first.sop_uids, first.z, probabilities)
        ]
        for series_uid, failure, place in lost:
            if math.isnan(place):
                outputs.unplaced.append((series_uid, failure))
            else:
                outputs.placed.append((series_uid, failure, float(np.interp(place, first.position, probabilities))))
    return outputs


def _series_candidates(ensemble, first, prediction, picture_offset: int) -> list:
    """Clot candidates of one series from its activation maps (:mod:`pedetect.infer.localise`)."""
    from pedetect.infer.localise import SliceGeometry, find_candidates

    return find_candidates(
        prediction.maps,
        prediction.slices,
        first.images,
        [SliceGeometry.of(h) for h in first.slices],
        first.sop_uids,
        first.position,
        series=first.series,
        windows=ensemble.reads[0][0],
        picture_offset=picture_offset,
    )


def fill_lost(
    decoded_sops: set[str], placed: list[tuple[str, Failure, float]], unplaced: list[tuple[str, Failure]], mean: float
) -> tuple[list[tuple[str, str, float]], list[tuple[str, Failure, float]], list[Failure], list[Failure]]:
    """Rows for the slices that could not be decoded: interpolated where their place is known, the
    study's mean elsewhere. Returns (rows (series, sop, value) to add, every lost slice with its
    value, the lost ones that still get a row or had one, the ones with no SOPInstanceUID: no row)."""
    filled = placed + [(series_uid, failure, mean) for series_uid, failure in unplaced]
    seen = set(decoded_sops)
    rows, lost, no_row = [], [], []
    for series_uid, failure, value in filled:
        if failure.sop is None:
            no_row.append(failure)
            continue
        if failure.sop and failure.sop not in seen:
            seen.add(failure.sop)
            rows.append((series_uid, failure.sop, value))
        lost.append(failure)
    return rows, filled, lost, no_row


def _predict_study(ensemble, read: _StudyRead, prior_slice: float, prior_exam: np.ndarray) -> StudyOutcome:
    """One study's rows after the fix, its report record and its decoded images (for the picture)."""
    from pedetect.infer.localise import number_candidates
    from pedetect.infer.report import StudyResult

    plan = read.plan
    started = time.perf_counter()
    outputs = _run_series(ensemble, read)
    decoded = outputs.decoded
    unplaced = outputs.unplaced + [(failure.series or "", failure) for failure in read.failures]
    skipped = [f for f in plan.failures if f.reason.startswith(DUPLICATE)]  # the kept copy has the row
    unplaced += [(f.series or "", f) for f in plan.failures if not f.reason.startswith(DUPLICATE)]
    model_seconds = time.perf_counter() - started

    error = None
    if decoded:
        exam = np.average(np.stack(outputs.exams), axis=0, weights=outputs.weights)
        mean = float(np.mean([p for *_, p in decoded]))
    else:
        exam, mean = prior_exam, prior_slice
        error = f"no readable slice in {plan.n_files} file(s): training prior written"
    fills, filled, lost, no_row = fill_lost({sop for _, sop, _, _ in decoded}, outputs.placed, unplaced, mean)

    started = time.perf_counter()
    slice_rows = [(s, sop, p) for s, sop, _, p in decoded] + fills
    study_rows, changed = fix_study(plan.study, slice_rows, exam)
    fix_seconds = time.perf_counter() - started
    final = dict(study_rows)
    seconds = {
        "read": read.seconds,
        "model": model_seconds - outputs.localise_seconds,
        "localise": outputs.localise_seconds,
        "fix": fix_seconds,
    }
    result = StudyResult(
        study_uid=plan.study,
        exam_probabilities={label: float(final[exam_id(plan.study, label)]) for label in EXAM_LABELS},
        sop_uids=[sop for _, sop, _, _ in decoded],
        z=[z for _, _, z, _ in decoded],
        slice_probabilities=[float(final[sop]) for _, sop, _, _ in decoded],
        model_exam_probabilities={label: float(v) for label, v in zip(EXAM_LABELS, exam)},
        model_slice_probabilities=[p for *_, p in decoded],
        skipped_files=[
            {
                "path": f.path,
                "reason": f.reason,
                "SOPInstanceUID": f.sop,
                "written_probability": float(final[f.sop]) if f.sop in final else None,
            }
            for _, f, _ in filled
        ]
        + [{"path": f.path, "reason": f.reason, "SOPInstanceUID": f.sop, "written_probability": None} for f in skipped],
        timings=dict(seconds),
        error=error,
        candidates=[candidate.record() for candidate in number_candidates(outputs.candidates)],
    )
    if ensemble.operating_points is not None and decoded:
        result.operating_points = [
            {"name": p["name"], "threshold": p["threshold"], "decision": result.pe_probability > p["threshold"]}
            for p in ensemble.operating_points["points"]
        ]
    pictures = _study_pictures(read, ensemble.reads[0])
    location = _concatenate(outputs.locations) if all(grid is not None for grid in outputs.locations) else None
    return StudyOutcome(result, study_rows, changed, pictures, location, len(decoded), lost, no_row, error, seconds)


def _study_pictures(read: _StudyRead, key: tuple) -> Optional[np.ndarray]:
    """The study's decoded slices read with ``key``, (N, H, W, 3): its rows' order (series after series)."""
    return _concatenate([series[key].images for series in read.series if len(series[key])])


def _concatenate(per_series: list[np.ndarray]) -> Optional[np.ndarray]:
    """The study's series one after the other (the order of its rows), without a copy for one series."""
    return per_series[0] if len(per_series) == 1 else (np.concatenate(per_series) if per_series else None)
