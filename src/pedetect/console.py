"""What the commands say to a person: progress lines on stderr, and errors that end a command.

Imports only Typer (and the standard library), so that every ``<concern>/command.py`` can use it and ``pedetect --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from pedetect.runtime import is_global_zero


def echo(message: str) -> None:
    """A progress line on stderr, from the process that writes shared files only (one line per run,
    not one per GPU process)."""
    if is_global_zero():
        print(message, file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` in red on stderr; ``raise fail(...)`` ends the command with ``code``
    (2: the request cannot run as asked; 1: it ran and something was lost)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)
