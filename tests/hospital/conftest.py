"""Fixtures of the hospital tests (pedetect.hospital): ``pedetect serve`` nodes stopped after the
test, and a synthetic study with a random-weights bundle to send them. The helpers they use are in
helpers/serve.py."""

from __future__ import annotations

import pytest

from helpers.serve import SIZE, SLICES, Serve
from helpers.train import tiny_config
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle


@pytest.fixture
def serves():
    started: list[Serve] = []

    def start(*args, **kwargs) -> Serve:
        started.append(Serve(*args, **kwargs))
        return started[-1]

    yield start
    for serve in started:
        serve.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    labels = write_dataset(root / "data", 1, slices=SLICES, size=SIZE, seed=9, split="test", progress=False)
    model = write_random_bundle(tiny_config(), root / "model", folds=2)
    uid = labels["StudyInstanceUID"].iloc[0]
    files = sorted((root / "data" / "test" / uid).rglob("*.dcm"))
    return uid, files, model
