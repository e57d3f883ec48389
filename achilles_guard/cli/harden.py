"""`guard harden`: apply a defence, re-run the attack with the same parameters, and say if it worked."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from achilles_guard.cli.app import app
from achilles_guard.cli.common import (
    DeviceOption,
    DtypeOption,
    Format,
    guarded,
    prepare_out_dir,
    progress_bar,
    stderr,
    stdout,
)
from achilles_guard.errors import EXIT_FINDING, EXIT_OK, InputError, UsageError
from achilles_guard.report.documents import dumps

__all__ = ["harden_command"]


@app.command("harden")
@guarded
def harden_command(
    model_dir: Path = typer.Argument(
        ..., help="The model directory (or .gguf file) that was scanned; the hardened model is a safetensors directory."
    ),
    fingerprint: Path = typer.Option(..., "--fingerprint", help="fingerprint.safetensors written by guard scan."),
    strategy: str = typer.Option(
        ...,
        "--strategy",
        help="pin, redundancy, heads, split, rotate, finetune, a chain like redundancy+heads, or auto.",
    ),
    out: Path = typer.Option(..., "--out", help="Directory for the hardened model, its report and harden-report.json."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="The scan's report.json (default: next to the fingerprint)."
    ),
    max_cost: float = typer.Option(0.01, help="Largest acceptable clean cost, in orders of magnitude of perplexity."),
    min_margin: float = typer.Option(
        10.0, "--min-margin", help="Mitigated needs the smallest collapsing set to grow at least this many times."
    ),
    redundancy_copies: int = typer.Option(
        32,
        "--redundancy-copies",
        help="redundancy: channels carrying each critical residual channel (and copies of its writing units).",
    ),
    redundancy_wide: int = typer.Option(
        0,
        "--redundancy-wide",
        help="redundancy: also carry every other residual channel the fingerprint stores on this many "
        "channels (0: only the attack sets' channels).",
    ),
    known_sets: List[Path] = typer.Option(
        [],
        "--known-sets",
        help="A scan report (report.json, repeatable) whose collapsing sets every re-attack re-tries with every "
        "copy of their neurons, next to the original scan's sets (the 'known' attack).",
    ),
    head_copies: int = typer.Option(
        32,
        "--head-copies",
        help="heads: copies of each attention head that holds a fingerprinted q/k/v channel (>= 2).",
    ),
    copies: int = typer.Option(8, help="split: copies of each critical unit (>= 2)."),
    seed: int = typer.Option(0, help="rotate: seed of the orthogonal matrix; finetune: seed of the dropout."),
    rotation: str = typer.Option(
        "auto", help="rotate: auto (Hadamard when the size is a power of 2), hadamard, random."
    ),
    data: Optional[Path] = typer.Option(None, help="finetune: local .txt/.jsonl file or directory of them."),
    steps: int = typer.Option(200, help="finetune: optimizer steps."),
    lr: float = typer.Option(1e-4, help="finetune: learning rate."),
    batch_size: int = typer.Option(4, help="finetune: sequences per step."),
    seq_len: int = typer.Option(64, help="finetune: tokens per sequence."),
    drop_p: float = typer.Option(0.5, help="finetune: probability of masking each top-ranked neuron in a batch."),
    drop_top: int = typer.Option(32, help="finetune: how many top-ranked neurons are dropout candidates."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="finetune: λ of the KL term to the frozen original."),
    held_out_file: List[Path] = typer.Option(
        [], "--held-out-file", help="Extra held-out text for the clean cost (repeatable)."
    ),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    format: Format = typer.Option(Format.table, "--format", help="What stdout carries: table or json."),
) -> None:
    """Harden a model against critical-neuron collapse and verify it by re-attacking with the whole portfolio.

    The re-attack searches up to max(scan budget, 10 x --min-margin x n0) neurons, pruning every set.

    Exit 0 mitigated, 1 not mitigated, 2 bad input (nothing written), 3 runtime failure.
    """
    from achilles_guard.defenses.harden import HardenRequest, harden, parse_strategy
    from achilles_guard.defenses.reattack import HELD_OUT_TEXTS

    if strategy != "auto":
        parse_strategy(strategy)
    from achilles_guard.formats.load import check_model_header, check_model_path

    check_model_path(model_dir)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise UsageError(
            f"--out {out} is (inside) the model directory; guard never writes in place: choose a new directory"
        )
    if not fingerprint.is_file():
        raise InputError(f"--fingerprint {fingerprint}: no such file (run guard scan MODEL --out DIR first)")
    if copies < 1 or ("split" in strategy.split("+") and copies < 2):
        raise UsageError(f"--copies must be >= 2 (got {copies}): a unit needs at least two copies to be split")
    held = list(HELD_OUT_TEXTS)
    for path in held_out_file:
        if not path.is_file():
            raise InputError(f"--held-out-file {path}: no such file")
        held.append((path.stem, path.read_text(encoding="utf-8").strip()))
    finetune = {
        "data": str(data) if data else None,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "drop_p": drop_p,
        "drop_top": drop_top,
        "kl_weight": kl_weight,
        "seed": seed,
    }
    request = HardenRequest(
        model_dir,
        fingerprint,
        report,
        strategy,
        out,
        copies=copies,
        seed=seed,
        rotation=rotation,
        max_cost=max_cost,
        dtype=dtype,
        device=device,
        held_out=tuple(held),
        finetune=finetune,
        min_margin=min_margin,
        redundancy_copies=redundancy_copies,
        redundancy_wide=redundancy_wide,
        known_sets=tuple(known_sets),
        head_copies=head_copies,
    )
    _precheck(request)
    check_model_header(model_dir)  # header checks (truncated, unsupported type...) before OUT exists
    first_created = _first_missing(out)
    prepare_out_dir(out).mkdir(parents=True, exist_ok=True)
    log = stderr()
    try:
        with progress_bar() as update:
            outcome = harden(request, progress=update, log=lambda m: log.print(f"[dim]{m}[/]"))
    except BaseException:  # a load error, a bad model, Ctrl-C...: leave no empty directory behind
        if first_created is not None:
            _remove_empty(out, first_created)
        raise
    doc = outcome.as_dict()
    console = stdout()
    if format is Format.json:
        console.file.write(dumps(doc))
    else:
        console.print(_table(doc))
        console.print(f"[dim]wrote {out / 'harden-report.json'}[/]")
    raise typer.Exit(EXIT_OK if outcome.verdict == "mitigated" else EXIT_FINDING)


def _first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet (what this run creates)."""
    missing = None
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return missing
        missing = candidate
    return missing


