"""`guard tamper`: RED-TEAM HELPER. Argument handling and printing; the work is in `achilles_guard.integrity.tamper`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from achilles_guard.cli.app import app
from achilles_guard.cli.common import guarded, stderr, stdout
from achilles_guard.integrity.tamper_options import (
    BANNER,
    TamperKind,
    check_kind_options,
    check_out,
)

__all__ = ["tamper_command"]


@app.command("tamper")
@guarded
def tamper_command(
    checkpoint_dir: Path = typer.Argument(..., help="Checkpoint to copy (never modified).", show_default=False),
    out: Path = typer.Option(..., "--out", help="Where the sabotaged copy goes (must not exist).", show_default=False),
    neurons: Optional[Path] = typer.Option(
        None, "--neurons", help="report.json or fingerprint.safetensors naming the neurons."
    ),
    neuron: List[str] = typer.Option(
        [], "--neuron", help="A neuron as MODULE[CHANNEL] (as reports print it) or MODULE:CHANNEL (repeatable)."
    ),
    top: Optional[int] = typer.Option(
        None, help="With --neurons: the top-N ranked neurons instead of the critical set."
    ),
    kind: TamperKind = typer.Option(TamperKind.zero, "--kind", help="zero, scale, sign-flip or noise."),
    scale: float = typer.Option(0.3, help="--kind scale: the factor β."),
    noise: float = typer.Option(0.1, help="--kind noise: relative L2 size of the added noise."),
    seed: int = typer.Option(0, help="--kind noise: seed."),
) -> None:
    """RED-TEAM HELPER: write a sabotaged copy of a checkpoint to test your gates. Never deploy it.

    Zeroes (or scales, sign-flips, perturbs) the weight slices that produce the chosen neurons:
    the critical set of a report.json / fingerprint, its top-N, or explicit --neuron MODULE[CHANNEL].
    Refuses to write over its input or an existing --out. Exit 0 written, 2 bad input.
    """
    check_kind_options(kind, scale, noise)
    check_out(checkpoint_dir, out)
    from achilles_guard.integrity.rewrite import tamper, tamper_targets

    targets = tamper_targets(checkpoint_dir, neurons, neuron, top)
    stderr().print(f"[bold yellow]{BANNER}[/]", soft_wrap=True)  # after every input check: errors stay one line
    written = tamper(checkpoint_dir, out, targets, kind=kind, scale=scale, noise=noise, seed=seed)
    table = Table(title=f"RED-TEAM: sabotaged copy written to {written} ({kind.value})", title_justify="left")
    for col in ("neuron", "slice", "axis", "index"):
        table.add_column(col)
    for t in targets:
        table.add_row(str(t.neuron), t.checkpoint_key, str(t.axis), str(t.index))
    console = stdout()
    console.print(table)
    console.print(f"[bold red]{BANNER}[/]", soft_wrap=True)
