"""Masking the critical set in other ways: by a factor β (Table 11), in other precisions (Table 4),
and by every subset of it (Table 5)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from achilles_guard.engine.masking import MaskPlan
from achilles_guard.errors import GuardError, UsageError, first_line
from achilles_guard.research.evaluation import config_losses
from achilles_guard.research.studies.base import PlotSpec, Series, StudyContext, StudyResult, log10, scale_plan

__all__ = ["scale_study", "precision_study", "lesion_study", "subset_plan", "MAX_LESION"]

MAX_LESION = 12  # 2^12 - 1 = 4095 masks


def scale_study(ctx: StudyContext, betas: Sequence[float]) -> StudyResult:
    """PPL with the critical set multiplied by each β; β = 1 (the clean model) is the reference."""
    neurons = ctx.critical_set()
    scales = [1.0, *[float(b) for b in betas]]
    losses = ctx.losses(scale_plan(neurons, scales), len(scales))
    clean = losses[0]
    rows = tuple((b, log10(loss), _ppl(loss), log10(loss) - log10(clean)) for b, loss in zip(scales, losses))
    title = f"Table 11: masking the critical set ({len(neurons)} neurons) by a factor β (β=1: clean, β=0: masked)"
    plot = PlotSpec("bar", title, "β", "Δ log10 PPL vs β=1",
                    (Series("Δ", tuple(range(len(rows))), tuple(r[3] for r in rows)),),
                    xticklabels=tuple(f"{b:g}" for b in scales))
    return StudyResult("scale", title, ("beta", "log10_ppl", "ppl", "delta_log10"), rows,
                       {"betas": scales, "critical_set": [str(n) for n in neurons]}, plot)


def precision_study(ctx: StudyContext, dtypes: Sequence[str]) -> StudyResult:
    """Clean and masked PPL with the same critical set, the model reloaded in each dtype."""
    from achilles_guard.formats.load import load_model

    neurons = ctx.critical_set()
    plan = scale_plan(neurons, [1.0, ctx.params.mask_scale])  # row 0 clean, row 1 masked
    rows, notes = [], []
    for name in dtypes:
        try:
            lm = ctx.lm if str(ctx.lm.dtype).removeprefix("torch.") == name else load_model(
                ctx.lm.path, dtype=name, device=ctx.lm.device, **ctx.load_kwargs)
            clean, masked = config_losses(lm.model, ctx.corpus, plan, configs=2, batch_size=ctx.batch_size).tolist()
        except GuardError:
            raise
        except (RuntimeError, TypeError) as err:  # the device has no kernels for this dtype
            notes.append(f"{name}: not supported on {ctx.lm.device} ({first_line(err)[:120]})")
            rows.append((name, None, None, None, None))
            continue
        rows.append((name, log10(clean), log10(masked), _ppl(clean), log10(masked) - log10(clean)))
    title = f"Table 4: clean and masked PPL ({len(neurons)} critical neurons) in each precision"
    x = tuple(range(len(rows)))
    plot = PlotSpec("bar", title, "dtype", "log10 PPL",
                    (Series("clean", x, tuple(r[1] for r in rows)), Series("masked", x, tuple(r[2] for r in rows))),
                    xticklabels=tuple(dtypes))
    return StudyResult(
        "precision",
        title,
        ("dtype", "clean_log10_ppl", "masked_log10_ppl", "clean_ppl", "delta_log10"),
        tuple(rows),
        {"dtypes": list(dtypes), "critical_set": [str(n) for n in neurons]},
        plot,
        tuple(notes),
    )


def subset_plan(neurons, scale: float = 0.0) -> tuple[MaskPlan, torch.Tensor]:
    """One per-sample plan over every non-empty subset: row r masks the neurons of bitmask r+1.

    Returns (plan with 2^n - 1 rows, membership (2^n - 1, n) bool).
    """
    n = len(neurons)
    membership = ((torch.arange(1, 2**n)[:, None] >> torch.arange(n)[None, :]) & 1).bool()  # (R, n)
    channels, factors = {}, {}
    for module in dict.fromkeys(x.module for x in neurons):
        cols = torch.tensor([i for i, x in enumerate(neurons) if x.module == module])  # (k,)
        channels[module] = torch.tensor([neurons[i].channel for i in cols.tolist()], dtype=torch.long)
        factors[module] = torch.where(membership[:, cols], float(scale), 1.0).float()  # (R, k)
    return MaskPlan(channels, factors), membership


def lesion_study(ctx: StudyContext, *, epsilon: float | None = None) -> StudyResult:
    """Δ for every non-empty subset of the critical set, all in batched per-sample forwards."""
    neurons = tuple(ctx.critical_set())
    if len(neurons) > MAX_LESION:
        raise UsageError(
            f"the critical set has {len(neurons)} neurons; lesion covers at most {MAX_LESION} (2^n - 1 masks)"
        )
    eps = ctx.params.epsilon if epsilon is None else epsilon
    plan, membership = subset_plan(neurons, ctx.params.mask_scale)
    clean = ctx.losses(None, 1)[0]
    losses = ctx.losses(plan, membership.shape[0])
    records = []
    for bits, loss in zip(membership.tolist(), losses):
        members = [i for i, b in enumerate(bits) if b]
        delta = log10(loss) - log10(clean)
        records.append((f"[{','.join(map(str, members))}]", len(members), log10(loss), _ppl(loss), delta, delta >= eps))
    records.sort(key=lambda r: (-r[1], r[0]))
    title = (f"Table 5: every subset of the critical set ({len(neurons)} neurons, {len(records)} masks); "
             f"clean log10 PPL {log10(clean):.3f}")
    plot = PlotSpec("bar", title, "masked subset (indices into the critical set)", "Δ log10 PPL",
                    (Series("Δ", tuple(range(len(records))), tuple(r[4] for r in records)),),
                    xticklabels=tuple(r[0] for r in records), hline=eps, hline_label=f"ε = {eps:g}")
    collapsing = [r[0] for r in records if r[5]]
    notes = ("neurons: " + ", ".join(f"{i}={n}" for i, n in enumerate(neurons)),
             f"subsets with Δ >= ε: {', '.join(collapsing) if collapsing else 'none'}")
    return StudyResult("lesion", title, ("subset", "size", "log10_ppl", "ppl", "delta_log10", "collapsed"),
                       tuple(records), {"epsilon": eps, "critical_set": [str(n) for n in neurons],
                                        "clean_log10_ppl": log10(clean)}, plot, notes)


def _ppl(loss: float) -> float | None:
    return math.exp(loss) if math.isfinite(loss) and loss < 690 else None
