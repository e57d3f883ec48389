"""`guard generate`: greedy answers before and after masking (Tables 7-9) and the top-k next-token
probabilities with 0, 1, ..., n* neurons masked (Fig. 1)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

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
    stdout,
)
from achilles_guard.errors import UsageError

__all__ = ["generate_command"]


@app.command("generate")
@guarded
def generate_command(
    model_dir: str = typer.Argument(..., help="Local model directory."),
    report: Path = typer.Option(..., "--report", help="report.json of 'guard scan' (its critical set is masked)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
    max_new_tokens: int = typer.Option(24, help="Greedy tokens per answer."),
    top_k: int = typer.Option(5, help="Next-token probabilities shown per level (first prompt)."),
    mask_scale: Optional[float] = typer.Option(None, help="β for masked neurons (default: the report's)."),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    format: Format = typer.Option(Format.table, "--format", help="table or json."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write Fig. 1's top-k panels as a PNG (needs matplotlib)."),
    cross_model: bool = typer.Option(
        False,
        "--cross-model",
        help="Apply a report made for another model of the same architecture (paper Table 10: variants).",
    ),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
) -> None:
    """Answers before and after masking the critical set, and top-k next-token probabilities per level."""
    from achilles_guard.engine.masking import MaskPlan
    from achilles_guard.formats.load import load_model
    from achilles_guard.report.documents import atomic_write_bytes, dumps, write_json
    from achilles_guard.research.evaluation import ReportRanking
    from achilles_guard.research.generation import greedy, topk_levels

    if max_new_tokens < 1 or top_k < 1:
        raise UsageError("--max-new-tokens and --top-k must be >= 1")
    if png is not None:
        from achilles_guard.research.plots import require_matplotlib

        require_matplotlib()
    ranked = ReportRanking.load(report)
    neurons = ranked.require_critical_set()
    lm = load_model(
        model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    ranked.check_model(lm, cross_model=cross_model)
    scale = ranked.mask_scale if mask_scale is None else mask_scale
    plan = MaskPlan.fixed(neurons, scale)
    answers = [
        {"prompt": p, "clean": greedy(lm, p, None, max_new_tokens), "masked": greedy(lm, p, plan, max_new_tokens)}
        for p in prompt
    ]
    levels = topk_levels(lm, prompt[0], ranked, list(range(len(neurons) + 1)), top_k, scale)
    doc = {
        "schema": "achilles-guard/generate/v1",
        "model": lm.path,
        "report": str(report),
        "mask_scale": scale,
        "critical_set": [str(n) for n in neurons],
        "answers": answers,
        "topk": {"prompt": prompt[0], "levels": levels},
    }
    if out is not None:
        write_json(out, doc)
    if png is not None:
        from achilles_guard.research.plots import topk_png

        atomic_write_bytes(png, topk_png(levels, f"Next token after {prompt[0]!r}"))
    if format is Format.json:
        stdout().file.write(dumps(doc))
        return
    console = stdout()
    table = Table(title=f"Tables 7-9: greedy answers before and after masking {len(neurons)} critical neuron(s)",
                  title_justify="left", header_style="bold", show_lines=True)
    for col in ("prompt", "clean model", "critical set masked"):
        table.add_column(col, overflow="fold")
    for a in answers:
        table.add_row(a["prompt"], repr(a["clean"]), repr(a["masked"]))
    console.print(table)
    top = Table(title=f"Fig. 1: top-{top_k} next tokens after {prompt[0]!r}, masking the first n critical neurons",
                title_justify="left", header_style="bold")
    top.add_column("masked n", justify="right")
    for i in range(top_k):
        top.add_column(f"#{i + 1}")
    for level in levels:
        top.add_row(str(level["n"]), *(f"{t['token']!r} {t['prob']:.3f}" for t in level["top"]))
    console.print(top)
