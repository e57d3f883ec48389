"""`guard bench`: lm-evaluation-harness tasks on the masked model (the work is in `achilles_guard.research.harness`)."""

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
    parse_list,
    stdout,
)
from achilles_guard.errors import UsageError

__all__ = ["bench_command"]

@app.command("bench")
@guarded
def bench_command(
    model_dir: str = typer.Argument(..., help="Local model directory."),
    report: Path = typer.Option(..., "--report", help="report.json of 'guard scan' (its ranking is masked)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names."),
    levels: str = typer.Option("0,n*", help="Numbers of top-ranked neurons to mask; n* = the report's critical set."),
    include_path: Optional[Path] = typer.Option(None, help="Directory of extra task YAMLs (local tasks)."),
    limit: Optional[int] = typer.Option(None, help="Documents per task (for quick runs)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples (default: the task's)."),
    batch_size: int = typer.Option(1, help="Harness batch size."),
    mask_scale: Optional[float] = typer.Option(None, help="β for masked neurons (default: the report's)."),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    format: Format = typer.Option(Format.table, "--format", help="table or json."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file."),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
) -> None:
    """Run lm-evaluation-harness tasks on the model with 0, ..., n* neurons masked (Table 2)."""
    from achilles_guard.formats.load import load_model
    from achilles_guard.report.documents import dumps, write_json
    from achilles_guard.research.evaluation import ReportRanking, parse_levels
    from achilles_guard.research.harness import require_lm_eval, run_harness

    require_lm_eval()
    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include-path {include_path}: not a directory")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UsageError("--batch-size and --limit must be >= 1")
    task_list = parse_list(tasks, str, "--tasks")
    ranked = ReportRanking.load(report)
    wanted = parse_levels(levels, ranked)
    lm = load_model(
        model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    ranked.check_model(lm)
    scale = ranked.mask_scale if mask_scale is None else mask_scale
    rows = run_harness(lm, ranked, wanted, task_list, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                       batch_size=batch_size, scale=scale)
    doc = {"schema": "achilles-guard/bench/v1", "model": lm.path, "report": str(report), "tasks": task_list,
           "mask_scale": scale, "limit": limit, "levels": rows}
    if out is not None:
        write_json(out, doc)
    if format is Format.json:
        stdout().file.write(dumps(doc))
        return
    table = Table(title="Table 2: lm-evaluation-harness metrics with the top-n ranked neurons masked",
                  title_justify="left", header_style="bold")
    table.add_column("task")
    table.add_column("metric")
    for row in rows:
        table.add_column(f"n={row['n']}", justify="right")
    first = rows[0]["results"]
    for task, metrics in first.items():
        for metric in metrics:
            values = [r["results"].get(task, {}).get(metric) for r in rows]
            table.add_row(task, metric, *(f"{v:.4g}" if isinstance(v, (int, float)) else str(v) for v in values))
    stdout().print(table)
