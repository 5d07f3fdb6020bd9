"""pedetect export and predict --runtime: ONNX models that compute what the PyTorch models compute.

The parts an export depends on (the grid pooling as slices, the sequence head without packing,
log(1 − p) without expm1) are checked against the PyTorch operations they replace; exported heads
against the torch head at lengths the example did not have; a trained bundle's export against its
PyTorch run on its own validation studies (score and slice AUC of int8); and predict on real DICOM
in every runtime, with the choice of ``auto`` and a stale export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.train import tiny_config
from pedetect.labels import EXAM_LABELS
from pedetect.metric.submission import read_submission
from pedetect.models.layout import WEIGHTS_FILE, cnn_dir, onnx_dir
from pedetect.models.onnx import (
    CNN_FILE,
    CNN_INT8_FILE,
    SEQ_FILE,
    OnnxSequenceHead,
    choose_runtime,
    export_sequence_head,
)
from pedetect.models.sequence import SequenceHead, _log1mexp
from pedetect.models.slice_classifier import _pool_cells
from pedetect.synth import write_dataset
from pedetect.testing import write_random_bundle


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape", [(8, 8, 3), (7, 9, 3), (16, 16, 4), (2, 3, 3)])
def test_grid_pooling_is_adaptive_pooling(kind, shape):
    height, width, grid = shape
    backbone = nn.Module()
    backbone.global_pool = nn.AdaptiveMaxPool2d(1) if kind == "max" else nn.AdaptiveAvgPool2d(1)
    feature_map = torch.randn(3, 5, height, width, generator=torch.Generator().manual_seed(0))
    pooled = (F.adaptive_max_pool2d if kind == "max" else F.adaptive_avg_pool2d)(feature_map, grid)
    expected = pooled.permute(0, 2, 3, 1).reshape(3 * grid * grid, 5, 1, 1)
    torch.testing.assert_close(_pool_cells(backbone, feature_map, grid), expected, rtol=0, atol=1e-6)


def test_log1mexp_without_expm1_is_as_accurate():
    x = -torch.logspace(-6, 2, 4001, dtype=torch.float64)
    reference = torch.log(-torch.expm1(x))
    got = _log1mexp(x.float()).double()
    # float32 resolution of the result (|log(1 − e^x)| up to 14 here) plus the input's rounding
    assert (got - reference).abs().max().item() < 3e-6
    assert torch.isfinite(got).all()


HEADS = {
    "gru, conditional": dict(encoder="gru", exam_structure="conditional"),
    "lstm, per-output pooling": dict(encoder="lstm", exam_pooling="per_output", layers=2),
    "gru, neighbour differences": dict(encoder="gru", neighbour_diffs=True),
    "transformer": dict(encoder="transformer", layers=1),
    "gru, logits only": dict(encoder="gru", input_columns=4, exam_structure="conditional"),
    "gru, fixed length, neighbour differences": dict(
        encoder="gru", fixed_length=16, neighbour_diffs=True
    ),  # the 1st place's
}


def _head(**kwargs) -> SequenceHead:
    torch.manual_seed(3)
    return SequenceHead(12, hidden=16, dropout=0.1, **kwargs).eval()


@pytest.mark.parametrize("name", list(HEADS))
def test_head_on_a_whole_series_equals_the_padded_path(name):
    head = _head(**HEADS[name])
    generator = torch.Generator().manual_seed(1)
    embeddings, logits = torch.randn(1, 23, 12, generator=generator), torch.randn(1, 23, generator=generator) * 4
    with torch.inference_mode():
        padded = head(embeddings, torch.ones(1, 23, dtype=torch.bool), logits)
        whole = head(embeddings, None, logits)
    for a, b in zip(padded, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", list(HEADS))
def test_exported_head_takes_any_length(name, tmp_path):
    head = _head(**HEADS[name])
    export_sequence_head(head, tmp_path / "seq.onnx")
    exported = OnnxSequenceHead(tmp_path / "seq.onnx", threads=1)
    assert exported.embedding_dim == 12
    rng = np.random.default_rng(0)
    for length in (1, 5, 8, 40, 300):  # the export's example had 8; a fixed-length head resizes 40 and 300 to 16
        embeddings = rng.normal(size=(length, 12)).astype(np.float16)
        logits = (rng.normal(size=length) * 5).astype(np.float32)
        want_slices, want_exam = head.predict_series(embeddings, logits)
        got_slices, got_exam = exported.predict_series(embeddings, logits)
        assert got_slices.shape == (length,) and got_exam.shape == (len(EXAM_LABELS),)
        np.testing.assert_allclose(got_slices, want_slices, rtol=0, atol=2e-5)
        np.testing.assert_allclose(got_exam, want_exam, rtol=0, atol=2e-5)


@pytest.mark.xdist_group("train")
def test_export_of_a_trained_bundle_is_checked_on_its_validation_studies(trained_model, tmp_path):
    from pedetect.export.job import INT8_AUC_TOLERANCE, INT8_SCORE_TOLERANCE, export_bundle

    out = tmp_path / "exported"
    record = export_bundle(
        trained_model.out,
        trained_model.store,
        labels=trained_model.labels,
        out=out,
        int8=True,
        calibration_slices=40,
        check_series=None,
        threads=1,
        echo=lambda _: None,
    )
    assert not (trained_model.out / "onnx").exists()  # the original bundle is left as it was
    assert not list(out.rglob("*.ckpt")) and not (out / "embed").exists()
    on_disk = json.loads((out / "onnx" / "export.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert sorted(record["folds"]) == ["0", "1", "2"]
    n_series = trained_model.labels["SeriesInstanceUID"].nunique()
    assert sum(f["check_series"] for f in record["folds"].values()) == n_series  # every series, each by its own fold
    for k, fold in record["folds"].items():
        assert set(fold["files"]) == {CNN_FILE, SEQ_FILE, CNN_INT8_FILE}
        assert all((onnx_dir(out, int(k)) / name).stat().st_size > 1000 for name in fold["files"])
    fp32, int8, torch_run = record["check"]["onnx"], record["check"]["onnx-int8"], record["check"]["torch"]
    assert fp32["max_abs_probability"] < 1e-4 and fp32["max_abs_slice_logit"] < 1e-3
    assert abs(fp32["score_change"]) < 1e-5 and abs(fp32["slice_auc_change"]) < 1e-9
    assert record["default_ok"]["onnx"] is True
    # int8 really is another model (its logits move), and its verdict follows the stated tolerances
    assert int8["max_abs_slice_logit"] > 1e-4
    assert 0 < torch_run["score"] < 2 and 0.5 < torch_run["slice_auc"] <= 1
    assert int8["score_change"] == pytest.approx(int8["score"] - torch_run["score"])
    within = abs(int8["score_change"]) <= INT8_SCORE_TOLERANCE and abs(int8["slice_auc_change"]) <= INT8_AUC_TOLERANCE
    assert record["default_ok"]["onnx-int8"] is within
    assert choose_runtime(out, "auto", [0, 1, 2])[0] == fastest_exact(record)
    assert all(record["check"][name]["seconds_per_100_slices"] > 0 for name in ("torch", "onnx", "onnx-int8"))


def fastest_exact(record: dict) -> str:
    """What auto must choose: the fastest, as the export timed them, of PyTorch and the runtimes that passed."""
    candidates = ["torch", *(name for name, ok in record["default_ok"].items() if ok)]
    return min(candidates, key=lambda name: record["check"][name]["seconds_per_100_slices"])


N_STUDIES, SLICES, SIZE = 4, 12, 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random 2-fold bundle of the tiny recipe, a synthetic test set, its store, and the bundle's
    export (fp32 and int8, checked on that store without labels)."""
    from typer.testing import CliRunner

    from pedetect.cli import app

    root = tmp_path_factory.mktemp("export")
    write_dataset(root / "data", N_STUDIES, slices=SLICES, size=SIZE, seed=9, split="test", progress=False)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "prepare",
            str(root / "data" / "test"),
            "--out",
            str(root / "store"),
            "--image-size",
            str(SIZE),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    model = write_random_bundle(tiny_config(), root / "model", folds=2)
    result = runner.invoke(
        app,
        [
            "export",
            str(model),
            "--store",
            str(root / "store"),
            "--int8",
            "--calibration-slices",
            "24",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    return root, model, result.output


def _predict(cli, root: Path, model: Path, out: Path, *extra: str):
    return cli(
        "predict",
        str(root / "data" / "test"),
        "--model",
        str(model),
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        *extra,
    )


def test_export_command_reports_every_runtime(exported):
    root, model, output = exported
    assert "onnx: largest probability change" in output and "onnx-int8: largest probability change" in output
    assert "no labels were given" in output  # int8 without a measured score is never the default
    record = json.loads((model / "onnx" / "export.json").read_text())
    assert record["labelled_check"] is False and record["default_ok"] == {"onnx": True, "onnx-int8": False}


def test_predict_in_every_runtime(exported, cli, tmp_path):
    root, model, _ = exported
    runs = {}
    for runtime in ("torch", "onnx", "onnx-int8", "auto"):
        result = _predict(
            cli,
            root,
            model,
            tmp_path / f"{runtime}.csv",
            "--runtime",
            runtime,
            "--report",
            str(tmp_path / f"report-{runtime}"),
            "--clots",
            str(tmp_path / f"clots-{runtime}.csv"),
        )
        assert result.exit_code == 0, result.output
        runs[runtime] = read_submission(tmp_path / f"{runtime}.csv").set_index("id")["label"]
        # int8 was not checked with labels: auto takes the faster of ONNX fp32 and PyTorch
        chosen = (
            runtime if runtime != "auto" else fastest_exact(json.loads((model / "onnx" / "export.json").read_text()))
        )
        assert f"runtime {chosen})" in result.output
        assert f"runtime {chosen})" in (tmp_path / f"report-{runtime}" / "index.html").read_text()
    assert len(runs["torch"]) == N_STUDIES * (SLICES + len(EXAM_LABELS))
    for runtime in ("onnx", "onnx-int8", "auto"):
        assert runs[runtime].index.equals(runs["torch"].index)
    np.testing.assert_allclose(runs["onnx"].to_numpy(), runs["torch"].to_numpy(), rtol=0, atol=1e-4)
    auto = fastest_exact(json.loads((model / "onnx" / "export.json").read_text()))
    np.testing.assert_array_equal(runs["auto"].to_numpy(), runs[auto].to_numpy())
    moved = np.abs(runs["onnx-int8"].to_numpy() - runs["torch"].to_numpy())
    assert moved.max() > 0  # quantized: not the same numbers, ...
    assert moved.max() < 0.5  # ... but the same model
    # Clot candidates from the activation maps: ONNX fp32 gives PyTorch's (same places, scores within 1e-4).
    clots = {runtime: pd.read_csv(tmp_path / f"clots-{runtime}.csv") for runtime in runs}
    assert len(clots["torch"]) > 0
    keys = ["StudyInstanceUID", "candidate", "SOPInstanceUID", "slice_index", "side", "slice_first", "slice_last"]
    pd.testing.assert_frame_equal(clots["onnx"][keys], clots["torch"][keys])
    for column, tolerance in (("score", 1e-4), ("row", 0.05), ("col", 0.05)):
        np.testing.assert_allclose(clots["onnx"][column], clots["torch"][column], rtol=0, atol=tolerance)
    assert set(clots["onnx-int8"]["StudyInstanceUID"]) <= set(clots["torch"]["StudyInstanceUID"])


def test_a_retrained_fold_makes_the_export_stale(exported, cli, tmp_path):
    root, model, _ = exported
    stale = tmp_path / "model"
    shutil.copytree(model, stale)
    write_random_bundle(tiny_config(), tmp_path / "other", folds=1, seed=42)
    shutil.copy(cnn_dir(tmp_path / "other", 0) / WEIGHTS_FILE, cnn_dir(stale, 0) / WEIGHTS_FILE)
    assert choose_runtime(stale, "auto", [0, 1]) == ("torch", "no ONNX export (pedetect export)")
    result = _predict(cli, root, stale, tmp_path / "auto.csv")
    assert result.exit_code == 0, result.output
    assert "runtime torch)" in result.output
    result = _predict(cli, root, stale, tmp_path / "onnx.csv", "--runtime", "onnx")
    assert result.exit_code == 2
    assert "pedetect export" in result.output and str(stale) in result.output
    assert not (tmp_path / "onnx.csv").exists()


def test_runtime_errors_are_clear(exported, cli, tmp_path):
    root, model, _ = exported
    bare = write_random_bundle(tiny_config(), tmp_path / "bare", folds=1)
    result = _predict(cli, root, bare, tmp_path / "x.csv", "--runtime", "onnx-int8")
    assert result.exit_code == 2 and "has no export" in result.output and "--int8" in result.output
    result = _predict(cli, root, model, tmp_path / "x.csv", "--runtime", "tensorrt")
    assert result.exit_code == 2 and "unknown runtime 'tensorrt'" in result.output
    result = cli("export", str(model), "--store", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "slice store not found" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = cli("export", str(model), "--store", str(root / "store"), "--out", str(tmp_path / "taken"))
    assert result.exit_code == 2 and "not empty" in result.output


def test_auto_takes_the_fastest_exact_runtime_as_the_export_timed_it(exported, tmp_path):
    _, model, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    path = copy / "onnx" / "export.json"
    record = json.loads(path.read_text())
    record["default_ok"] = {"onnx": True, "onnx-int8": True}
    for name, seconds in {"torch": 3.0, "onnx": 2.0, "onnx-int8": 1.0}.items():
        record["check"][name]["seconds_per_100_slices"] = seconds
    path.write_text(json.dumps(record))
    assert choose_runtime(copy, "auto", [0, 1])[0] == "onnx-int8"
    record["check"]["onnx-int8"]["seconds_per_100_slices"] = 2.5  # int8 slower than fp32 (small CNNs)
    path.write_text(json.dumps(record))
    assert choose_runtime(copy, "auto", [0, 1])[0] == "onnx"
    record["check"]["torch"]["seconds_per_100_slices"] = 0.5
    path.write_text(json.dumps(record))
    name, why = choose_runtime(copy, "auto", [0, 1])
    assert name == "torch" and why.startswith("faster than onnx, onnx-int8")
    assert choose_runtime(copy, "auto", [0, 1], device="cuda") == ("torch", "on cuda")
