"""Where the code runs: which process of a distributed run this is, and which device to compute on.

Torch is imported only inside :func:`resolve_device`: the distributed-rank check is needed by every
command, including those that never load a model.
"""

from __future__ import annotations

import os

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def is_global_zero() -> bool:
    """True in the process that writes shared files (before and during distributed runs)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def resolve_device(accelerator: str) -> str:
    """The torch device of a recipe's ``runtime.accelerator`` or ``predict --device``.

    ``auto``: CUDA when there is a CUDA device, else the CPU; ``gpu`` and ``cuda`` need one (a clear
    error otherwise); ``mps``: Apple's GPU.
    """
    import torch

    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown device {accelerator!r}; choose {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{accelerator}: no CUDA device is available (use cpu or auto)")
        return "cuda"
    return accelerator
