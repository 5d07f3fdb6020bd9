"""Backbones from timm (never downloaded) and the slice classifier API other stages use."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from pedetect.models.backbone import BackboneError, check_backbone_name, create_backbone, read_state_dict
from pedetect.models.layout import cnn_dir
from pedetect.models.slice_classifier import (
    SliceClassifier,
    build_slice_classifier,
    fold_batchnorm,
    load_slice_classifier,
)
from pedetect.models.weights import save_weights
from pedetect.recipe import ExperimentConfig, apply_overrides, save_config

TINY = "resnet10t"


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match=r"unknown timm backbone 'resnet10x'.*resnet10t"):
        check_backbone_name("resnet10x")
    with pytest.raises(BackboneError, match="efficientnet_b0"):
        create_backbone("efficentnet_b0")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="pretrained weights file not found.*nothing is downloaded"):
        create_backbone(TINY, weights=tmp_path / "resnet10t.safetensors")


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "wrapped"])
def test_local_weights_are_loaded(tmp_path, fmt):
    torch.manual_seed(0)
    source = create_backbone(TINY)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, source.num_features)  # an ImageNet classifier: dropped
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if fmt == "wrapped" else state, path)
    torch.manual_seed(1)
    loaded = create_backbone(TINY, weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), source.eval()(x), atol=1e-5)


def test_three_channel_weights_adapt_to_nine_channels(tmp_path):
    source = create_backbone(TINY)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone(TINY, in_chans=9, weights=path)
    assert model.conv1[0].weight.shape[1] == 9


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(create_backbone("mobilenetv3_small_050").state_dict(), str(path))
    with pytest.raises(BackboneError, match="another model"):
        create_backbone(TINY, weights=path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "object": object()}, path)
    with pytest.raises(BackboneError, match="weights-only"):
        read_state_dict(path)


@pytest.mark.parametrize("mode,channels", [("windows", 3), ("pe", 1), ("adjacent", 3), ("both", 9)])
def test_slice_classifier_outputs(mode, channels):
    config = apply_overrides(
        ExperimentConfig(),
        [f"cnn.backbone.name={TINY}", f"cnn.input.mode={mode}", "cnn.targets.exam_labels=[central_pe, rightsided_pe]"],
    )
    model = build_slice_classifier(config.cnn).eval()
    x = torch.randint(0, 256, (4, channels, 32, 32), dtype=torch.uint8)
    logits = model(x)
    embedding, slice_logit = model.embed(x)
    assert logits.shape == (4, 3)
    assert embedding.shape == (4, model.embedding_dim) and slice_logit.shape == (4,)
    assert torch.allclose(slice_logit, logits[:, 0], atol=1e-5)
    assert torch.allclose(model(x.float()), logits, atol=1e-5)  # uint8 and 0–255 floats are the same input


def test_saved_weights_rebuild_from_the_model_folder(tmp_path):
    config = apply_overrides(ExperimentConfig(), [f"cnn.backbone.name={TINY}", "cnn.input.mode=both"])
    save_config(config, tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = build_slice_classifier(config.cnn).eval()
    save_weights(model, cnn_dir(tmp_path, 2) / "model.safetensors")
    loaded = load_slice_classifier(tmp_path, 2)
    assert not loaded.training
    x = torch.randint(0, 256, (2, 9, 32, 32), dtype=torch.uint8)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="fold 0"):
        load_slice_classifier(tmp_path, 0)


def test_folding_batchnorm_keeps_the_outputs_and_removes_the_normalisation():
    """Inference (validation, the embedding pass, predict) runs the CNN with each BatchNorm folded
    into the convolution before it: the same embeddings and logits, and no BatchNorm left to run."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            "cnn.backbone.name=pedetect_small_cnn",
            "cnn.input.mode=pe",
            "cnn.backbone.kwargs={widths: [4, 8]}",
            "embed.location_grid=3",
        ],
    )
    torch.manual_seed(0)
    model = build_slice_classifier(config.cnn, location_grid=3)
    with torch.no_grad():  # statistics far from the initial (0, 1), so a wrong fold would show
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.uniform_(-2, 2), norm.running_var.uniform_(0.2, 3)
            norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    model.eval()
    x = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8)
    with torch.inference_mode():
        embedding, logit = model.embed(x)
        folded = fold_batchnorm(copy.deepcopy(model))
        folded_embedding, folded_logit = folded.embed(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4  # the original is untouched
    assert torch.allclose(folded_embedding, embedding, atol=1e-4) and torch.allclose(folded_logit, logit, atol=1e-4)
    assert (embedding - embedding.mean(0)).abs().max() > 1e-2  # outputs that differ between slices


def test_small_cnn_is_a_timm_backbone_that_sees_a_single_small_defect(tmp_path):
    """pedetect_small_cnn: chosen by name like timm models, loads local weights, keeps full resolution
    at its first layers and max-pools, so a 3×3 change anywhere moves its features."""
    check_backbone_name("pedetect_small_cnn")
    model = create_backbone("pedetect_small_cnn", in_chans=9, widths=[8, 16, 32])
    assert model.num_features == 32
    model.eval()
    x = torch.zeros(2, 9, 64, 64)
    x[1, :, 40:43, 10:13] = 1.0  # one small bright spot, far from the centre
    with torch.no_grad():
        features = model(x)
    assert features.shape == (2, 32)
    assert (features[1] - features[0]).abs().max() > 1e-3
    save_file(model.state_dict(), tmp_path / "small.safetensors")
    again = create_backbone(
        "pedetect_small_cnn", in_chans=9, widths=[8, 16, 32], weights=tmp_path / "small.safetensors"
    )
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), features)
    with pytest.raises(ValueError, match="widths"):
        create_backbone("pedetect_small_cnn", widths=[])


