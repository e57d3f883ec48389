"""The `guard` Typer application every command module registers itself on (cli/__init__.py imports them)."""

from __future__ import annotations

import typer

from achilles_guard import __version__

__all__ = ["app"]

app = typer.Typer(
    name="guard",
    help="Find, fingerprint, monitor and harden the handful of neurons that can collapse an LLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"achilles-guard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Find, fingerprint, monitor and harden the handful of neurons that can collapse an LLM.

    Exit codes: 0 ok, 1 finding (gate failed, tampered, not mitigated), 2 usage or input error,
    3 runtime failure.
    """
