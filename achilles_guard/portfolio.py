"""The attack portfolio: the paper's PCICN plus stronger attacks, each set pruned to 1-minimality.

Attacks (`--attacks`, default `all`):
- `pcicn`, `activation`, `gradient`: stage 2 (pcicn.search) over that ranking. PCICN is the paper's
  search, unchanged; it stays the report's `critical_set` / `n_star`.
- `greedy`: the union of the top-M neurons of the three rankings is the pool; each step adds the
  pool neuron that raises Δ the most, every remaining candidate evaluated in one batched forward
  (per-sample masks, chunked by `pcicn.search_batch_size`), until Δ >= ε or the budget ends.

Every collapsing set is pruned: while some neuron can be dropped with Δ still >= ε, drop the one
whose removal leaves Δ highest (all leave-one-out masks in one batch). The reported set is
1-minimal and its Δ is the Δ of that exact set. Once an attack has found a set of n neurons, the
later attacks only search below n (their entries say "none below n" when they find nothing).

    portfolio = run_portfolio(model, input_ids, candidates, rankings, primary, params)
    portfolio.strongest.n, portfolio.strongest.attack
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from achilles_guard.errors import UsageError
from achilles_guard.masking import MaskPlan, masked
from achilles_guard.neurons import CandidateSet, Neuron
from achilles_guard.pcicn import Ranking, SearchResult, clean_loss, search, search_batch_size
from achilles_guard.perplexity import row_losses

__all__ = [
    "ATTACKS",
    "RANKED_ATTACKS",
    "DEFAULT_GREEDY_POOL",
    "AttackResult",
    "Strongest",
    "Portfolio",
    "parse_attacks",
    "set_losses",
    "prune",
    "greedy",
    "run_portfolio",
    "strongest_of",
]

ATTACKS = ("pcicn", "activation", "gradient", "greedy")
RANKED_ATTACKS = ("pcicn", "activation", "gradient")
DEFAULT_GREEDY_POOL = 64
LN10 = math.log(10.0)


@dataclass(frozen=True)
class AttackResult:
    """One attack on one probe text. `critical_set` is pruned (1-minimal); `delta_log10` is its Δ."""

    attack: str
    converged: bool
    n: int | None
    delta_log10: float | None  # Δ of the reported set; when not converged, the last Δ tried (None if none)
    critical_set: tuple[Neuron, ...]
    curve: tuple[tuple[int, float], ...]  # (n, Δ) as the attack searched, before pruning
    seconds: float
    n_found: int | None = None  # size before pruning
    note: str = ""


@dataclass(frozen=True)
class Strongest:
    """The smallest collapsing set over attacks (ties: larger Δ), and over texts at the top level."""

    attack: str
    n: int
    delta_log10: float
    critical_set: tuple[Neuron, ...]
    text: str | None = None


@dataclass(frozen=True)
class Portfolio:
    attacks: tuple[AttackResult, ...]
    strongest: Strongest | None
    rankings: dict = field(default_factory=dict)  # attack name -> Ranking used

    def neurons(self) -> list[Neuron]:
        """The union of every attack's set, in attack order."""
        return list(dict.fromkeys(n for a in self.attacks for n in a.critical_set))


