"""``pedetect evaluate`` and ``pedetect check``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pedetect.console import fail


def evaluate_command(
    labels: Path = typer.Option(
        ..., "--labels", help="Ground truth in the RSNA train.csv columns (one row per slice)."
    ),
    submission: Path = typer.Option(
        ..., "--submission", help="Submission CSV: id,label; one row per slice and nine per study."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (key 'score' is the metric) instead of a table."
    ),
) -> None:
    """Score a submission with the competition metric (weighted log loss; lower is better).

    Prints the score, its image and exam parts, and log loss and ROC AUC per label. Every id of
    the labels must be in the submission and no other: missing, unknown or duplicate ids, and values
    that are not probabilities, are errors (exit 2).
    """
    import json

    from pedetect.metric.evaluate import evaluate_files, format_report
    from pedetect.metric.submission import InputError

    try:
        report = evaluate_files(labels, submission)
    except InputError as error:
        raise fail(str(error)) from None
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


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
