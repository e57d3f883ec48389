"""PPL against the number of neurons masked for each ranking method (Fig. 3)."""

from __future__ import annotations

import statistics
from typing import Sequence

from achilles_guard.engine.pcicn import RANKINGS
from achilles_guard.errors import UsageError
from achilles_guard.research.studies.base import PlotSpec, Series, StudyContext, StudyResult, log10

__all__ = ["compare_study"]


def compare_study(ctx: StudyContext, *, ns: Sequence[int], rankings: Sequence[str], runs: int) -> StudyResult:
    """log10 PPL with the top n of each ranking masked; `random` is averaged over `runs` seeds."""
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown:
        raise UsageError(f"--rankings: unknown {', '.join(unknown)}; use {', '.join(RANKINGS)}")
    if runs < 1 or any(n < 0 for n in ns):
        raise UsageError("--runs must be >= 1 and every --ns value >= 0")
    candidates = ctx.candidates()
    ns = sorted({min(n, candidates.total) for n in ns})
    scale = ctx.params.mask_scale
    columns, table, series = ["n"], {}, []
    for method in rankings:
        seeds = [ctx.params.seed + r for r in range(runs)] if method == "random" else [ctx.params.seed]
        trials = []
        for seed in seeds:
            ranking = ctx.rank(candidates=candidates, method=method, seed=seed, label=method)
            trials.append([log10(x) for x in ctx.losses(ranking.plan(ns, scale), len(ns))])
        means = [statistics.fmean(col) for col in zip(*trials)]
        stds = [statistics.pstdev(col) for col in zip(*trials)] if len(trials) > 1 else None
        columns.append(f"{method}_log10_ppl")
        table[method] = means
        if stds:
            columns.append(f"{method}_std")
            table[f"{method}_std"] = stds
        label = f"{method} (mean of {runs})" if method == "random" else method
        series.append(Series(label, tuple(ns), tuple(means), tuple(stds) if stds else None))
    rows = tuple((n, *(table[k][i] for k in table)) for i, n in enumerate(ns))
    title = "Fig. 3: log10 PPL against the number of masked neurons, per ranking method"
    plot = PlotSpec("line", title, "neurons masked", "log10 PPL", tuple(series), logx=max(ns) >= 100)
    return StudyResult("compare", title, tuple(columns), rows,
                       {**ctx.params.as_dict(), "ns": ns, "rankings": list(rankings), "runs": runs}, plot)
