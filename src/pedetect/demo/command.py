"""``pedetect demo`` (Typer and pathlib only at import: ``--help`` stays fast)."""

from __future__ import annotations

from pathlib import Path

import typer

from pedetect import options
from pedetect.console import fail
from pedetect.demo.run import DEFAULT_PROFILE, PROFILES, TRAIN_SEED, TRAIN_STUDIES, DemoError, run_demo

_TEST_STUDIES = ", ".join(f"{profile.test_studies} {name}" for name, profile in PROFILES.items())
_PROFILES = "; ".join(f"{name}: {profile.about}, configs/{profile.config}" for name, profile in PROFILES.items())


def demo_command(
    out: Path = typer.Option(Path("demo_output"), "--out", help="Folder for everything the demo makes."),
    train_studies: int = typer.Option(TRAIN_STUDIES, "--train-studies", min=6, help="Synthetic training studies."),
    test_studies: int | None = typer.Option(
        None,
        "--test-studies",
        min=1,
        help=f"Synthetic test studies (RLE lossless). [default: {_TEST_STUDIES}]",
    ),
    profile: str = typer.Option(
        DEFAULT_PROFILE,
        "--profile",
        help=f"The synthetic data and its recipe: {_PROFILES} (docs/synthetic_visibility.md).",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Experiment config; default: the profile's, in configs/ of this repository."
    ),
    overrides: list[str] = options.overrides(),
    seed: int = typer.Option(
        TRAIN_SEED,
        "--seed",
        help="Seed of the synthetic training set; the test set uses the next seed. Another seed: the same recipe on other data.",
    ),
) -> None:
    """The whole pipeline on synthetic CTPA, on a CPU in minutes: synth (train and test sets of
    different seeds) → prepare → train (the profile's recipe) → predict with report → evaluate, and a
    closing table: the score against the prior baseline, slice AUC, per-label AUC, the report's place.
    """
    try:
        result = run_demo(
            out,
            train_studies=train_studies,
            test_studies=test_studies,
            config=config,
            overrides=list(overrides),
            seed=seed,
            profile=profile,
        )
    except DemoError as error:
        raise fail(str(error)) from None
    typer.echo(result.table())