def test_small_cnn_space_to_depth_keeps_every_pixel_at_half_resolution():
    """space_to_depth: 2 folds each 2×2 block into channels: the first stage runs at 32×32 on a
    64×64 input with 4× the channels, and a one-pixel change still moves the features."""
    model = create_backbone("pedetect_small_cnn", in_chans=1, widths=[8, 16], space_to_depth=2).eval()
    first = model.stages[0][0][0]
    assert first.in_channels == 4
    x = torch.zeros(2, 1, 64, 64)
    x[1, 0, 41, 11] = 1.0
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 16, 16, 16)
        features = model(x)
    assert (features[1] - features[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="space_to_depth"):
        create_backbone("pedetect_small_cnn", space_to_depth=0)


@pytest.mark.parametrize("backbone", ["pedetect_small_cnn", TINY])
def test_location_grid_appends_the_slice_logit_of_each_cell(tmp_path, backbone):
    """embed.location_grid G: the embedding is the pooled features, then the slice head on each of
    G × G cells; with G = 1 that cell is the whole slice (its logit is the slice logit), and with G = 3
    a defect in one corner moves that corner's logit and leaves the opposite corner's alone."""
    config = apply_overrides(
        ExperimentConfig(), [f"cnn.backbone.name={backbone}", "cnn.input.mode=pe", "embed.location_grid=3"]
    )
    save_config(config, tmp_path / "config.yaml")
    torch.manual_seed(0)
    plain = build_slice_classifier(config.cnn).eval()
    save_weights(plain, cnn_dir(tmp_path, 0) / "model.safetensors")
    gridded = load_slice_classifier(tmp_path, 0)  # location_grid from the config's embed section
    assert gridded.embedding_dim == plain.embedding_dim + 9
    x = torch.full((2, 1, 48, 48), 60, dtype=torch.uint8)
    x[1, :, 2:8, 2:8] = 255  # a bright square in the top-left cell only
    with torch.inference_mode():
        features, logit = plain.embed(x)
        embedding, grid_logit = gridded.embed(x)
        assert torch.allclose(embedding[:, : plain.embedding_dim], features, atol=1e-5)
        assert torch.allclose(grid_logit, logit, atol=1e-5)
        cells = embedding[:, plain.embedding_dim :]
        assert (cells[1, 0] - cells[0, 0]).abs() > 1e-4 and torch.allclose(cells[1, 8], cells[0, 8], atol=1e-5)
        whole = SliceClassifier(plain.backbone, location_grid=1).eval()
        whole.head.load_state_dict(plain.head.state_dict())
        one_cell, slice_logit = whole.embed(x)
        assert torch.allclose(one_cell[:, -1], slice_logit, atol=1e-5)
    with pytest.raises(ValueError, match="location_grid"):
        SliceClassifier(plain.backbone, location_grid=-1)


def test_a_local_file_takes_timms_pretrained_path_and_every_tensor_matches(tmp_path):
    """``weights: FILE`` is timm's own pretrained loading (``pretrained_cfg_overlay=dict(file=…)``):
    the call ``weights: pretrained`` makes with the hub, here with no network."""
    torch.manual_seed(0)
    source = create_backbone(TINY)
    path = tmp_path / "w.safetensors"
    save_file(
        {**source.state_dict(), "fc.weight": torch.zeros(1000, source.num_features), "fc.bias": torch.zeros(1000)},
        str(path),
    )
    torch.manual_seed(1)
    loaded = create_backbone(TINY, weights=path)
    assert loaded.pretrained_cfg.get("file") == str(path)  # loaded by timm's mechanism, from this file
    own = loaded.state_dict()
    assert set(own) == set(source.state_dict())  # the classifier was dropped (num_classes=0)
    for key, tensor in source.state_dict().items():
        assert torch.equal(own[key], tensor), key


def test_a_pickle_is_refused_on_timms_path_too(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": create_backbone(TINY).state_dict(), "object": object()}, path)
    with pytest.raises(BackboneError, match="weights-only"):
        create_backbone(TINY, weights=path)


def test_pretrained_weights_offline_say_which_file_to_provide(tmp_path):
    """The hub unreachable (HF_HUB_OFFLINE with an empty cache): one clear error naming the weights'
    hub page and the setting to change, not a stack trace."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    code = (
        "from pedetect.models.backbone import BackboneError, create_backbone\n"
        "try:\n    create_backbone('resnet10t.c3_in1k', weights='pretrained')\n"
        "except BackboneError as error:\n    print('ERROR', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ERROR cannot fetch timm's pretrained weights for 'resnet10t.c3_in1k'")
    assert "https://huggingface.co/timm/resnet10t.c3_in1k" in result.stdout
    assert "set cnn.backbone.weights to that file" in result.stdout and "HF_HUB_OFFLINE" in result.stdout


def test_starting_weights_are_recorded(tmp_path):
    from pedetect.io import file_sha256
    from pedetect.models.backbone import weights_provenance

    assert weights_provenance(None, TINY) == {"weights": "random"}
    hub = weights_provenance("pretrained", "rexnet_200.nav_in1k")
    assert hub == {
        "weights": "pretrained",
        "tag": "rexnet_200.nav_in1k",
        "hf_hub_id": "timm/rexnet_200.nav_in1k",
        "file": "model.safetensors (or pytorch_model.bin)",
    }
    legacy = weights_provenance("pretrained", "legacy_seresnext50_32x4d")  # no hub copy: timm's URL
    assert legacy["tag"] == "legacy_seresnext50_32x4d.in1k" and legacy["url"].endswith(".pth")
    path = tmp_path / "w.safetensors"
    save_file(create_backbone(TINY).state_dict(), str(path))
    assert weights_provenance(path, TINY) == {"weights": "file", "path": str(path), "sha256": file_sha256(path)}
