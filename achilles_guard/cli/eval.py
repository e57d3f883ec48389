"""`guard eval`: perplexity on a local corpus with the top-n ranked neurons masked (Table 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from achilles_guard.cli.app import app
from achilles_guard.cli.common import (
    AllowPickleOption,
    DeviceOption,
    DtypeOption,
    Format,
    TrustRemoteCodeOption,
    guarded,
    rows_progress,
    stdout,
)
from achilles_guard.errors import UsageError

__all__ = ["eval_command"]


def _fmt(x, digits=3) -> str:
    return "inf" if x is None else f"{x:.{digits}f}"


@app.command("eval")
@guarded
def eval_command(
    model_dir: str = typer.Argument(..., help="Local model directory (the one the report was made for)."),
    report: Path = typer.Option(..., "--report", help="report.json written by 'guard scan' (its ranking is masked)."),
    data: Path = typer.Option(..., "--data", help="Corpus: a .txt/.raw file, a .jsonl file or a directory of them."),
    levels: str = typer.Option(
        "0,1,2,4,n*", help="Numbers of top-ranked neurons to mask; n* = the report's critical set."
    ),
    max_length: Optional[int] = typer.Option(
        None, help="Window length in tokens (default: min(1024, the model's context))."
    ),
    stride: Optional[int] = typer.Option(None, help="New tokens scored per window (default: max-length / 2)."),
    max_tokens: Optional[int] = typer.Option(None, help="Use only the first N tokens of the corpus."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl files."),
    mask_scale: Optional[float] = typer.Option(None, help="β for masked neurons (default: the report's)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per forward (default: from free memory)."),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    format: Format = typer.Option(Format.table, "--format", help="table or json."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file (atomically)."),
    cross_model: bool = typer.Option(
        False,
        "--cross-model",
        help="Apply a report made for another model of the same architecture (paper Table 10: variants).",
    ),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
) -> None:
    """Perplexity on a local corpus with the top-n ranked neurons masked, for each level.

    Sliding windows of --max-length tokens; every token after the first is scored exactly once.
    Exit 0 ok, 2 bad input, 3 runtime failure.
    """
    from achilles_guard.formats.load import load_model
    from achilles_guard.report.documents import dumps, write_json
    from achilles_guard.research.evaluation import ReportRanking, build_corpus, evaluate_levels, parse_levels

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
    if format is Format.sarif:
        raise UsageError("--format sarif is for scans; use table or json")
    ranked = ReportRanking.load(report)
    wanted = parse_levels(levels, ranked)
    lm = load_model(
        model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    ranked.check_model(lm, cross_model=cross_model)
    corpus, source, documents = build_corpus(lm, data, text_field=text_field, max_length=max_length, stride=stride,
                                             max_tokens=max_tokens)
    scale = ranked.mask_scale if mask_scale is None else mask_scale
    with rows_progress("eval · windows × levels") as update:
        result = evaluate_levels(lm, corpus, ranked, wanted, data=source, documents=documents, scale=scale,
                                 batch_size=batch_size, progress=update)
    doc = result.as_dict(
        {
            "path": lm.path,
            "architecture": lm.architecture,
            "dtype": str(lm.dtype).removeprefix("torch."),
            "device": lm.device,
            "config_sha256": lm.config_sha256,
        }
    )
    doc["report"] = str(report)
    if out is not None:
        write_json(out, doc)
    if format is Format.json:
        stdout().file.write(dumps(doc))
        return
    console = stdout()
    d = doc["data"]
    console.print(f"[bold]{source}[/]: {documents} document(s), {d['tokens']:,} tokens, {d['windows']} window(s) of "
                  f"{corpus.windows.shape[1]} (stride {d['stride']}), {d['scored_tokens']:,} tokens scored")
    table = Table(title="Perplexity with the top-n ranked neurons masked (Table 1: Original → Masked)",
                  title_justify="left", header_style="bold")
    for col in ("masked n", "loss (nats)", "log10 PPL", "PPL", "Δ log10 PPL"):
        table.add_column(col, justify="right")
    table.add_row("0 (original)", _fmt(result.baseline_loss, 4), _fmt(doc["baseline"]["log10_ppl"]),
                  f"{doc['baseline']['ppl']:.4g}", "0.000")
    for level in doc["levels"]:
        ppl = level["ppl"]
        table.add_row(
            str(level["n"]) + (" (n*)" if level["n"] == ranked.n_star else ""),
            _fmt(level["loss"], 4),
            _fmt(level["log10_ppl"]),
            "overflow" if ppl is None else f"{ppl:.4g}",
            _fmt(level["delta_log10"]),
            style="bold red" if (level["delta_log10"] is None or level["delta_log10"] >= ranked.epsilon) else None,
        )
    console.print(table)
    if out is not None:
        console.print(f"[dim]wrote {out}[/]")
