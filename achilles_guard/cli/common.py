"""What every command shares: consoles, error handling, progress, output formats."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from achilles_guard.engine.paper import PAPER
from achilles_guard.errors import EXIT_RUNTIME, GuardError, InputError, UsageError

__all__ = [
    "DtypeOption",
    "DeviceOption",
    "TrustRemoteCodeOption",
    "AllowPickleOption",
    "TextOption",
    "TextFileOption",
    "AlphaOption",
    "SamplesOption",
    "SeedOption",
    "EpsilonOption",
    "MaxNeuronsOption",
    "ComponentsOption",
    "AttacksOption",
    "AllowShortOption",
    "FingerprintTopOption",
    "SignKeyOption",
    "Format",
    "stdout",
    "stderr",
    "info",
    "guarded",
    "progress_bar",
    "prepare_out_dir",
    "fail",
    "DeprecatedOption",
    "deprecated_alias",
    "parse_list",
    "rows_progress",
]


# The model-loading options every command that loads a model shares (one help text each).
def DtypeOption():  # reads like the typer.Option it returns
    return typer.Option(
        "auto", "--dtype", help="auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32, float64."
    )


def DeviceOption():
    return typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (several GPUs: auto spreads the model).")


def TrustRemoteCodeOption():
    return typer.Option(
        False, "--trust-remote-code", help="Allow the model's own Python code to run (off: it is refused)."
    )


def AllowPickleOption():
    return typer.Option(False, "--allow-pickle", help="Allow pickle weights (*.bin), which can run code when loaded.")


# The scan options `guard scan` and `guard fleet scan` share (the fleet hands them to each model's scan).
def TextOption():
    return typer.Option([], "--text", help="Probe text (repeatable). Default: the packaged texts.")


def TextFileOption():
    return typer.Option([], "--text-file", help="File holding a probe text (repeatable).")


def AlphaOption():
    return typer.Option(PAPER.alpha, help="Noise scale α of stage 1.")


def SamplesOption():
    return typer.Option(PAPER.samples, help="Monte-Carlo samples K of stage 1.")


def SeedOption():
    return typer.Option(PAPER.seed, help="Seed of the noise generator.")


def EpsilonOption():
    return typer.Option(PAPER.epsilon, help="Collapse threshold ε, in orders of magnitude of perplexity.")


def MaxNeuronsOption():
    return typer.Option(PAPER.max_neurons, help="Search budget: give up (converged: false) past this many neurons.")


def ComponentsOption():
    return typer.Option("all", help="Candidate modules: all, mlp-out, mlp, attention, norms, paper, or a regex.")


def AttacksOption():
    return typer.Option(
        "all", "--attacks", help="Attack portfolio, comma separated: pcicn, activation, gradient, greedy, or all."
    )


def AllowShortOption():
    return typer.Option(False, "--allow-short", help="Accept probe texts under 10 tokens.")


def FingerprintTopOption():
    return typer.Option(64, help="Also fingerprint the weights of the top-R ranked neurons.")


def SignKeyOption():
    return typer.Option(None, help="Sign the fingerprint with HMAC-SHA256: a key file path or env:VAR.")


class Format(str, Enum):
    table = "table"
    json = "json"
    sarif = "sarif"


def stdout() -> Console:
    """Results only. Width fixed when not a terminal so pasted output is stable."""
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 140, highlight=False)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """A progress/log line on stderr, only when stderr is a terminal (quiet in CI and pipes)."""
    if sys.stderr.isatty():
        stderr().print(message)


def fail(message: str, code: int) -> typer.Exit:
    from rich.markup import escape  # a message is plain text: "achilles-guard[ray]" is not a markup tag

    stderr().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def guarded(fn):
    """Turn GuardErrors, OOM and interrupts into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GuardError as err:
            raise fail(str(err), err.exit_code) from None
        except KeyboardInterrupt:
            stderr().print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except MemoryError:
            raise fail("out of memory; try a smaller --samples batch, --dtype float16 or a GPU", EXIT_RUNTIME) from None
        except typer.Exit:
            raise
        except Exception as err:  # the last line of defence: one line, exit 3
            if type(err).__name__ == "OutOfMemoryError":
                raise fail("the device ran out of memory; try --device cpu or fewer --samples", EXIT_RUNTIME) from None
            if os.environ.get("GUARD_DEBUG"):
                traceback.print_exc()
            raise fail(
                f"internal error: {type(err).__name__}: {err} (set GUARD_DEBUG=1 for a traceback)", EXIT_RUNTIME
            ) from None

    return wrapper


_STAGE_LABELS = {"rank": "stage 1: noise samples", "search": "stage 2: candidates", "finetune": "finetune steps"}


@contextmanager
def progress_bar(enabled: bool | None = None) -> Iterator["callable"]:
    """Yields `update(task_name, stage, done, total, detail="")`; a Rich progress on stderr when it is a terminal.

    `stage` is "rank", "search" or "finetune"; `detail` (e.g. "loss 2.31") is shown after the label.
    """
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield lambda *a: None
        return
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=stderr(), transient=True,
    )
    tasks: dict[tuple[str, str], int] = {}

    def update(name: str, stage: str, done: int, total: int, detail: str = "") -> None:
        key = (name, stage)
        label = f"{name} · {_STAGE_LABELS.get(stage, stage)}"
        if key not in tasks:
            tasks[key] = progress.add_task(label, total=total)
        progress.update(tasks[key], completed=done, total=total, description=f"{label} {detail}" if detail else label)

    with progress:
        yield update


def prepare_out_dir(out: Path) -> Path:
    """Prove OUT is writable before any long work starts, without creating it (a bad-input run leaves no
    empty OUT behind): an existing OUT gets a write probe, a missing one needs a writable existing ancestor."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if not out.exists():
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"--out {out}: not writable (cannot create it under {parent})")
        return out
    try:
        probe = out / f".guard-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"--out {out}: not writable ({err.strerror or err})") from None
    return out


def DeprecatedOption(old: str, new: str):  # reads like the typer.Option it returns
    """A hidden option kept so old command lines still work: `old` is read as `new` (see deprecated_alias)."""
    return typer.Option(None, old, hidden=True, help=f"Deprecated alias of {new}.")


def deprecated_alias(value, old_value, *, old: str, new: str):
    """`old_value` (with a warning on stderr) when the deprecated option was given, else `value`."""
    if old_value is None:
        return value
    stderr().print(f"[yellow]warning:[/] {old} is deprecated; use {new}")
    return old_value


def parse_list(spec: str, kind: Callable, option: str) -> list:
    """`"1,2,4"` -> `[1, 2, 4]` for a comma-list option; UsageError naming the option otherwise."""
    try:
        values = [kind(p.strip()) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{option} {spec!r}: expected a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


@contextmanager
def rows_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """`update(done, total)`: a Rich bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=stderr(), transient=True)
    task = progress.add_task(description, total=None)
    with progress:
        yield lambda done, total: progress.update(task, completed=done, total=total)
