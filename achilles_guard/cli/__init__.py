"""`guard`: the command-line interface.

Each command lives in its own module and registers itself on `app`. `main()` is the console
script: it turns usage errors into one line and exit code 2, interrupts into 130.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.22 vendors click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as _click_errors


__all__ = ["app", "main"]

from achilles_guard.cli.app import app

# Command modules register themselves on import (one line each), in the order --help lists them
# (pyproject's ruff config lets these imports sit here unsorted and unused).
# isort: off
from achilles_guard.cli import scan as _scan
from achilles_guard.cli import verify as _verify
from achilles_guard.cli import fleet as _fleet
from achilles_guard.cli import fingerprint_cmd as _fingerprint_cmd
from achilles_guard.cli import tamper as _tamper
from achilles_guard.cli import monitor as _monitor
from achilles_guard.cli import harden as _harden
from achilles_guard.cli import repair as _repair
from achilles_guard.cli import eval as _eval
from achilles_guard.cli import study as _study
from achilles_guard.cli import generate as _generate
from achilles_guard.cli import report_cmd as _report_cmd
from achilles_guard.cli import bench as _bench
# isort: on


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one clear line per usage error (exit 2), never a traceback."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="guard", standalone_mode=False)
    except _click_errors.NoArgsIsHelpError:
        return 2  # typer already printed the help
    except _click_errors.UsageError as err:
        hint = (
            f" (see 'guard {err.ctx.info_name} --help')"
            if err.ctx and err.ctx.info_name != "guard"
            else " (see 'guard --help')"
        )
        typer.echo(f"error: {err.format_message()}{hint}", err=True)
        return 2
    except typer.Abort:
        typer.echo("interrupted; nothing was written", err=True)
        return 130
    except _click_errors.ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
