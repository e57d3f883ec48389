"""Masking the top-ranked or random neurons of one component at a time (Table 3, Tables 12-15)."""

from __future__ import annotations

import statistics
from typing import Sequence

from achilles_guard.errors import UsageError
from achilles_guard.research.studies.base import PlotSpec, Series, StudyContext, StudyResult, log10

__all__ = ["components_study", "DEFAULT_PRESETS"]

DEFAULT_PRESETS = ("mlp-out", "up", "gate", "attention", "norms")


def components_study(ctx: StudyContext, *, presets: Sequence[str], counts: Sequence[int], runs: int) -> StudyResult:
    """Δ log10 PPL with the top-n (pcicn) or n random neurons of each component masked."""
    if any(c < 1 for c in counts) or runs < 0:
        raise UsageError("--counts must be >= 1 and --runs >= 0")
    clean = log10(ctx.losses(None, 1)[0])
    rows, series, notes = [], [], []
    for preset in presets:
        try:
            candidates = ctx.candidates(preset)
        except UsageError as err:  # e.g. no gate projection in a GPT-2 MLP
            notes.append(f"{preset}: {err}")
            continue
        ns = [min(c, candidates.total) for c in counts]
        ranking = ctx.rank(candidates=candidates, method="pcicn", label=f"{preset} pcicn")
        pcicn = [log10(x) - clean for x in ctx.losses(ranking.plan(ns, ctx.params.mask_scale), len(ns))]
        rows += [(preset, "pcicn", n, d, None) for n, d in zip(ns, pcicn)]
        series.append(Series(f"{preset} · top by Imp", tuple(ns), tuple(pcicn)))
        if runs:
            trials = []
            for r in range(runs):
                rnd = ctx.rank(
                    candidates=candidates, method="random", seed=ctx.params.seed + r, label=f"{preset} random"
                )
                trials.append([log10(x) - clean for x in ctx.losses(rnd.plan(ns, ctx.params.mask_scale), len(ns))])
            means = [statistics.fmean(col) for col in zip(*trials)]
            stds = [statistics.pstdev(col) for col in zip(*trials)]
            rows += [(preset, f"random x{runs}", n, m, s) for n, m, s in zip(ns, means, stds)]
            series.append(Series(f"{preset} · random (mean of {runs})", tuple(ns), tuple(means), tuple(stds)))
    if not rows:
        raise UsageError(f"--presets {','.join(presets)}: no preset matches a module of this model")
    title = "Table 3 / Tables 12-15: masking the top-n or n random neurons of one component"
    plot = PlotSpec("line", title, "neurons masked", "Δ log10 PPL", tuple(series), logx=True,
                    hline=ctx.params.epsilon, hline_label=f"ε = {ctx.params.epsilon:g}")
    return StudyResult(
        "components",
        title,
        ("component", "ranking", "n", "delta_log10", "std"),
        tuple(rows),
        {
            "presets": list(presets),
            "counts": list(counts),
            "runs": runs,
            "clean_log10_ppl": clean,
            "alpha": ctx.params.alpha,
            "samples": ctx.params.samples,
            "seed": ctx.params.seed,
        },
        plot,
        tuple(notes),
    )
