"""``pedetect evaluate`` and ``pedetect check``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pedetect.console import fail


def evaluate_command(
    labels: Optional[Path] = typer.Option(
        None,
        "--labels",
        help="Ground truth in the RSNA train.csv columns (one row per slice); with --clots, its studies are the scans.",
    ),
    submission: Optional[Path] = typer.Option(
        None, "--submission", help="Submission CSV: id,label; one row per slice and nine per study."
    ),
    clots: Optional[Path] = typer.Option(
        None,
        "--clots",
        help="Emboli truth (pedetect synth's clots.csv): one row per embolus and slice. Needs --candidates.",
    ),
    candidates: Optional[Path] = typer.Option(
        None, "--candidates", help="Candidates (pedetect predict --clots): one row per candidate. Needs --clots."
    ),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the FROC figure here (PNG). Needs --clots."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object (key 'score' is the metric, key 'froc' the FROC) instead of tables.",
    ),
) -> None:
    """Score a submission with the competition metric (weighted log loss; lower is better), and/or
    embolus candidates with a per-embolus FROC.

    With --labels and --submission: prints the score, its image and exam parts, and log loss and ROC
    AUC per label. Every id of the labels must be in the submission and no other: missing, unknown or
    duplicate ids, and values that are not probabilities, are errors (exit 2).

    With --clots and --candidates: prints the sensitivity per embolus at 0.5, 1, 2 and 4 false
    positives per scan, overall, per side and per size (docs/localisation.md). The scans are the
    studies of --labels when given, else those named in the two files (a warning says so).
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

    report: dict = {}
    try:
        if submission is not None:
            from pedetect.metric.evaluate import evaluate_files

            report = evaluate_files(labels, submission)
        if scoring_froc:
            from pedetect.metric.froc import froc_report, read_candidates, read_clots, read_scan_studies

            studies = read_scan_studies(labels) if labels is not None else None
            report["froc"] = froc_report(read_clots(clots), read_candidates(candidates), studies)
    except InputError as error:
        raise fail(str(error)) from None

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
    if scoring_froc:
        from pedetect.metric.froc import format_froc

        parts.append(format_froc(report["froc"]))
    typer.echo("\n\n".join(parts))


def check_command(
    submission: Path = typer.Argument(..., help="Submission CSV to check: id,label."),
    studies: Path = typer.Option(
        ..., "--studies", help="Any CSV with the three UID columns (e.g. test.csv) listing every slice."
    ),
    fix: Optional[Path] = typer.Option(
        None, "--fix", help="Write a consistent copy here, repairing each broken exam by its cheapest edit."
    ),
) -> None:
    """Check a submission against the challenge's label-consistency rules.

    Lists every broken rule by study and exits 1 when there is any. With --fix, writes a consistent
    submission (1st-place method: per broken exam, the cheaper of the cheapest consistent-positive and
    consistent-negative edits); rows of exams that were already consistent are copied unchanged.
    """
    from collections import Counter

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