def _remove_empty(out: Path, top: Path) -> None:
    """Remove the empty directories this run created, from inside OUT up to `top`; keep anything with files
    (a finetune checkpoint to resume from stays)."""
    out, top = out.absolute(), top.absolute()
    for directory in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _rmdir(directory)
    for directory in (out, *out.parents):
        if not _rmdir(directory) or directory == top:
            return


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()  # only an empty directory
        return True
    except OSError:
        return False


def _precheck(request) -> None:
    """Every input check that can fail, before OUT is created."""
    from achilles_guard.defenses.harden import DEFENSES, auto_order, parse_strategy
    from achilles_guard.integrity.fingerprint import load_fingerprint

    fp = load_fingerprint(request.fingerprint)
    report = request.report or request.fingerprint.parent / "report.json"
    if not report.is_file():
        raise InputError(
            f"scan report {report}: no such file; give --report, or keep report.json next to the fingerprint"
        )
    if request.min_margin < 1:
        raise UsageError(f"--min-margin must be >= 1 (got {request.min_margin})")
    candidates = auto_order(fp, request) if request.strategy == "auto" else [request.strategy]
    for name in dict.fromkeys(n for c in candidates for n in parse_strategy(c)):
        DEFENSES[name].check(request, fp)


def _table(doc: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    for attempt in doc["attempts"]:
        table = Table(title=f"guard harden · {attempt['strategy']}", title_justify="left")
        table.add_column("metric")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for row in attempt["table"]:
            table.add_row(row["metric"], row["before"], row["after"])
        parts.append(table)
        for reason in attempt["reasons"]:
            parts.append(Text(f"  · {reason}", style="dim"))
        for note in attempt["details"].get("notes", []):
            parts.append(Text(f"  ! {note}", style="yellow"))
        style = "bold green" if attempt["verdict"] == "mitigated" else "bold red"
        parts.append(Text(f"  verdict: {attempt['verdict']}", style=style))
    if doc.get("stopped"):
        parts.append(Text(f"stopped: {doc['stopped']}", style="dim"))
    parts.append(
        Text(
            f"overall: {doc['verdict']} (strategy {doc['chosen']}, margin "
            f"{next(a['margin_text'] for a in doc['attempts'] if a['strategy'] == doc['chosen'])})",
            style="bold green" if doc["verdict"] == "mitigated" else "bold red",
        )
    )
    return Group(*parts)
