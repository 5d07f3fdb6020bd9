"""``pedetect demo --profile``: what each profile writes and trains with, checked without running it."""

from __future__ import annotations

import pytest

from pedetect.demo.run import PROFILES, DemoError, default_config, run_demo
from pedetect.recipe import load_experiment
from pedetect.synth.phantom import POSITIVE_FRACTION


def test_the_realistic_profile_is_synths_own_data_and_the_conspicuous_one_the_demos():
    realistic, conspicuous = PROFILES["realistic"], PROFILES["conspicuous"]
    assert realistic.min_embolus_pixels == 0 and realistic.positive_fraction == POSITIVE_FRACTION
    assert (conspicuous.min_embolus_pixels, conspicuous.positive_fraction, conspicuous.test_studies) == (25, 0.5, 30)
    assert load_experiment(default_config("conspicuous")).name == "demo"
    assert load_experiment(default_config("realistic")).name == "realistic"


def test_an_unknown_profile_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(DemoError, match="unknown profile 'typical'; choose conspicuous or realistic"):
        run_demo(tmp_path / "out", profile="typical", progress=False, echo=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_the_cli_names_the_profiles(cli):
    result = cli("demo", "--help")
    assert result.exit_code == 0
    assert "realistic" in result.output and "conspicuous" in result.output
