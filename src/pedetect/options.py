"""The command-line options that several commands take, declared once: the flag, its limits and its help.

Each function returns the ``typer.Option`` a command gives as a parameter's default, with the
command's own default value; where the option means something a little different in a command,
that command says how (``then``, ``of``, ``note``). ``pedetect serve`` gives every option the
default None (a flag given overrides its --config file), and Typer shows no default for None: the
help names the default itself then.

Imports only Typer, so that every ``<concern>/command.py`` can use it and ``pedetect --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

import typer


def _help(text: str, default: object, shown: str) -> str:
    return text if default is not None else f"{text} [default: {shown}]"


def models(default: Any, note: str) -> Any:
    """``--model``, repeatable: the bundles to ensemble."""
    return typer.Option(
        default, "--model", help=f"Model bundle made by pedetect train; repeat to ensemble several ({note})."
    )


def device(default: str | None) -> Any:
    """``--device``: where the models run."""
    return typer.Option(default, "--device", help=_help("auto (CUDA when available), cpu or cuda.", default, "auto"))


def runtime(default: str | None) -> Any:
    """``--runtime``: PyTorch, ONNX Runtime or its int8 model."""
    text = (
        "auto, torch, onnx or onnx-int8. auto: PyTorch on a GPU; on a CPU the fastest runtime that pedetect export "
        "made and found exact enough (int8, then ONNX fp32), else PyTorch."
    )
    return typer.Option(default, "--runtime", help=_help(text, default, "auto"))


def threads(of: str) -> Any:
    """``--threads``: CPU threads for ``of`` (the models, each worker's models), default every core."""
    return typer.Option(None, "--threads", min=1, help=f"CPU threads for {of} (default: every core).")


def decode_timeout(default: float | None, then: str) -> Any:
    """``--decode-timeout SECONDS``: the limit of a slice's decoding; ``then``: what becomes of a slice
    past it, and what 0 does, in this command."""
    return typer.Option(
        default,
        "--decode-timeout",
        min=0.0,
        metavar="SECONDS",
        help=_help(
            f"Seconds one slice may take to decode; past that its decoder process is stopped and {then}", default, "60"
        ),
    )


def progress() -> Any:
    """``--progress/--no-progress``: progress bars on stderr (on by default)."""
    return typer.Option(True, "--progress/--no-progress", help="Show progress bars (rate and ETA) on stderr.")


def overrides() -> Any:
    """``--set KEY=VALUE``, repeatable: one recipe value overridden."""
    return typer.Option(
        [],
        "--set",
        help="Override one config value, e.g. --set cnn.epochs=2 --set runtime.devices=2 (value read as YAML).",
    )