def parse_attacks(spec: str) -> tuple[str, ...]:
    """`all` or a comma-separated list of ATTACKS, in canonical order; UsageError otherwise."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not names:
        raise UsageError(f"--attacks {spec!r}: give all or a comma-separated list of {', '.join(ATTACKS)}")
    if names == ["all"]:
        return ATTACKS
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise UsageError(f"--attacks: unknown attack {unknown[0]!r}; use all or some of {', '.join(ATTACKS)}")
    return tuple(a for a in ATTACKS if a in names)


# --- batched evaluation of arbitrary sets ------------------------------------------------------


def _locate(candidates: CandidateSet, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = candidates.offsets
    module_index = torch.searchsorted(offsets, pool, right=True) - 1
    return module_index, pool - offsets[module_index]


def set_losses(model, input_ids: torch.Tensor, candidates: CandidateSet, pool: torch.Tensor, hit: torch.Tensor,
               *, scale: float = 0.0, batch_size: int | None = None) -> torch.Tensor:
    """Loss (nats) with row b masking the pool neurons j where hit[b, j]; pool: (P,) global indices."""
    names = tuple(c.name for c in candidates.candidates)
    module_index, channels = _locate(candidates, pool)
    per_batch = batch_size or search_batch_size(model, input_ids.shape[1])
    out = []
    for start in range(0, hit.shape[0], per_batch):
        rows = hit[start : start + per_batch]
        used = rows.any(0)  # columns some row masks
        plan = MaskPlan.per_row(names, module_index[used], channels[used], rows[:, used], scale=scale)
        batch = input_ids.expand(rows.shape[0], -1)
        with torch.no_grad(), masked(model, plan):
            logits = model(input_ids=batch, use_cache=False).logits
        out.append(row_losses(logits, batch))
    return torch.cat(out) if out else torch.zeros(0)


def prune(model, input_ids: torch.Tensor, candidates: CandidateSet, members: Sequence[int], *, baseline: float,
          epsilon: float, scale: float = 0.0, batch_size: int | None = None) -> tuple[list[int], float]:
    """Drop neurons while Δ stays >= ε (best leave-one-out first): a 1-minimal subset and its Δ."""
    current = list(members)
    pool = torch.tensor(current, dtype=torch.long)
    full = set_losses(model, input_ids, candidates, pool, torch.ones(1, len(current), dtype=torch.bool),
                      scale=scale, batch_size=batch_size)
    delta = (float(full[0]) - baseline) / LN10
    while len(current) > 1:
        pool = torch.tensor(current, dtype=torch.long)
        hit = ~torch.eye(len(current), dtype=torch.bool)  # row i leaves neuron i out
        deltas = (
            set_losses(model, input_ids, candidates, pool, hit, scale=scale, batch_size=batch_size) - baseline
        ) / LN10
        deltas = torch.nan_to_num(deltas, nan=math.inf)  # a NaN loss is a collapse
        best = int(torch.argmax(deltas))
        if not float(deltas[best]) >= epsilon:
            break
        delta = float(deltas[best])
        current.pop(best)
    return current, delta


def greedy(model, input_ids: torch.Tensor, candidates: CandidateSet, pool: torch.Tensor, *, baseline: float,
           epsilon: float, budget: int, scale: float = 0.0, batch_size: int | None = None
           ) -> tuple[list[int], tuple[tuple[int, float], ...], bool]:
    """Forward selection over `pool` (P,) global indices: -> (chosen, curve, reached ε)."""
    P = int(pool.numel())
    chosen = torch.zeros(P, dtype=torch.bool)
    picked: list[int] = []
    curve: list[tuple[int, float]] = []
    for _ in range(min(budget, P)):
        remaining = (~chosen).nonzero().flatten()  # (r,)
        hit = chosen.expand(len(remaining), P).clone()
        hit[torch.arange(len(remaining)), remaining] = True
        deltas = (
            set_losses(model, input_ids, candidates, pool, hit, scale=scale, batch_size=batch_size) - baseline
        ) / LN10
        deltas = torch.nan_to_num(deltas, nan=math.inf)  # a NaN loss is a collapse
        best = int(torch.argmax(deltas))  # ties: the first (pool order)
        chosen[remaining[best]] = True
        picked.append(int(pool[remaining[best]]))
        curve.append((len(picked), float(deltas[best])))
        if float(deltas[best]) >= epsilon:
            return picked, tuple(curve), True
    return picked, tuple(curve), False


# --- the portfolio -----------------------------------------------------------------------------


def _neurons(candidates: CandidateSet, members: Sequence[int]) -> tuple[Neuron, ...]:
    return tuple(candidates.neurons(members))


def _global(ranking: Ranking, n: int) -> list[int]:
    return ranking.order[:n].tolist()


def run_portfolio(model, input_ids: torch.Tensor, candidates: CandidateSet, rankings: dict, *, attacks: Sequence[str],
                  primary: tuple[str, SearchResult] | None, epsilon: float, step: int, max_neurons: int,
                  scale: float = 0.0, greedy_pool: int = DEFAULT_GREEDY_POOL, times: dict | None = None) -> Portfolio:
    """Run `attacks` (ranked ones use `rankings[name]`); `primary` = (ranking name, its full search)
    is reused for that attack. `times[name]` adds ranking seconds to an attack's entry."""
    times = times or {}
    baseline = clean_loss(model, input_ids)
    results: list[AttackResult] = []
    bound: int | None = None  # smallest set found so far: later attacks search below it

    def budget() -> int:
        return max_neurons if bound is None else min(max_neurons, bound - 1)

    def finish(name, t0, found: list[int], curve, note="") -> AttackResult:
        nonlocal bound
        kept, delta = prune(model, input_ids, candidates, found, baseline=baseline, epsilon=epsilon, scale=scale)
        if not delta >= epsilon:  # the set no longer reaches ε when re-measured alone (float noise at the edge)
            return AttackResult(name, False, None, delta, (), curve, time.perf_counter() - t0 + times.get(name, 0.0),
                                len(found), f"set of {len(found)} did not reproduce Δ >= ε")
        bound = len(kept) if bound is None else min(bound, len(kept))
        return AttackResult(name, True, len(kept), delta, _neurons(candidates, kept), curve,
                            time.perf_counter() - t0 + times.get(name, 0.0), len(found), note)

    order = list(attacks)
    if primary is not None and primary[0] in order:  # the full, unbounded paper search goes first
        order.remove(primary[0])
        order.insert(0, primary[0])
    for name in order:
        t0 = time.perf_counter()
        if name in RANKED_ATTACKS:
            ranking = rankings[name]
            if primary is not None and name == primary[0]:
                res = primary[1]
            else:
                limit = budget()
                if limit < step:
                    results.append(
                        AttackResult(name, False, None, None, (), (), times.get(name, 0.0), None, f"none below {bound}")
                    )
                    continue
                res = search(model, input_ids, ranking, epsilon=epsilon, step=step, max_neurons=limit, scale=scale)
            if res.converged:
                results.append(finish(name, t0, _global(ranking, res.n_star), res.curve))
            else:
                note = f"none below {bound}" if bound is not None else ""
                results.append(AttackResult(name, False, None, res.delta_log10 if res.curve else None, (), res.curve,
                                            time.perf_counter() - t0 + times.get(name, 0.0), None, note))
        elif name == "greedy":
            pool = torch.tensor(
                list(
                    dict.fromkeys(
                        i
                        for r in RANKED_ATTACKS
                        if r in rankings
                        for i in _global(rankings[r], min(greedy_pool, len(rankings[r])))
                    )
                ),
                dtype=torch.long,
            )
            limit = budget()
            if limit < 1:
                results.append(
                    AttackResult(name, False, None, None, (), (), times.get(name, 0.0), None, f"none below {bound}")
                )
                continue
            picked, curve, ok = greedy(model, input_ids, candidates, pool, baseline=baseline, epsilon=epsilon,
                                       budget=limit, scale=scale)
            if ok:
                results.append(finish(name, t0, picked, curve))
            else:
                note = (
                    f"none below {bound}"
                    if bound is not None
                    else f"no set within {min(limit, len(pool))} of a pool of {len(pool)}"
                )
                results.append(AttackResult(name, False, None, curve[-1][1] if curve else None, (), curve,
                                            time.perf_counter() - t0 + times.get(name, 0.0), None, note))
        else:  # pragma: no cover - parse_attacks validates names
            raise UsageError(f"unknown attack {name!r}")
    by_name = {r.attack: r for r in results}
    ordered = tuple(by_name[a] for a in ATTACKS if a in by_name)
    return Portfolio(ordered, strongest_of(ordered), dict(rankings))


def strongest_of(results: Sequence[AttackResult], text: str | None = None) -> Strongest | None:
    """Smallest converged set; ties: larger Δ, then attack order."""
    done = [r for r in results if r.converged and r.n is not None]
    if not done:
        return None
    best = min(done, key=lambda r: (r.n, -(r.delta_log10 if r.delta_log10 is not None else math.inf)))
    return Strongest(best.attack, best.n, best.delta_log10, best.critical_set, text)
