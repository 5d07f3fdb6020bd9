"""A model bundle from someone else: every way to make one bad is a clear error naming
the file (and the key or tensor) from :func:`pedetect.models.bundle.read_bundle`, and from
``pedetect predict`` an exit status 2 before any study is read. Bundles are made with
:func:`pedetect.testing.write_random_bundle` and then edited on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers.processes import ROOT, pedetect_command
from helpers.train import tiny_config
from pedetect.models.bundle import BundleError, read_bundle
from pedetect.models.layout import WEIGHTS_FILE, cnn_dir, seq_dir
from pedetect.testing import write_random_bundle


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made") / "bundle"
    write_random_bundle(
        tiny_config(), out, folds=2, store_settings={"windows": [[-600, 1500], [100, 700], [40, 400]], "image_size": 48}
    )
    read_bundle(out)  # the unedited bundle is good
    return out


@pytest.fixture
def bundle(made, tmp_path) -> Path:
    """A fresh copy of the good bundle, to spoil."""
    copy = tmp_path / "bundle"
    shutil.copytree(made, copy)
    return copy


def refused(bundle: Path, *fragments: str) -> str:
    with pytest.raises(BundleError) as caught:
        read_bundle(bundle)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def edit_yaml(path: Path, edit) -> None:
    import yaml

    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def save_tensors(path: Path, tensors: dict, kind: str, **metadata: str) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", "kind": kind, **metadata}
    )


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------- paths
def test_a_weights_file_linked_from_outside_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    weights = cnn_dir(bundle, 1) / WEIGHTS_FILE
    shutil.copy(weights, outside)
    weights.unlink()
    weights.symlink_to(outside)
    refused(bundle, str(weights), "leads outside the bundle folder", str(outside))


def test_a_config_or_fold_folder_linked_from_outside_is_refused(bundle, tmp_path):
    moved = tmp_path / "seq_fold0"
    shutil.move(seq_dir(bundle, 0), moved)
    seq_dir(bundle, 0).symlink_to(moved, target_is_directory=True)
    refused(bundle, "leads outside the bundle folder", str(moved))


def test_config_yaml_as_a_link_to_a_file_outside_is_refused(bundle, tmp_path):
    outside = tmp_path / "config.yaml"
    shutil.move(bundle / "config.yaml", outside)
    (bundle / "config.yaml").symlink_to(outside)
    refused(bundle, f"{bundle / 'config.yaml'} leads outside the bundle folder")


def test_a_path_in_the_config_is_never_opened(bundle, tmp_path):
    """``cnn.backbone.weights`` is where training started: a record. The bundle's config drops it, so
    no model built from it opens a file, inside the bundle or out (a FIFO would hang if opened)."""
    fifo = tmp_path / "never_opened.safetensors"
    os.mkfifo(fifo)
    edit_yaml(bundle / "config.yaml", lambda data: data["cnn"]["backbone"].__setitem__("weights", str(fifo)))
    loaded = read_bundle(bundle)
    assert loaded.config.cnn.backbone.weights is None
    from pedetect.models.slice_classifier import load_slice_classifier

    load_slice_classifier(bundle, 0, config=loaded.config)  # would block on the FIFO if the path were used


def test_bundle_json_with_an_unknown_key_or_wrong_folds_is_refused(bundle):
    info = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**info, "weights_path": "../../../etc/passwd"}))
    refused(bundle, f"{bundle / 'bundle.json'}: unknown key 'weights_path'", "holds only format, folds")
    (bundle / "bundle.json").write_text(json.dumps({**info, "folds": [0, 1, 7]}))
    refused(bundle, "folds [0, 1, 7] are not the folds of folds.csv ([0, 1])")
    (bundle / "bundle.json").write_text(json.dumps({**info, "embedding_dim": 99}))
    refused(bundle, "embedding_dim 99, but config.yaml's CNN embeds 128 values per slice")
    (bundle / "bundle.json").write_text("[1, 2")
    refused(bundle, f"{bundle / 'bundle.json'} is not valid JSON")


# --------------------------------------------------------------------------------- weights
def test_a_pickle_named_model_safetensors_is_refused_unread(bundle, tmp_path):
    weights = cnn_dir(bundle, 0) / WEIGHTS_FILE
    marker = tmp_path / "pickle_ran"
    torch.save({"x": torch.zeros(2), "payload": PickleCanary(str(marker))}, weights)
    refused(bundle, str(weights), "is not a readable safetensors file")
    assert not marker.exists()


class PickleCanary:
    """Unpickling this creates a file: proof that a pickle was (or was not) run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(bundle):
    weights = seq_dir(bundle, 1) / WEIGHTS_FILE
    tensors = load_tensors(weights)
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    rows, cols = tensors[name].shape
    tensors[name] = torch.zeros(rows, cols + 3)
    save_tensors(weights, tensors, "pedetect.sequence_head", embedding_dim="128")
    refused(
        bundle,
        str(weights),
        f"tensor {name!r} has shape [{rows}, {cols + 3}]",
        f"needs [{rows}, {cols}]",
        "fold 1 sequence head",
    )


def test_a_missing_or_an_extra_tensor_is_named(bundle):
    weights = cnn_dir(bundle, 0) / WEIGHTS_FILE
    tensors = load_tensors(weights)
    name = sorted(tensors)[0]
    save_tensors(weights, {k: v for k, v in tensors.items() if k != name}, "pedetect.slice_classifier")
    refused(bundle, str(weights), f"tensor {name!r} of the fold 0 CNN is missing")
    save_tensors(weights, {**tensors, "backdoor.weight": torch.zeros(3)}, "pedetect.slice_classifier")
    refused(bundle, str(weights), "tensor 'backdoor.weight' is not part of the fold 0 CNN")


