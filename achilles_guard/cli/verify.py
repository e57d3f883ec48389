"""`guard verify-checkpoint`: gate a deployment on a checkpoint's critical weights matching a fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from achilles_guard.cli.app import app
from achilles_guard.cli.common import DeprecatedOption, Format, deprecated_alias, guarded, stderr, stdout
from achilles_guard.errors import EXIT_FINDING, EXIT_OK

__all__ = ["verify_command", "render_verification"]


@app.command("verify-checkpoint")
@guarded
def verify_command(
    checkpoint_dir: Path = typer.Argument(
        ..., help="Checkpoint directory (safetensors, sharded or not), or a .gguf file.", show_default=False
    ),
    fingerprint: Path = typer.Option(
        ..., "--fingerprint", help="fingerprint.safetensors written by `guard scan`.", show_default=False
    ),
    functional: bool = typer.Option(
        False, "--functional", help="Also load the model: probe loss vs baseline, and re-mask the critical set."
    ),
    max_delta_log10: float = typer.Option(
        0.05, help="--functional fails when the probe loss rises by >= this many orders of magnitude of PPL."
    ),
    tolerance: Optional[float] = DeprecatedOption("--tolerance", "--max-delta-log10"),
    verify_key: Optional[str] = typer.Option(None, help="Require a valid HMAC signature: a key file path or env:VAR."),
    dtype: str = typer.Option("auto", help="--functional: dtype to load the model in."),
    device: str = typer.Option("auto", help="--functional: auto, cpu, cuda or cuda:N."),
    quick: bool = typer.Option(
        False, "--quick", help="Only the fingerprinted slices and norm gains (milliseconds); the rest is not checked."
    ),
    format: Format = typer.Option(Format.table, "--format", help="What stdout carries: table, json or sarif."),
) -> None:
    """Check that every tensor the loader loads is the fingerprinted one (about one read of the weights).

    Same dtype: byte-identical; another float dtype: the same values up to the new dtype's rounding;
    each finding names the tensor, the rows and a severity (critical, ranked, other). --quick reads
    only the critical slices (milliseconds) and says what it skipped; --functional also loads the model.
    Exit 0 intact (every tensor, slice and the config; functional check ok), 1 tampered, ambiguous,
    incomplete (a fingerprint without tensor records, in full mode) or a bad/missing signature with
    --verify-key, 2 bad input, 3 runtime failure.
    """
    from achilles_guard.errors import UsageError
    from achilles_guard.integrity.fingerprint import load_fingerprint, read_key
    from achilles_guard.integrity.slices import FunctionalParams
    from achilles_guard.integrity.verify import verify_model
    from achilles_guard.report.documents import dumps, verify_document, verify_sarif

    max_delta_log10 = deprecated_alias(max_delta_log10, tolerance, old="--tolerance", new="--max-delta-log10")
    if not max_delta_log10 > 0:
        raise UsageError(f"--max-delta-log10 must be > 0 (got {max_delta_log10})")
    key = read_key(verify_key) if verify_key else None
    fp = load_fingerprint(fingerprint, verify_key=key)
    if key is not None:
        signature = "verified"
    elif fp.signed:
        signature = "not checked"
        stderr().print(
            "[yellow]warning:[/] the fingerprint is signed but no --verify-key was given; its signature was not checked"
        )
    else:
        signature = "unsigned"
    params = FunctionalParams(max_delta_log10=max_delta_log10, dtype=dtype, device=device) if functional else None
    report = verify_model(checkpoint_dir, fp, quick=quick, functional=params, signature=signature, sign_key=key)
    doc = verify_document(report)
    if report.bytes_read is not None:  # GGUF: what the check cost (additive fields)
        doc["checkpoint"].update(
            format="gguf", bytes_read=report.bytes_read, header_bytes=report.header_bytes, file_size=report.file_size
        )
    console = stdout()
    if format is Format.json:
        console.file.write(dumps(doc))
    elif format is Format.sarif:
        console.file.write(dumps(verify_sarif(doc)))
    else:
        console.print(render_verification(doc))
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FINDING)


def _render_files(files: dict) -> list:
    """The loader files' lines: what was compared, each finding, what no check covers."""
    out = []
    if files["recorded"]:
        bad = len(files["findings"])
        out.append(Text(
            f"files: {len(files['compared'])} loader files (tokenizer, chat template, generation config) compared, "
            f"{len(files['compared']) - bad} byte-identical, {bad} finding(s)"
            + (f"; not covered: {', '.join(files['not_covered'])}" if files["not_covered"] else ""),
            style="dim" if not bad else "",
        ))
        for f in files["findings"]:
            out.append(Text(f"  {f['name']} ({f['role']}): {f['detail']}", style="bold red"))
    return out


