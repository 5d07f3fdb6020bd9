"""One study through the models: :class:`Predictor`, loaded once from bundles, predicts a study's
series and returns one value, :class:`StudyPrediction` — the submission rows after the label rules'
repair, the report record (slice and exam probabilities, the model's and the written ones, clot
candidates, the decisions at the bundle's operating points), the decoded pictures and what was lost.
``pedetect predict`` (:mod:`pedetect.infer.predict`), ``pedetect serve`` and ``predict --dicomweb``
are consumers of that value: the submission CSV, the report, the DICOM results and the alerts are
made from it.

For each study:

1. read: prepare's ordering, decoding and windowing (:mod:`pedetect.infer.reader`) with the
   settings of the store each bundle was trained on;
2. every fold of every bundle (:class:`~pedetect.infer.ensemble.Ensemble`): CNN → sequence head,
   probabilities averaged; clot candidates from the CNNs' activation maps (:mod:`pedetect.infer.localise`);
3. slices that could not be decoded get the probability interpolated from their neighbours in
   position order (unknown position: the study's mean); a study with no readable slice gets the
   training prior (made consistent) and an error;
4. the label rules: the study's rows are repaired by ``pedetect check --fix``'s function
   (:func:`pedetect.metric.consistency.fix_submission`), on the values exactly as written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pedetect.dicom.header import describe_error
from pedetect.dicom.pixels import WINDOW_NAMES
from pedetect.dicom.series import Failure
from pedetect.infer.ensemble import Ensemble
from pedetect.infer.localise import SliceGeometry, find_candidates, number_candidates
from pedetect.infer.reader import StudyPlan, read_series_planned
from pedetect.infer.report import StudyResult, study_picture
from pedetect.labels import EXAM_LABELS, IMAGE_LABEL, SERIES, SOP, STUDY, exam_id
from pedetect.metric.consistency import LOWERED, cheapest_negative_edit, fix_submission
from pedetect.metric.submission import align
from pedetect.runtime import resolve_device

DUPLICATE = "duplicate SOPInstanceUID"


def value_text(value: float) -> str:
    """How a probability is written; the rules are checked on the value read back from this text."""
    return f"{float(value):.6g}"


@dataclass
class StudyRead:
    plan: Any  # reader.StudyPlan
    series: list[dict[tuple, Any]]  # per series: preprocessing key -> reader.SeriesRead
    failures: list[Failure]  # series that could not be read at all
    seconds: float


def read_study(plan, reads: list[tuple], decode=None) -> StudyRead:
    started = time.perf_counter()
    series: list[dict] = []
    failures: list[Failure] = []
    for headers in plan.series.values():
        try:
            series.append({key: read_series_planned(headers, key[0], key[1], decode) for key in reads})
        except Exception as error:  # a whole series unusable: its slices are lost, the batch goes on
            failures.extend(Failure.of(h, f"series unreadable ({describe_error(error)})") for h in headers)
    return StudyRead(plan, series, failures, time.perf_counter() - started)


def consistent_prior(prior: dict[str, float]) -> tuple[float, np.ndarray]:
    """(slice value, exam values) for a study nothing is known about: the training prior, made a
    consistent negative exam by the fix's own edit (slices just below 0.5 at most)."""
    exam = {label: float(prior[label]) for label in EXAM_LABELS}
    exam.update(cheapest_negative_edit(np.zeros(0), exam).exam)
    return min(float(prior[IMAGE_LABEL]), LOWERED), np.array([exam[label] for label in EXAM_LABELS])


def fix_study(
    study: str, slice_rows: list[tuple[str, str, float]], exam: np.ndarray
) -> tuple[list[tuple[str, str]], bool]:
    """The study's rows ``(id, text)`` (nine exam rows, then the slices) after ``check --fix``'s repair;
    ``slice_rows``: (series, sop, value). Returns the rows and whether the fix changed any."""
    ids = [exam_id(study, label) for label in EXAM_LABELS] + [sop for _, sop, _ in slice_rows]
    texts = [value_text(v) for v in exam] + [value_text(v) for _, _, v in slice_rows]
    frame = pd.DataFrame({"id": ids, "label": [float(t) for t in texts], "label_text": texts})
    studies = pd.DataFrame(
        {STUDY: study, SERIES: [s for s, _, _ in slice_rows], SOP: [sop for _, sop, _ in slice_rows]}
    )
    fixed, changes = fix_submission(frame, align(frame, studies, "prediction"))
    return list(zip(fixed["id"], fixed["label_text"])), bool(changes)


@dataclass
class StudyPrediction:
    """What predicting one study gives, one value for every consumer: the submission rows after the
    label rules' repair, the report record (slice rows, exam outputs as the model's values and the
    written ones, clot candidates, decisions at the operating points), the decoded pictures and the
    lost slices. Predicting a study changes nothing else."""

    result: StudyResult
    rows: list[tuple[str, str]]  # (id, text), nine exam rows then the slices
    changed: bool  # the consistency fix changed the rows
    pictures: np.ndarray | None  # the decoded slices (N, H, W, 3), for the report
    location: np.ndarray | None  # (N, G, G): where on each decoded slice the CNNs see PE (Ensemble.location_view)
    n_slices_read: int
    lost: list[Failure]  # files or slices with a row but no pixels
    unplaced: list[Failure]  # lost files whose SOPInstanceUID is unknown (no row)
    error: str | None  # the study had no readable slice
    seconds: dict[str, float]  # read, model, localise, fix


