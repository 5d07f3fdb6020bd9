"""Backbones from timm, by name, with random weights or a local weights file. Nothing is downloaded.

``create_backbone("tf_efficientnet_b5_ns", in_chans=3, weights="b5.safetensors")`` builds the
model with ``pretrained=False`` and loads the file: a safetensors file or a PyTorch state dict
(read with ``torch.load(weights_only=True)``; ``state_dict``/``model`` wrappers and ``module.``
prefixes are unwrapped). The classifier of the file is dropped, and when the input channels differ
(9-channel input from 3-channel ImageNet weights) the first convolution is adapted the timm way.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn


class BackboneError(ValueError):
    """An unknown backbone name or unusable weights; the message says what to do."""


def check_backbone_name(name: str) -> None:
    """Raise a :class:`BackboneError` suggesting close names when timm has no model ``name``."""
    import timm

    from pedetect.models.small_cnn import register

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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    **kwargs,
) -> nn.Module:
    """A timm feature extractor (``num_classes=0``: pooled features, ``.num_features`` wide)."""
    import timm

    check_backbone_name(name)
    if weights is not None and not Path(weights).is_file():
        read_state_dict(weights)  # raises the missing-file error before building anything
    extra = dict(kwargs)
    if drop_path_rate:
        extra["drop_path_rate"] = drop_path_rate
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, drop_rate=drop_rate, **extra)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model