def render_verification(doc: dict) -> Group:
    """The terminal view of a verification document."""
    parts: list = []
    ckpt, fp = doc["checkpoint"], doc["fingerprint"]
    parts.append(Text.assemble(
        ("checkpoint ", "dim"), (ckpt["path"], "bold"), ("  vs fingerprint ", "dim"), (fp["path"], "bold"),
        (f"  ({fp['slices']} slices of {fp['neurons']} neurons, signature {fp['signature']}, "
         f"{len(ckpt['shards_read'])} shard(s) read in {doc['timings']['verify_s'] * 1000:.1f} ms"
         + (f", {ckpt['bytes_read']:,} bytes of {ckpt['file_size']:,} read: header {ckpt['header_bytes']:,}, "
            f"blocks {ckpt['bytes_read'] - ckpt['header_bytes']:,}" if "bytes_read" in ckpt else "") + ")", "dim"),
    ))
    counts = ", ".join(f"{n} {status}" for status, n in doc["counts"].items() if n)
    parts.append(Text(f"slices: {counts}"))
    if not doc["config_matches"]:
        parts.append(Text(
            f"config.json changed: sha256 {ckpt['config_sha256'][:16]}… != fingerprinted {fp['config_sha256'][:16]}… "
            f"(architecture {ckpt['architecture']} unchanged)", style="bold red",
        ))
    bad = [s for s in doc["slices"] if s["status"] not in ("intact", "equivalent")]
    if bad:
        table = Table(title="Changed weight slices", title_justify="left")
        for col in ("neuron(s)", "critical", "slice", "shard", "status"):
            table.add_column(col)
        for s in bad:
            who = ", ".join(f"{n['module']}[{n['channel']}]" for n in s["neurons"]) or "-"
            table.add_row(who, "yes" if s["critical"] else "", s["key"], s["shard"],
                          Text(s["description"], style="red"))
        parts.append(table)
    fc = doc["functional"]
    if fc is not None:
        delta = "inf" if fc["delta_log10"] is None else f"{fc['delta_log10']:+.3f}"
        masked = "n/a" if fc["masked_delta_log10"] is None and fc["still_critical"] is None else (
            "inf" if fc["masked_delta_log10"] is None else f"{fc['masked_delta_log10']:.2f}")
        parts.append(Text(
            f"functional: probe loss Δ = {delta} orders of magnitude (tolerance {fc['tolerance']}) "
            f"{'ok' if fc['loss_ok'] else 'FAILED'}; critical set re-masked: Δ = {masked} "
            f"(still critical: {'n/a' if fc['still_critical'] is None else 'yes' if fc['still_critical'] else 'NO'})",
            style="green" if fc["ok"] else "bold red",
        ))
    if doc.get("functional_skipped"):
        parts.append(Text(f"functional: {doc['functional_skipped']}", style="yellow"))
    for line in doc.get("layout", {}).get("ambiguities", []):
        parts.append(Text(f"ambiguous layout: {line}", style="bold red"))
    tc = doc.get("tensors")
    if tc is not None:
        parts.append(Text(
            f"tensors: {tc['present']} loaded, {tc['recorded']} recorded: {tc['identical']} byte-identical, "
            f"{tc['equivalent']} re-cast within rounding, {tc['findings_count']} finding(s) "
            f"({tc['bytes_hashed']:,} bytes hashed in {tc['seconds']:.2f} s)"
            + ("" if tc["projections_checked"] else "; signed fingerprint without --verify-key: row sketches "
               "compared on absolute sum and norm only"), style="dim" if not tc["findings_count"] else "",
        ))
        if tc["findings"]:
            table = Table(title="Changed tensors", title_justify="left")
            for col in ("severity", "tensor", "file", "kind", "rows", "what"):
                table.add_column(col)
            for f in tc["findings"][:50]:
                rows = "?" if f["rows_changed"] is None else (
                    f"{f['rows_changed']:,}/{f['rows_total']:,}: " + ", ".join(map(str, f["rows"][:6]))
                    + (" …" if f["rows_changed"] > 6 else ""))
                table.add_row(Text(f["severity"], style="bold red" if f["severity"] == "critical" else "red"),
                              f["tensor"], f["file"], f["kind"], rows, f["detail"])
            parts.append(table)
            if len(tc["findings"]) > 50:
                parts.append(Text(f"… and {len(tc['findings']) - 50} more (all of them in --format json)"))
    files = doc.get("files")
    if files is not None:
        parts.extend(_render_files(files))
    if doc.get("not_checked"):
        parts.append(Text(f"not checked: {doc['not_checked']}", style="yellow"))
    recorded = files is not None and files["recorded"]
    with_files = f", the {len(files['compared'])} tokenizer/template/generation files" if recorded else ""
    unseen = "; the tokenizer files were NOT compared (see above)" if files and files["not_compared"] else ""
    if doc["verdict"] == "intact" and tc is not None:
        parts.append(Text(f"verdict: INTACT (every one of the {tc['present']} loaded tensors{with_files} and every "
                          f"critical weight slice match the fingerprint{unseen})", style="bold green"))
    elif doc["verdict"] == "intact":
        and_files = with_files.replace(", the", " and the", 1)
        parts.append(Text(f"verdict: INTACT (quick: the critical weight slices{and_files} match; the rest of the "
                          f"model was not checked{unseen})", style="bold green"))
    elif doc["verdict"] == "incomplete":
        parts.append(Text("verdict: INCOMPLETE (the critical slices match, but the fingerprint records no tensors: "
                          "the rest of the model was not checked)", style="bold red"))
    elif doc["verdict"] == "ambiguous":
        n = len(doc["layout"]["ambiguities"])
        parts.append(Text(
            f"verdict: AMBIGUOUS ({n} layout problem(s): the bytes a loader uses are not uniquely the verified ones)",
            style="bold red",
        ))
    else:
        tampered = doc["tampered_neurons"]
        crit = sum(n["critical"] for n in tampered)
        sev = (tc or {}).get("severities")
        what = []
        if tampered or not ((tc and tc["findings_count"]) or (files and files["findings"])):
            what.append(f"{len(tampered)} fingerprinted neuron(s) changed, {crit} of them critical")
        if tc and tc["findings_count"]:
            what.append(f"{tc['findings_count']} tensor finding(s): {sev['critical']} critical, "
                        f"{sev['ranked']} ranked, {sev['other']} other")
        if files and files["findings"]:
            what.append(f"{len(files['findings'])} loader file(s) changed: "
                        + ", ".join(f["name"] for f in files["findings"][:4])
                        + (" …" if len(files["findings"]) > 4 else ""))
        parts.append(Text(f"verdict: TAMPERED ({'; '.join(what)})", style="bold red"))
    return Group(*parts)
