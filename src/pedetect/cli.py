"""The one console script, ``pedetect``: a subcommand per pipeline stage.

Each concern keeps its own command in ``<concern>/command.py``; those modules import only Typer at
module level so that ``pedetect --help`` stays fast. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import typer

from pedetect import __version__
from pedetect.demo.command import demo_command
from pedetect.export.command import export_command
from pedetect.hospital.command import predict_command, serve_command
from pedetect.metric.command import calibrate_command, check_command, evaluate_command
from pedetect.store.command import prepare_command
from pedetect.synth.command import synth_command
from pedetect.train.command import split_command, train_command
from pedetect.view.command import view_command

app = typer.Typer(
    name="pedetect",
    help="Pulmonary embolism detection on CT pulmonary angiography (RSNA-STR PE challenge pipeline).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs re-flow instead of keeping source line breaks
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pedetect {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Pulmonary embolism detection on CT pulmonary angiography."""


# In this order in --help; each command is named by its function: ``synth_command`` is ``pedetect synth``.
for command in (
    synth_command,
    prepare_command,
    evaluate_command,
    check_command,
    calibrate_command,
    split_command,
    train_command,
    predict_command,
    view_command,
    export_command,
    serve_command,
    demo_command,
):
    app.command(command.__name__.removesuffix("_command"))(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
