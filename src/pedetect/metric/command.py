"""``pedetect evaluate`` and ``pedetect check``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from pedetect.console import fail
from pedetect.labels import SERIES, STUDY


def evaluate_command(
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="Ground truth in the RSNA train.csv columns (one row per slice); with --clots, its studies are the scans.",
    ),
    submission: Path | None = typer.Option(
        None, "--submission", help="Submission CSV: id,label; one row per slice and nine per study."
    ),
    clots: Path | None = typer.Option(
        None,
        "--clots",
        help="Emboli truth (pedetect synth's clots.csv): one row per embolus and slice. Needs --candidates.",
    ),
    candidates: Path | None = typer.Option(
        None, "--candidates", help="Candidates (pedetect predict --clots): one row per candidate. Needs --clots."
    ),
    plot: Path | None = typer.Option(None, "--plot", help="Write the FROC figure here (PNG). Needs --clots."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object (key 'score' is the metric, key 'froc' the FROC) instead of tables.",
    ),
    report_dir: Path | None = typer.Option(
        None,
        "--report",
        help="Write a validation report into this folder: report.json, index.html and PNG figures "
        "(AUROC with bootstrap 95% CIs, operating points, calibration; docs/evaluation.md). Needs --labels and --submission.",
    ),
    dicom: Path | None = typer.Option(
        None,
        "--dicom",
        help="The studies' DICOM (a folder in any layout, or a zip): subgroups by manufacturer, model, slice "
        "thickness, kernel, contrast timing and slice count in the report. Needs --report.",
    ),
    operating_points: Path | None = typer.Option(
        None,
        "--operating-points",
        help="Operating points from pedetect calibrate (a model folder or its operating_points.json): the "
        "exam-level decision is reported at each, besides 0.5. Needs --report.",
    ),
    bootstrap: int = typer.Option(
        2000, "--bootstrap", min=1, help="Bootstrap resamples of the studies for the report's 95% intervals."
    ),
    seed: int = typer.Option(2020, "--seed", min=0, help="Seed of the report's bootstrap."),
) -> None:
    """Score a submission with the competition metric (weighted log loss; lower is better), and/or
    embolus candidates with a per-embolus FROC.

    With --labels and --submission: prints the score, its image and exam parts, and log loss and ROC
    AUC per label. Every id of the labels must be in the submission and no other: missing, unknown or
    duplicate ids, and values that are not probabilities, are errors (exit 2).

    With --clots and --candidates: prints the sensitivity per embolus at 0.5, 1, 2 and 4 false
    positives per scan, overall, per side and per size (docs/localisation.md). The scans are the
    studies of --labels when given, else those named in the two files (a warning says so).

    With --report DIR: also a validation report in DIR (report.json, index.html, figures; opens from
    file://): every AUROC with a 95% interval (bootstrap over studies), sensitivity, specificity, PPV
    and NPV with Wilson intervals at 0.5 and at --operating-points, calibration, subgroups by the
    studies' own headers (--dicom), and the FROC when --clots and --candidates are given
    (docs/evaluation.md).
    """
    import json

    from pedetect.metric.submission import InputError

    if (clots is None) != (candidates is None):
        given, needed = ("--clots", "--candidates") if candidates is None else ("--candidates", "--clots")
        raise fail(f"{given} needs {needed}: the FROC scores the candidates against the emboli truth")
    scoring_froc = clots is not None
    if plot is not None and not scoring_froc:
        raise fail("--plot draws the FROC: give --clots and --candidates with it")
    if submission is not None and labels is None:
        raise fail("--submission needs --labels (the ground truth to score it against)")
    if not scoring_froc and (labels is None or submission is None):
        raise fail("give --labels and --submission (the competition metric), or --clots and --candidates (the FROC)")
    if report_dir is not None and submission is None:
        raise fail("--report needs --labels and --submission (the report is of a submission scored against labels)")
    for option, name in ((dicom, "--dicom"), (operating_points, "--operating-points")):
        if option is not None and report_dir is None:
            raise fail(f"{name} adds to the validation report: give --report DIR with it")

    report: dict = {}
    result = None
    try:
        if submission is not None and report_dir is None:
            from pedetect.metric.evaluate import evaluate_files

            assert labels is not None  # --submission needs --labels (checked above)
            report = evaluate_files(labels, submission)
        elif submission is not None:
            assert labels is not None  # --submission needs --labels (checked above)
            result = _validation(labels, submission, dicom, operating_points, bootstrap, seed)
            report = result.report
        if scoring_froc:
            from pedetect.metric.froc import froc_report, read_candidates, read_clots, read_scan_studies

            studies = read_scan_studies(labels) if labels is not None else None
            assert clots is not None and candidates is not None  # scoring_froc: both given (checked above)
            report["froc"] = froc_report(read_clots(clots), read_candidates(candidates), studies)
    except InputError as error:
        raise fail(str(error)) from None
    if result is not None:
        from pedetect.metric.validation_page import write_report

        assert report_dir is not None  # result is only made with --report
        written = write_report(result, report_dir)
        typer.echo(f"wrote {written['index']} and {written['report']}", err=True)

    if scoring_froc and labels is None:
        typer.echo(
            f"warning: no --labels: the scans are the {report['froc']['scans']} studies named in {clots} or "
            f"{candidates}; a study with neither an embolus nor a candidate is not counted (FP per scan may be too high)",
            err=True,
        )
    if plot is not None:
        from pedetect.metric.froc import plot_froc

        typer.echo(f"wrote {plot_froc(report['froc'], plot)}", err=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    parts = []
    if submission is not None:
        from pedetect.metric.evaluate import format_report

        parts.append(format_report(report))
    if result is not None:
        from pedetect.metric.validation import format_validation

        parts.append(format_validation(report))
    if scoring_froc:
        from pedetect.metric.froc import format_froc

        parts.append(format_froc(report["froc"]))
    typer.echo("\n\n".join(parts))


def _validation(labels: Path, submission: Path, dicom: Path | None, points: Path | None, resamples: int, seed: int):
    """The validation report's numbers (:func:`pedetect.metric.validation.validation_report`) for the
    evaluate command; input problems raise :class:`~pedetect.metric.submission.InputError`."""
    from pedetect.metric.calibrate import OperatingPointsError, read_operating_points_file, resolve_operating_points
    from pedetect.metric.submission import InputError, read_labels, read_submission
    from pedetect.metric.validation import operating_points_from_record, validation_report

    label_frame = read_labels(labels)
    submission_frame = read_submission(submission)
    record, source = None, ""
    if points is not None:
        from pedetect.io import file_sha256

        path = resolve_operating_points(points)
        try:
            record = read_operating_points_file(path)
        except OperatingPointsError as error:
            raise InputError(str(error)) from None
        source = str(path)
        recorded = record.get("source")
        same = isinstance(recorded, dict) and recorded.get("submission_sha256") == file_sha256(submission)
        for point in record["points"]:
            point["same_submission"] = same
    attributes = info = None
    if dicom is not None:
        from pedetect.metric.subgroups import study_attributes

        if not dicom.exists():
            raise InputError(f"--dicom: not found: {dicom}")
        series_of = label_frame.groupby(STUDY, sort=False)[SERIES].unique().to_dict()
        attributes, info = study_attributes(label_frame[STUDY].unique(), dicom, series_of)
    return validation_report(
        label_frame,
        submission_frame,
        submission_path=submission,
        labels_path=labels,
        operating_points=operating_points_from_record(record, source),
        attributes=attributes,
        subgroup_info=info,
        resamples=resamples,
        seed=seed,
    )


def calibrate_command(
    labels: Path = typer.Option(
        ..., "--labels", help="Ground truth in the RSNA train.csv columns (one row per slice)."
    ),
    submission: Path = typer.Option(
        ..., "--submission", help="The model's predictions for those studies (e.g. MODEL_DIR/seq/oof_predictions.csv)."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="The model folder: the points are recorded as MODEL_DIR/operating_points.json."
    ),
    target_sensitivity: float = typer.Option(
        0.95, "--target-sensitivity", min=0.0, max=1.0, help="The sensitivity the first point must reach."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the points here instead of into --model."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON instead of a table."),
) -> None:
    """Choose thresholds for the exam-level PE decision (an exam is positive when its highest slice
    probability is above the threshold) on labelled studies, and record them in the model folder.

    Two points: the highest threshold whose sensitivity is at least --target-sensitivity, and the
    threshold of the largest Youden's J (sensitivity + specificity - 1); each with its sensitivity
    and specificity and their Wilson 95% intervals on these studies. The thresholds are the studies'
    own scores: choose them on studies the model did not train on (out-of-fold predictions), and
    validate them on others (pedetect evaluate --report DIR --operating-points MODEL_DIR).
    """
    import json

    from pedetect.metric.calibrate import (
        calibrate_files,
        format_operating_points,
        operating_points_file,
        write_operating_points,
    )
    from pedetect.metric.submission import InputError

    if model is None and out is None:
        raise fail("give --model MODEL_DIR (the points go into the bundle) or --out FILE")
    if model is not None and not model.is_dir():
        raise fail(f"--model: not a folder: {model}")
    if target_sensitivity <= 0:
        raise fail("--target-sensitivity must be above 0")
    try:
        record = calibrate_files(labels, submission, target_sensitivity)
    except InputError as error:
        raise fail(str(error)) from None
    if out is not None:
        target = out
    else:
        assert model is not None  # --model or --out is required (checked above)
        target = operating_points_file(model)
    path = write_operating_points(record, target)
    typer.echo(f"wrote {path}", err=True)
    typer.echo(json.dumps(record, indent=2) if as_json else format_operating_points(record))


def check_command(
    submission: Path = typer.Argument(..., help="Submission CSV to check: id,label."),
    studies: Path = typer.Option(
        ..., "--studies", help="Any CSV with the three UID columns (e.g. test.csv) listing every slice."
    ),
    fix: Path | None = typer.Option(
        None, "--fix", help="Write a consistent copy here, repairing each broken exam by its cheapest edit."
    ),
) -> None:
    """Check a submission against the challenge's label-consistency rules.

    Lists every broken rule by study and exits 1 when there is any. With --fix, writes a consistent
    submission (1st-place method: per broken exam, the cheaper of the cheapest consistent-positive and
    consistent-negative edits); rows of exams that were already consistent are copied unchanged.
    """
    from pedetect.metric.consistency import find_violations, fix_submission, write_submission
    from pedetect.metric.rules import RULES
    from pedetect.metric.submission import InputError, align, read_studies, read_submission

    try:
        frame = read_submission(submission)
        aligned = align(frame, read_studies(studies), submission)
    except InputError as error:
        raise fail(str(error)) from None

    violations = find_violations(aligned)
    n_studies = len(aligned.study_uids)
    broken_studies = sorted({v.study_uid for v in violations})
    for violation in violations:
        typer.echo(f"{violation.study_uid}\t{violation.rule}\t{RULES[violation.rule]}")
    if violations:
        counts = Counter(v.rule for v in violations)
        summary = ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items()))
        typer.echo(f"{len(broken_studies)} of {n_studies} studies break the rules ({summary})", err=True)
    else:
        typer.echo(f"all {n_studies} studies are consistent", err=True)

    if fix is not None:
        fixed, report = fix_submission(frame, aligned)
        write_submission(fixed, fix)
        added = sum(r.cost for r in report)
        n_positive = sum(r.direction == "positive" for r in report)
        typer.echo(
            f"wrote {fix}: fixed {len(report)} studies ({n_positive} made positive, "
            f"{len(report) - n_positive} negative), {sum(r.n_changed for r in report)} values moved, "
            f"added loss {added:.3g} (own values as truth)",
            err=True,
        )
    if violations:
        raise typer.Exit(1)
