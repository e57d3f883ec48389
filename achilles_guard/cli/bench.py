"""`guard bench`: downstream benchmarks through lm-evaluation-harness with the mask applied.

The already-loaded model and tokenizer objects are handed to the harness's own HF model class
(`lm_eval.models.huggingface.HFLM`); every harness task then runs on the masked model. Nothing here
re-implements an evaluator. Optional extra `eval` (`pip install 'achilles-guard[eval]'`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from achilles_guard.cli import app
from achilles_guard.cli.common import AllowPickleOption, DeviceOption, DtypeOption, Format, TrustRemoteCodeOption, guarded, stdout
from achilles_guard.cli.eval import open_model, parse_list
from achilles_guard.errors import UsageError
from achilles_guard.masking import masked

__all__ = ["bench_command", "run_harness", "require_lm_eval"]

MISSING = "lm-evaluation-harness is not installed: pip install 'achilles-guard[eval]' (package lm-eval)"


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(MISSING) from None
    return lm_eval, HFLM, TaskManager


def run_harness(lm, ranked, levels: list[int], tasks: list[str], *, include_path: Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1,
                scale: float = 0.0) -> list[dict]:
    """`[{"n": level, "results": {task: {metric: value}}}]`, the model masked at each level."""
    lm_eval, HFLM, TaskManager = require_lm_eval()
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UsageError(f"--tasks: unknown to lm-eval: {', '.join(unknown)} (see 'lm_eval ls tasks', or --include-path)")
    harness_model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = []
    for level in levels:
        plan = ranked.plan([level], scale)  # one row: the same mask for every harness batch
        with masked(lm.model, plan):
            results = lm_eval.simple_evaluate(
                model=harness_model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                bootstrap_iters=0, log_samples=False, verbosity="ERROR",
            )
        metrics = {task: {k.split(",")[0]: _clean(v) for k, v in values.items()
                          if isinstance(v, (int, float)) and "stderr" not in k and k.split(",")[0] not in _NOT_METRICS}
                   for task, values in results["results"].items()}
        out.append({"n": level, "results": metrics})
    return out


_NOT_METRICS = {"alias", "name", "sample_len", "sample_count"}


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


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
    from achilles_guard.evaluation import ReportRanking, parse_levels
    from achilles_guard.report import dumps, write_json

    require_lm_eval()
    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include-path {include_path}: not a directory")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UsageError("--batch-size and --limit must be >= 1")
    task_list = parse_list(tasks, str, "--tasks")
    ranked = ReportRanking.load(report)
    wanted = parse_levels(levels, ranked)
    lm = open_model(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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
