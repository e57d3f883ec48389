"""`guard repair`: write a copy of a checkpoint with every tampered critical slice restored, verified."""

from __future__ import annotations

from pathlib import Path

import typer

from achilles_guard.cli.app import app
from achilles_guard.cli.common import Format, guarded, stdout
from achilles_guard.errors import EXIT_FINDING, EXIT_OK
from achilles_guard.report.documents import dumps

__all__ = ["repair_command"]


@app.command("repair")
@guarded
def repair_command(
    checkpoint_dir: Path = typer.Argument(..., help="The (possibly tampered) checkpoint directory; never modified."),
    fingerprint: Path = typer.Option(..., "--fingerprint", help="fingerprint.safetensors of the intact model."),
    out: Path = typer.Option(..., "--out", help="New directory for the repaired copy (must not exist, or be empty)."),
    format: Format = typer.Option(Format.table, "--format", help="What stdout carries: table or json."),
) -> None:
    """Restore tampered producing slices from the fingerprint into a verified copy.

    Exit 0 every fingerprinted slice intact in the copy, 1 some slice could not be restored
    (tensor missing, reshaped or re-typed) or a tokenizer/template/generation file differs from the
    fingerprinted one (it is copied as is; restore it from the trusted source), 2 bad input (nothing
    written), 3 runtime failure.
    """
    from achilles_guard.integrity.rewrite import repair

    outcome = repair(checkpoint_dir, fingerprint, out)
    doc = outcome.as_dict()
    console = stdout()
    if format is Format.json:
        console.file.write(dumps(doc))
    else:
        counts = doc["counts"]
        console.print(f"repaired copy: {out}")
        console.print(
            f"slices: {counts['intact']} intact, {counts['restored']} restored, {counts['unrepairable']} unrepairable"
        )
        for s in doc["slices"]:
            console.print(f"  {s['status']:<12} {s['key']}" + (f"  ({s['reason']})" if s["reason"] else ""))
        if not outcome.config_matches:
            console.print("[yellow]warning: config.json differs from the fingerprinted model's config[/]")
        for name in outcome.files_changed:
            console.print(f"[red]{name} differs from the fingerprinted file and cannot be restored from the "
                          "fingerprint (it holds the file's sha256, not its bytes): copy it from the trusted source[/]")
        console.print(
            "verified: every repairable slice matches the fingerprint"
            if outcome.verified
            else "[red]verification FAILED[/]"
        )
    ok = outcome.verified and not outcome.unrepairable and not outcome.files_changed
    raise typer.Exit(EXIT_OK if ok else EXIT_FINDING)