def test_weights_of_the_wrong_model_kind_are_refused(bundle):
    shutil.copy(seq_dir(bundle, 0) / WEIGHTS_FILE, cnn_dir(bundle, 0) / WEIGHTS_FILE)
    refused(
        bundle,
        str(cnn_dir(bundle, 0) / WEIGHTS_FILE),
        "holds a pedetect.sequence_head, not a pedetect.slice_classifier",
    )


def test_truncated_weights_are_refused(bundle):
    weights = seq_dir(bundle, 0) / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refused(bundle, str(weights), "is not a readable safetensors file")


def test_weights_of_another_recipe_are_refused(bundle, tmp_path):
    """A bundle whose config.yaml was edited to another width (or its weights replaced)."""
    edit_yaml(bundle / "config.yaml", lambda data: data["seq"].__setitem__("hidden", 24))
    refused(bundle, str(seq_dir(bundle, 0) / WEIGHTS_FILE), "config.yaml's fold 0 sequence head needs")


# --------------------------------------------------------------------------------- YAML and small files
def test_yaml_that_would_run_code_is_refused_and_runs_nothing(bundle, tmp_path):
    marker = tmp_path / "yaml_ran"
    text = (bundle / "config.yaml").read_text()
    (bundle / "config.yaml").write_text(f"exploit: !!python/object/apply:os.system ['touch {marker}']\n" + text)
    refused(bundle, f"{bundle / 'config.yaml'}: not valid YAML", "could not determine a constructor for the tag")
    assert not marker.exists()


def test_a_yaml_alias_bomb_is_refused_before_it_expands(bundle):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)
    ]
    (bundle / "config.yaml").write_text("\n".join(lines) + "\n" + (bundle / "config.yaml").read_text())
    refused(bundle, f"{bundle / 'config.yaml'} uses YAML aliases (*a0)")


def test_unknown_config_keys_and_huge_files_are_refused(bundle):
    edit_yaml(bundle / "config.yaml", lambda data: data["cnn"].__setitem__("load_from", "/etc/shadow"))
    refused(bundle, "config.yaml cannot be read", "unknown key 'cnn.load_from'")
    with open(bundle / "config.yaml", "wb") as handle:  # sparse: 17 MiB of nothing
        handle.truncate(17 << 20)
    refused(bundle, "config.yaml is 17825792 bytes")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("prior.json", lambda p: {**p, "central_pe": float("nan")}, "central_pe is nan, not a probability"),
        (
            "prior.json",
            lambda p: {**p, "pe_present_on_image": "0.1"},
            "pe_present_on_image is '0.1', not a probability",
        ),
        ("prior.json", lambda p: [1, 2], "is not a JSON object of label: probability"),
        (
            "preprocessing.json",
            lambda p: {**p, "windows": [[100, 700], [40, 0], [1, 2]]},
            "'windows' must list three [level, width] pairs",
        ),
        (
            "preprocessing.json",
            lambda p: {**p, "image_size": 10**9},
            "image_size 1000000000 is not a whole number of pixels",
        ),
    ],
)
def test_bad_prior_or_preprocessing_values_are_named(bundle, name, content, fragment):
    path = bundle / name
    path.write_text(json.dumps(content(json.loads(path.read_text()))))
    refused(bundle, str(path), fragment)


def test_folds_csv_without_whole_fold_numbers_is_refused(bundle):
    (bundle / "folds.csv").write_text("StudyInstanceUID,fold\nrandom.0,0\nrandom.1,../1\n")
    refused(bundle, str(bundle / "folds.csv"), "'fold' must hold whole numbers from 0")


def test_an_onnx_model_with_external_data_is_refused(bundle):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((2, 2), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[weight],
    )
    path = bundle / "onnx" / "fold0" / "cnn.onnx"
    path.parent.mkdir(parents=True)
    onnx.save_model(helper.make_model(graph), str(path))
    refused(bundle, str(path), "tensor 'w' is stored in an external file ('../../../../etc/passwd')")


# --------------------------------------------------------------------------------- predict, as a process
@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    from pedetect.synth import write_dataset

    root = tmp_path_factory.mktemp("study")
    write_dataset(root, 1, slices=6, size=48, seed=41, progress=False)
    return root / "train"


def predict(study: Path, bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        pedetect_command(
            "predict",
            study,
            "--model",
            bundle,
            "--out",
            tmp_path / "sub.csv",
            "--report",
            tmp_path / "report",
            "--no-progress",
            "--device",
            "cpu",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_predict_refuses_a_bad_bundle_with_exit_2_before_reading_any_study(bundle, study, tmp_path):
    weights = cnn_dir(bundle, 1) / WEIGHTS_FILE
    tensors = load_tensors(weights)
    name = next(k for k, v in tensors.items() if v.ndim == 4)
    tensors[name] = tensors[name][:, :1]  # a CNN for one input channel
    save_tensors(weights, tensors, "pedetect.slice_classifier")
    result = predict(study, bundle, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {weights}: tensor {name!r} has shape" in result.stderr
    assert "Traceback" not in result.stderr
    assert "studies in" not in result.stderr  # the input was never scanned
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "report").exists()


def test_predict_with_a_config_path_outside_the_bundle_runs_without_opening_it(bundle, study, tmp_path):
    fifo = tmp_path / "outside.safetensors"
    os.mkfifo(fifo)
    edit_yaml(bundle / "config.yaml", lambda data: data["cnn"]["backbone"].__setitem__("weights", str(fifo)))
    result = predict(study, bundle, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "sub.csv").is_file()
