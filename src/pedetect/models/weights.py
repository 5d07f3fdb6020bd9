"""Model weights on disk: safetensors only (never a pickle), written atomically.

Every model of a bundle (stage-1 CNN, sequence head, heart model) is saved and loaded here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from safetensors.torch import load_file, save_file
from torch import nn

from pedetect.io import atomic_path

M = TypeVar("M", bound=nn.Module)


def save_weights(
    model: nn.Module,
    path: str | Path,
    *,
    kind: str = "pedetect.slice_classifier",
    metadata: dict[str, str] | None = None,
) -> None:
    """The model's tensors as safetensors (atomically), with ``kind`` and ``metadata`` in the header."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "kind": kind, **(metadata or {})})


def load_weights(model: M, path: str | Path) -> M:
    """``model`` with the tensors of the safetensors file at ``path`` (every key, exactly)."""
    model.load_state_dict(load_file(str(path)))
    return model