@dataclass
class _SeriesOutputs:
    """Every series of a study through the ensemble, before the lost slices are filled in."""

    decoded: list[tuple[str, str, float, float]]  # (series, sop, z, probability), position order
    placed: list[tuple[str, Failure, float]]  # lost slices between decoded neighbours: (series, failure, probability)
    unplaced: list[tuple[str, Failure]]  # lost slices whose place is unknown: (series, failure)
    exams: list[np.ndarray]  # each series' exam probabilities
    weights: list[int]  # each series' decoded slices
    locations: list[np.ndarray | None]  # each series' location grid per slice (None: no grid)
    candidates: list = field(default_factory=list)  # localise.Candidate of every series
    localise_seconds: float = 0.0


def _run_series(ensemble, read: StudyRead) -> _SeriesOutputs:
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


def predict_read(ensemble, read: StudyRead, prior_slice: float, prior_exam: np.ndarray) -> StudyPrediction:
    """One study's rows after the fix, its report record and its decoded images (for the picture)."""
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
    pictures = study_pictures(read, ensemble.reads[0])
    grids = [grid for grid in outputs.locations if grid is not None]
    location = _concatenate(grids) if len(grids) == len(outputs.locations) else None
    return StudyPrediction(result, study_rows, changed, pictures, location, len(decoded), lost, no_row, error, seconds)


def study_pictures(read: StudyRead, key: tuple) -> np.ndarray | None:
    """The study's decoded slices read with ``key``, (N, H, W, 3): its rows' order (series after series)."""
    return _concatenate([series[key].images for series in read.series if len(series[key])])


def _concatenate(per_series: list[np.ndarray]) -> np.ndarray | None:
    """The study's series one after the other (the order of its rows), without a copy for one series."""
    return per_series[0] if len(per_series) == 1 else (np.concatenate(per_series) if per_series else None)


class Predictor:
    """Every fold of every bundle, loaded once (runtime and device chosen once), for one study at a
    time: :meth:`predict_study` (a planned study of :func:`pedetect.infer.reader.scan_input`) or
    :meth:`predict_headers` (one study's chosen series, as :func:`pedetect.dicom.read.scan_files`
    gives their headers). Each returns a :class:`StudyPrediction`."""

    def __init__(
        self,
        model_dirs: Sequence[str | Path],
        *,
        device: str = "auto",
        tta: bool = False,
        batch_size: int = 32,
        runtime: str = "auto",
        threads: int | None = None,
        localise: bool = True,
    ):
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        self.model_dirs = [Path(d) for d in model_dirs]
        self.ensemble = Ensemble(
            list(model_dirs),
            device=resolve_device(device),
            tta=tta,
            batch_size=batch_size,
            runtime=runtime,
            threads=threads,
            localise=localise,
        )
        self.prior_slice, self.prior_exam = consistent_prior(self.ensemble.prior)

    @property
    def description(self) -> str:
        return self.ensemble.description

    @property
    def bundles(self) -> list:
        return self.ensemble.bundles

    @property
    def reads(self) -> list[tuple]:
        """The distinct readings (windows, image size) the bundles need; the first is the report's."""
        return self.ensemble.reads

    @property
    def window_names(self) -> list[str]:
        """The names of the report pictures' channels (the first reading's windows)."""
        return list(self.ensemble.preprocessing[0].get("window_names") or WINDOW_NAMES)

    def picture(self, prediction: StudyPrediction) -> np.ndarray | None:
        """The study's report picture as an RGB array (the slice curve, the most suspicious slices, the
        clot candidates marked): what the report PNG shows and the DICOM secondary capture holds."""
        return study_picture(prediction.result, prediction.pictures, self.window_names)

    def read(self, plan, decode=None) -> StudyRead:
        """A planned study's series read with every reading the bundles need (``decode``: what decodes a slice)."""
        return read_study(plan, self.reads, decode)

    def predict_read(self, read: StudyRead) -> StudyPrediction:
        return predict_read(self.ensemble, read, self.prior_slice, self.prior_exam)

    def predict_study(self, plan, decode=None) -> StudyPrediction:
        """One planned study (:class:`pedetect.infer.reader.StudyPlan`), read and predicted."""
        return self.predict_read(self.read(plan, decode))

    def predict_headers(
        self, study: str, headers: Sequence[Any], failures: Sequence[Failure] = (), decode=None
    ) -> StudyPrediction:
        """One study's chosen series, given as the headers of its slices (from one scan of the files);
        ``failures``: its files whose header could not be read (lost, each named)."""
        plan = StudyPlan(study, failures=list(failures))
        for header in headers:
            plan.series.setdefault(header.series, []).append(header)
        return self.predict_study(plan, decode)
