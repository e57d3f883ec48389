"""`guard fingerprint show FP`: what a fingerprint holds, as a table (or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from achilles_guard.cli.app import app
from achilles_guard.cli.common import Format, guarded, stdout
from achilles_guard.report.documents import fingerprint_doc

__all__ = ["fingerprint_app", "show_command"]

fingerprint_app = typer.Typer(
    help="Inspect a critical-weight fingerprint (fingerprint.safetensors written by `guard scan`).",
    no_args_is_help=True,
)
app.add_typer(fingerprint_app, name="fingerprint")


@fingerprint_app.command("show")
@guarded
def show_command(
    fingerprint: Path = typer.Argument(..., help="fingerprint.safetensors", show_default=False),
    verify_key: Optional[str] = typer.Option(None, help="Check its HMAC signature first: a key file path or env:VAR."),
    format: Format = typer.Option(Format.table, "--format", help="table or json (sarif is not meaningful here)."),
) -> None:
    """Print a fingerprint's header and its neurons (rank, slices, activation baselines).

    Exit 0 ok, 1 bad or missing signature with --verify-key, 2 unreadable or not a fingerprint.
    """
    from achilles_guard.errors import UsageError
    from achilles_guard.integrity.fingerprint import load_fingerprint, read_key
    from achilles_guard.report.documents import dumps

    if format is Format.sarif:
        raise UsageError("--format sarif: a fingerprint is not a finding; use table or json")
    key = read_key(verify_key) if verify_key else None
    fp = load_fingerprint(fingerprint, verify_key=key)
    doc = fingerprint_doc(fp, signature="verified" if key else ("signed, not checked" if fp.signed else "unsigned"))
    console = stdout()
    if format is Format.json:
        console.file.write(dumps(doc))
        return
    console.print(_render(doc))


def _render(doc: dict) -> Group:
    head = Text.assemble(
        ("fingerprint ", "dim"),
        (doc["path"], "bold"),
        (
            f"  {doc['format']} v{doc['schema_version']}, guard {doc['tool_version']}, signature: {doc['signature']}\n",
            "dim",
        ),
        ("model ", "dim"),
        (f"{doc['architecture']} ({doc['model_type']})", "bold"),
        (
            f"  config sha256 {doc['config_sha256'][:16]}…  baseline loss {doc['baseline_loss']:.4f} nats, "
            f"{doc['probe_texts']} probe text(s)\n",
            "dim",
        ),
        ("scan ", "dim"),
        (json.dumps(doc["scan_params"], sort_keys=True), "dim"),
    )
    crit = (
        ", ".join(f"{n['module']}[{n['channel']}]" for n in doc["critical_set"]) or "none (the scan did not converge)"
    )
    table = Table(title=f"{len(doc['neurons'])} neurons, {len(doc['slices'])} weight slices", title_justify="left")
    for col, justify in (("rank", "right"), ("neuron", "left"), ("layer", "right"), ("component", "left"),
                         ("critical", "left"), ("slices", "right"), ("shard(s)", "left"), ("mean", "right"),
                         ("std", "right"), ("max |a|", "right")):
        table.add_column(col, justify=justify)
    for n in doc["neurons"]:
        shards = sorted({doc["slices"][k]["shard"] for k in n["slices"]})
        b = n["baseline"]
        table.add_row(str(n["rank"]), f"{n['module']}[{n['channel']}]", str(n["layer"]), n["component"],
                      "yes" if n["critical"] else "", str(len(n["slices"])), ", ".join(shards),
                      f"{b['mean']:.3g}", f"{b['std']:.3g}", f"{b['max_abs']:.3g}")
    return Group(head, Text(f"critical set: {crit}", style="bold"), table)
