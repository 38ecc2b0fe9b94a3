"""The `hmlm` command line: parse arguments, call one function per command, turn known errors into one line.

Each command imports its module inside the function, so `hmlm --help` stays fast and nothing imports cli.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from hmlm.errors import UserError

app = typer.Typer(
    help="Character-level language modelling with the Hierarchical Multiscale LSTM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

SET_HELP = "Override a config key, e.g. -s model.hidden_sizes=[256,256,256] (value parsed as YAML). Repeatable."


def _version(value: bool) -> None:
    if value:
        from hmlm import __version__

        typer.echo(f"hmlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Character-level language modelling with the Hierarchical Multiscale LSTM."""


@config_app.command("show")
def config_show(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
) -> None:
    """Print the resolved config (defaults, then the file, then -s overrides) as YAML."""
    from hmlm.config import load_config

    typer.echo(load_config(config, set_).to_yaml(), nl=False)


def main() -> None:
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
