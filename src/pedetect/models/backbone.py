"""Backbones from timm, by name: random weights, timm's pretrained weights, or a local weights file.

``weights``:

- ``None``: random initialisation;
- ``"pretrained"``: the pretrained weights of the name's timm tag (``rexnet_200.nav_in1k``), fetched
  and cached by timm's own mechanism (the Hugging Face hub cache, ``HF_HOME``; ``HF_HUB_OFFLINE=1``
  uses the cache only), as every timm user expects. Offline with an empty cache: a
  :class:`BackboneError` that names the file to download and how to point the recipe at it;
- a path: a local weights file (safetensors, or a state dict read with ``torch.load(weights_only=True)``),
  loaded by the same timm call (``pretrained_cfg_overlay=dict(file=…)``), so the hub weights and the
  file go through one path: timm's checkpoint filters, the classifier dropped, and the first
  convolution adapted when the input channels differ (9-channel input from 3-channel ImageNet weights).

pedetect's own ``pedetect_small_cnn`` has no timm pretrained configuration; its files are read here
(:func:`read_state_dict`, :func:`load_backbone_weights`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pedetect.io import file_sha256
from pedetect.models.small_cnn import register

# timm is imported where a backbone is named or built: it takes seconds to import, and the sequence
# stages and ONNX inference import this module (through the slice classifier) without building one.


class BackboneError(ValueError):
    """An unknown backbone name or unusable weights; the message says what to do."""


def check_backbone_name(name: str) -> None:
    """Raise a :class:`BackboneError` suggesting close names when timm has no model ``name``."""
    import timm

    register()
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.6)
    if not close:
        close = [n for n in names if name.lower() in n.lower()][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise BackboneError(f"unknown timm backbone '{name}'{hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch state dict (loaded weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"pretrained weights file not found: {path} (nothing is downloaded; put the file there, "
            "or set cnn.backbone.weights to null for random weights)"
        )
    state: Any  # a state dict, or whatever else torch.load finds in the file (checked below)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickles with arbitrary objects are refused by weights_only
            raise BackboneError(f"cannot read {path} as a weights-only state dict: {error}") from None
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    prefixes = ("module.", "model.", "backbone.")
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or "fc"
    return (names,) if isinstance(names, str) else tuple(names)


def _first_conv_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("first_conv") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a timm backbone (classifier dropped, input conv adapted)."""
    from timm.models import adapt_input_conv

    state = read_state_dict(path)
    classifier = _classifier_names(model)
    state = {k: v for k, v in state.items() if not any(k == c or k.startswith(c + ".") for c in classifier)}
    own = model.state_dict()
    for conv in _first_conv_names(model):
        key = conv + ".weight"
        if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
            state[key] = adapt_input_conv(own[key].shape[1], state[key])
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise BackboneError(
            f"{path}: {len(mismatched)} tensors do not fit {type(model).__name__} "
            f"(first: {mismatched[0]} {tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}); "
            "are these weights for another model?"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(k.startswith(c) for c in classifier)]
    if missing:
        raise BackboneError(
            f"{path}: {len(missing)} of the model's tensors are not in the file (first: {missing[0]}); "
            "are these weights for another model?"
        )


PRETRAINED = "pretrained"


def pretrained_source(name: str) -> dict[str, str | tuple[str, str]]:
    """Where timm's pretrained weights of ``name`` come from: its tag and hub id or URL."""
    import timm

    model_name, tag = timm.models.split_model_name_tag(name)
    cfg = timm.models.get_pretrained_cfg(f"{model_name}.{tag}" if tag else model_name)
    if cfg is None:
        raise BackboneError(
            f"timm has no pretrained weights for '{name}'; set cnn.backbone.weights to a local file or to null"
        )
    record: dict[str, str | tuple[str, str]] = {
        "tag": f"{model_name}.{cfg.tag}" if getattr(cfg, "tag", None) else model_name
    }
    if cfg.hf_hub_id:
        record["hf_hub_id"] = cfg.hf_hub_id
        record["file"] = cfg.hf_hub_filename or "model.safetensors (or pytorch_model.bin)"
    if cfg.url:
        record["url"] = cfg.url
    return record


def _offline_help(name: str) -> str:
    try:
        source = pretrained_source(name)
    except BackboneError as error:
        return str(error)
    where = (
        f"https://huggingface.co/{source['hf_hub_id']} ({source['file']})"
        if "hf_hub_id" in source
        else source.get("url", "its URL in timm")
    )
    return (
        f"download the weights of {source['tag']} from {where} on a machine that can reach it, "
        "then set cnn.backbone.weights to that file (or copy the Hugging Face cache, HF_HOME, and set HF_HUB_OFFLINE=1)"
    )


def _create_pretrained(name: str, file: str | Path | None, **kwargs) -> nn.Module:
    """``timm.create_model(pretrained=True)`` from the hub cache, or from ``file`` (the overlay)."""
    import timm

    overlay = {"file": str(file)} if file is not None else {}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as error:  # timm and the hub raise many kinds; each becomes one clear message
        reason = " ".join(str(error).split())[:600]
        if file is None:
            raise BackboneError(
                f"cannot fetch timm's pretrained weights for '{name}' ({type(error).__name__}: {reason}); {_offline_help(name)}"
            ) from None
        if "weights_only" in reason or "Unpickl" in type(error).__name__ or "pickle" in reason.lower():
            raise BackboneError(
                f"cannot read {file} as a weights-only state dict (pickled objects are refused): {reason}"
            ) from None
        raise BackboneError(f"{file} does not fit '{name}': {reason}; are these weights for another model?") from None


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs,
) -> nn.Module:
    """A timm feature extractor (``num_classes=0``: pooled features, ``.num_features`` wide);
    ``weights``: None, ``"pretrained"`` or a local file (the module docstring)."""
    import timm

    check_backbone_name(name)
    if weights is not None and weights != PRETRAINED and not Path(weights).is_file():
        read_state_dict(weights)  # raises the missing-file error before building anything
    extra = dict(kwargs)
    if drop_path_rate:
        extra["drop_path_rate"] = drop_path_rate
    common = dict(num_classes=0, in_chans=in_chans, drop_rate=drop_rate, **extra)
    own_model = name.split(".")[0] == "pedetect_small_cnn"  # no timm pretrained configuration: its files are read here
    if weights is None or (own_model and weights != PRETRAINED):
        model = timm.create_model(name, pretrained=False, **common)
        if weights is not None:
            load_backbone_weights(model, weights)
        return model
    return _create_pretrained(name, None if weights == PRETRAINED else weights, **common)


def weights_provenance(weights: str | Path | None, name: str) -> dict[str, str | tuple[str, str]]:
    """What a model's starting weights were, for the bundle: random, a timm tag (and its hub id or
    URL), or a local file's SHA-256."""
    if weights is None:
        return {"weights": "random"}
    if weights == PRETRAINED:
        return {"weights": PRETRAINED, **pretrained_source(name)}
    return {"weights": "file", "path": str(weights), "sha256": file_sha256(weights)}
