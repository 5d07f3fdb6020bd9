"""A study's answer as DICOM: the consumers of :class:`~pedetect.infer.predictor.StudyPrediction`
that ``pedetect predict --dicom-out``, ``predict --dicomweb`` and ``pedetect serve`` share.

- :class:`SeriesChoice`: ``predict``'s ``choose_series`` hook — each study restricted to its CTPA
  series (:mod:`pedetect.hospital.selection`, on the headers ``predict`` scanned: nothing is read
  twice), the choice's notes kept for the SR;
- :class:`DicomAnswer`: ``predict``'s ``on_prediction`` hook — the study's SR, SC, KOS and SEG
  (:mod:`pedetect.hospital.results`) made from the prediction itself (the report picture rendered in
  memory, the slices' own files as references), written to a folder and, with a destination, sent.

Nothing is copied, linked or read back from a report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pedetect.console import echo as console_echo
from pedetect.hospital.identity import algorithm_of
from pedetect.hospital.results import describe, write_study_results
from pedetect.hospital.selection import MIN_SLICES, Selection, select_headers
from pedetect.infer.reader import StudyPlan


class SeriesChoice:
    """Choose each study's CTPA series among the headers ``predict`` scanned; ``notes`` keeps, per
    study, what was chosen and why the other series were not (the SR's comments)."""

    def __init__(self, min_slices: int = MIN_SLICES):
        self.min_slices = min_slices
        self.notes: dict[str, list[str]] = {}
        self.selections: dict[str, Selection] = {}

    def __call__(self, plan) -> tuple[Any | None, list[str]]:
        headers = [header for series in plan.series.values() for header in series]
        # Files whose header could not be read go with the chosen series: predict names them lost.
        unreadable = [failure for failure in plan.failures if not failure.reason.startswith("duplicate")]
        selection = select_headers(headers, unreadable, self.min_slices)
        notes = selection.notes()
        self.notes[plan.study] = notes
        self.selections[plan.study] = selection
        if selection.chosen is None:
            return None, ["no usable CT series: " + "; ".join(notes[1:])] if len(notes) > 1 else notes
        chosen = StudyPlan(plan.study, {selection.chosen.uid: list(selection.chosen.headers)}, list(plan.failures))
        return chosen, notes


class DicomAnswer:
    """Write (and with ``send``, deliver) the DICOM results of each predicted study into
    ``out_dir/<study>/``; ``notes``: per study, lines for the SR's comments (a :class:`SeriesChoice`'s).
    As ``predict``'s ``on_prediction`` it returns an error for the run's summary, or None."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        notes: dict[str, list[str]] | None = None,
        send: Callable[[list[Path]], None] | None = None,
        sent_to: str = "",
        echo: Callable[[str], None] = console_echo,
    ):
        self.out_dir = Path(out_dir)
        self.notes = notes if notes is not None else {}
        self.send = send
        self.sent_to = sent_to
        self.echo = echo
        self.written: dict[str, Any] = {}  # study -> results.StudyDicom

    def write(self, predictor, prediction, plan):
        """The study's DICOM results (:class:`~pedetect.hospital.results.StudyDicom`); raises when they
        cannot be made."""
        sources = {header.sop: header.source for series in plan.series.values() for header in series}
        return write_study_results(
            prediction.result,
            sources,
            predictor.picture(prediction),
            algorithm_of(predictor.bundles),
            self.out_dir,
            notes=self.notes.get(plan.study, []),
        )

    def __call__(self, predictor, prediction, plan) -> str | None:
        try:
            written = self.write(predictor, prediction, plan)
            self.written[plan.study] = written
            self.echo(describe(written))
            if self.send is not None:
                self.send(written.files)
                self.echo(f"study {plan.study}: results stored ({self.sent_to})")
        except Exception as error:  # this study's results lost, the others go on
            return f"DICOM results not written or not stored: {type(error).__name__}: {str(error)[:200]}"
        return None
