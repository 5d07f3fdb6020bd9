"""Fixtures shared by test files in several folders (pytest finds them here, for every folder below);
those of one folder's tests only are in that folder's conftest.py (tests/hospital/conftest.py).
Helpers that tests import by name are in the helpers package (tests/helpers/)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers.train import FakeStore, fake_labels, tiny_config
from pedetect.cli import app
from pedetect.recipe import ExperimentConfig


@pytest.fixture(autouse=True)
def _xdist_group_applied(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` (make test) a test marked xdist_group fails unless the mark took effect
    (xdist appends ``@group`` to its id): without it, tests of one module run on both workers, and the
    demo's and the training tests' module fixtures are built twice, minutes longer, silently."""
    node = request.node
    grouped = getattr(request.config.option, "loadgroup", False) and node.get_closest_marker("xdist_group")
    if grouped and "@" not in node.nodeid:
        pytest.fail(
            f"--dist loadgroup ignored this test's xdist_group: this pytest ({pytest.__version__}) and "
            "pytest-xdist do not work together; install the versions pyproject.toml allows",
            pytrace=False,
        )


@pytest.fixture
def cli():
    """``pedetect ARGS…`` run in this process: ``cli("check", path, "--studies", path)`` → click's Result.
    Arguments are passed through ``str`` (paths, numbers); keywords go to ``CliRunner.invoke``."""
    runner = CliRunner()

    def invoke(*args: Any, **kwargs: Any):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return invoke


class TrainedModel(NamedTuple):
    config: ExperimentConfig
    labels: pd.DataFrame
    store: FakeStore
    out: Path  # the model folder
    result: dict[str, Any]  # what train() returned


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    """Every stage (cnn → embed → seq, 3 folds) of :func:`tiny_config` with the 9-channel
    adjacent-slice input (so a slice's neighbours matter to its embedding), on 12 fake studies of 10
    slices. Trained once per session (train/test_embed.py, train/test_seq_train.py: both in the xdist group
    "train", so one worker trains it); tests must not change it — use ``trained_copy`` for that."""
    from pedetect.train.pipeline import train

    labels = fake_labels(12, slices=10, seed=5)
    store = FakeStore(labels, size=32)
    config = tiny_config("cnn.input.mode=both")
    out = tmp_path_factory.mktemp("trained") / "model"
    result = train(config, store=store, labels=labels, out=out)
    return TrainedModel(config, labels, store, out, result)


@pytest.fixture
def trained_copy(trained_model, tmp_path) -> Path:
    """A copy of ``trained_model``'s model folder that a test may change."""
    copy = tmp_path / "model"
    shutil.copytree(trained_model.out, copy)
    return copy
