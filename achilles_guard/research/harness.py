"""Downstream benchmarks through lm-evaluation-harness with the mask applied (`guard bench`).

The already-loaded model and tokenizer objects are handed to the harness's own HF model class
(`lm_eval.models.huggingface.HFLM`); every harness task then runs on the masked model. Nothing here
re-implements an evaluator. Optional extra `eval` (`pip install 'achilles-guard[eval]'`).

    rows = run_harness(lm, ReportRanking.load(path), [0, n_star], ["hellaswag"], limit=100)
"""

from __future__ import annotations

from pathlib import Path

from achilles_guard.engine.masking import masked
from achilles_guard.errors import UsageError
from achilles_guard.report.documents import json_number

__all__ = ["run_harness", "require_lm_eval", "MISSING"]

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
        raise UsageError(
            f"--tasks: unknown to lm-eval: {', '.join(unknown)} (see 'lm_eval ls tasks', or --include-path)"
        )
    harness_model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = []
    for level in levels:
        plan = ranked.plan([level], scale)  # one row: the same mask for every harness batch
        with masked(lm.model, plan):
            results = lm_eval.simple_evaluate(
                model=harness_model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                bootstrap_iters=0, log_samples=False, verbosity="ERROR",
            )
        metrics = {task: {k.split(",")[0]: json_number(v) for k, v in values.items()
                          if isinstance(v, (int, float)) and "stderr" not in k and k.split(",")[0] not in _NOT_METRICS}
                   for task, values in results["results"].items()}
        out.append({"n": level, "results": metrics})
    return out


_NOT_METRICS = {"alias", "name", "sample_len", "sample_count"}
