"""What the commands say to a person: progress lines on stderr, and errors that end a command.

Imports only Typer (and the standard library), so that every ``<concern>/command.py`` can use it and ``pedetect --help`` stays fast.
"""

from __future__ import annotations

import os
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


def fail_disk_full(error: OSError, what: str, advice: str) -> typer.Exit:
    """:func:`fail` (exit 1) for a write that found no room (:func:`pedetect.io.is_disk_full`): what
    could not be written, the system's reason, then ``advice`` (what is kept, how to finish)."""
    reason = os.strerror(error.errno) if error.errno is not None else str(error)
    return fail(f"no room to write {what}: {reason} (the disk, a quota or a file size limit is full); {advice}", code=1)
