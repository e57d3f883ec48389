"""n* as the noise scale α, the sample count K and the threshold ε vary (Fig. 4, Table 6)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from achilles_guard.errors import UsageError
from achilles_guard.research.studies.base import PlotSpec, Series, StudyContext, StudyResult

__all__ = ["alpha_study", "samples_study", "epsilon_study"]


def alpha_study(ctx: StudyContext, alphas: Sequence[float]) -> StudyResult:
    """A full scan per α (K fixed): n* and Δ(n*)."""
    if any(a <= 0 for a in alphas):
        raise UsageError("--alphas: every α must be > 0")
    return _sweep(ctx, "alpha", "α", [float(a) for a in alphas], lambda a: ctx.rank(alpha=a, label=f"α={a:g}"),
                  title="Fig. 4 (left): critical-set size n* against the noise scale α",
                  fixed={"samples": ctx.params.samples})


def samples_study(ctx: StudyContext, samples: Sequence[int]) -> StudyResult:
    """A full scan per K (α fixed): n* and Δ(n*)."""
    if any(k < 1 for k in samples):
        raise UsageError("--samples-list: every K must be >= 1")
    return _sweep(ctx, "samples", "K", [int(k) for k in samples], lambda k: ctx.rank(samples=k, label=f"K={k}"),
                  title="Fig. 4 (right): critical-set size n* against the sample count K",
                  fixed={"alpha": ctx.params.alpha})


def _sweep(ctx, study, symbol, values, ranker, *, title, fixed) -> StudyResult:
    rows, sets = [], []
    for value in values:
        result = ctx.search(ranker(value))
        sets.append(frozenset(result.critical_set) if result.converged else None)
        rows.append((value, result.n_star if result.converged else "not converged", result.delta_log10))
    reference = _most_common(sets)
    rows = tuple((*row, s == reference if s is not None else False) for row, s in zip(rows, sets))
    stable = [n for n, s in zip(rows, sets) if s is not None]
    ref_n = len(reference) if reference is not None else None
    plot = PlotSpec(
        "line", title, symbol, "critical neurons n*",
        (Series(f"n* ({', '.join(f'{k}={v:g}' for k, v in fixed.items())})", tuple(values),
                tuple(r[1] if isinstance(r[1], int) else None for r in rows)),),
        hline=ref_n, hline_label=f"most common set ({ref_n})" if ref_n else "",
    )
    notes = () if stable else (f"no {symbol} value gave a critical set within --max-neurons {ctx.params.max_neurons}",)
    return StudyResult(study, title, (symbol, "n_star", "delta_log10", "same_set_as_most_common"), rows,
                       {**ctx.params.as_dict(), study: values}, plot, notes)


def epsilon_study(ctx: StudyContext, epsilons: Sequence[float]) -> StudyResult:
    """One ranking, one search up to the largest ε: n*(ε) is the first n of the curve with Δ >= ε."""
    if any(e <= 0 for e in epsilons):
        raise UsageError("--epsilons: every ε must be > 0")
    result = ctx.search(ctx.rank(label="ranking"), epsilon=max(epsilons))
    rows = []
    for eps in epsilons:
        hit = next(((n, d) for n, d in result.curve if d >= eps), None)
        rows.append(
            (float(eps), hit[0] if hit else f"not converged ({ctx.params.max_neurons}+)", hit[1] if hit else None)
        )
    title = "Table 6: critical-set size n* for each threshold ε ('not converged' = the paper's 1000+)"
    plot = PlotSpec(
        "bar", title, "ε", "critical neurons n*",
        (Series("n*", tuple(range(len(rows))), tuple(r[1] if isinstance(r[1], int) else None for r in rows)),),
        xticklabels=tuple(f"{e:g}" for e in epsilons),
    )
    notes = tuple(
        f"ε={r[0]:g}: no n <= {ctx.params.max_neurons} reaches Δ >= ε" for r in rows if not isinstance(r[1], int)
    )
    return StudyResult("epsilon", title, ("epsilon", "n_star", "delta_log10"), tuple(rows),
                       {**ctx.params.as_dict(), "epsilons": list(epsilons)}, plot, notes)


def _most_common(sets):
    counts = Counter(s for s in sets if s is not None)
    return counts.most_common(1)[0][0] if counts else None
