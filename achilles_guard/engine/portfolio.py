"""The attack portfolio: the paper's PCICN plus stronger attacks, each set pruned to 1-minimality.

Attacks (`--attacks`, default `all`):
- `pcicn`, `activation`, `gradient`: stage 2 (pcicn.search) over that ranking. PCICN is the paper's
  search, unchanged; it stays the report's `critical_set` / `n_star`.
- `greedy`: the union of the top-M neurons of the three rankings is the pool; each step adds the
  pool neuron that raises Δ the most, every remaining candidate evaluated in one batched forward
  (per-sample masks, chunked by `pcicn.search_batch_size`), until Δ >= ε or the budget ends. On a
  model with known copies (copies.py: a hardened checkpoint) the pool is the top-M *groups* of each
  ranking and a step adds a whole group, the neuron the copies stand for; pruning then keeps as many
  copies as the collapse needs: the attacker knows what is redundant.

- `known` (only when sets are given: `guard harden` passes the original scan's sets, the sets earlier
  chain steps found and `--known-sets` reports): each set known to collapse the original model, every
  neuron widened to all its copies here (copies.py), measured in one batch; the collapsing ones pruned.
  Greedy and the rankings may never come back to a weak set a defence diluted; the attacker who read
  the last scan report does.

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

from achilles_guard.engine.copies import first_positions
from achilles_guard.engine.masking import MaskPlan
from achilles_guard.engine.neurons import CandidateSet, Neuron
from achilles_guard.engine.params import ATTACKS, parse_attacks
from achilles_guard.engine.pcicn import Ranking, SearchResult, clean_loss, search, search_batch_size
from achilles_guard.engine.perplexity import row_losses
from achilles_guard.engine.prefix import masked_logits
from achilles_guard.errors import UsageError

__all__ = [
    "ATTACKS",
    "KNOWN",
    "RANKED_ATTACKS",
    "DEFAULT_GREEDY_POOL",
    "AttackResult",
    "Strongest",
    "Portfolio",
    "parse_attacks",
    "set_losses",
    "prune",
    "greedy",
    "known_sets",
    "run_portfolio",
    "strongest_of",
]

KNOWN = "known"  # not chosen with --attacks: it runs whenever known sets are given
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
        out.append(row_losses(masked_logits(model, batch, plan), batch))
    return torch.cat(out) if out else torch.zeros(0)


def prune(model, input_ids: torch.Tensor, candidates: CandidateSet, members: Sequence[int], *, baseline: float,
          epsilon: float, scale: float = 0.0, batch_size: int | None = None,
          groups: torch.Tensor | None = None) -> tuple[list[int], float]:
    """Drop neurons while Δ stays >= ε (best leave-one-out first): a 1-minimal subset and its Δ.

    `groups` (N,): copies (copies.copy_groups). Each copy group in the set is first cut to the fewest of its
    copies that still reach ε with the rest of the set (_thin: every count in one batched pass), so a set of
    384 copies costs one pass, not 384 leave-one-out rounds; leave-one-out then makes the result 1-minimal.
    Without copies (or with groups=None) this is plain leave-one-out."""
    current = list(members)
    pool = torch.tensor(current, dtype=torch.long)
    full = set_losses(model, input_ids, candidates, pool, torch.ones(1, len(current), dtype=torch.bool),
                      scale=scale, batch_size=batch_size)
    delta = (float(full[0]) - baseline) / LN10
    if groups is not None and delta >= epsilon:
        current, delta = _thin(model, input_ids, candidates, current, groups, delta=delta, baseline=baseline,
                               epsilon=epsilon, scale=scale, batch_size=batch_size)
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


def _thin(model, input_ids: torch.Tensor, candidates: CandidateSet, current: list[int], groups: torch.Tensor, *,
          delta: float, baseline: float, epsilon: float, scale: float,
          batch_size: int | None) -> tuple[list[int], float]:
    """Largest copy group first: keep the first k of its copies (set order), k the smallest count with which the
    set still reaches ε; row k of one batched pass keeps k copies and every other member."""
    uniq, counts = torch.unique(groups[torch.tensor(current, dtype=torch.long)], return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    for label in uniq[order][counts[order] > 1].tolist():
        index = torch.tensor(current, dtype=torch.long)  # (S,) the set as it stands
        mine = groups[index] == label  # (S,) the group's copies in the set
        m = int(mine.sum())
        rank = torch.cumsum(mine.long(), 0) - 1  # each copy's position within the group
        keep = torch.arange(m)[:, None]  # row k keeps k copies (k < m: the full set is known to reach ε)
        hit = ~mine[None, :] | (rank[None, :] < keep)  # (m, S)
        deltas = (set_losses(model, input_ids, candidates, index, hit, scale=scale, batch_size=batch_size)
                  - baseline) / LN10
        deltas = torch.nan_to_num(deltas, nan=math.inf)
        enough = (deltas >= epsilon).nonzero().flatten()
        if enough.numel():
            k = int(enough[0])
            delta = float(deltas[k])
            current = [n for n, row in zip(current, hit[k].tolist(), strict=True) if row]
    return current, delta


def greedy(model, input_ids: torch.Tensor, candidates: CandidateSet, pool: torch.Tensor, *, baseline: float,
           epsilon: float, budget: int, scale: float = 0.0, batch_size: int | None = None,
           groups: torch.Tensor | None = None) -> tuple[list[int], tuple[tuple[int, float], ...], bool]:
    """Forward selection over `pool` (P,) global indices: -> (chosen, curve, reached ε).

    `groups` (P,): copies (copies.copy_groups) share a label, and a step adds a whole group, the neuron the
    copies stand for: the step that reaches ε with the fewest neurons if one does, else the one that raises Δ
    the most per neuron; groups larger than what is left of the budget are not tried. Pruning then keeps
    only as many copies as the collapse needs. Without copies every group is one neuron and this is plain
    forward selection (the largest Δ)."""
    P = int(pool.numel())
    labels = torch.arange(P) if groups is None else _in_pool_order(groups)  # (P,)
    members = torch.nn.functional.one_hot(labels).T.bool()  # (G, P): the pool neurons of each group
    sizes = members.sum(1)  # (G,)
    chosen = torch.zeros(P, dtype=torch.bool)
    picked: list[int] = []
    curve: list[tuple[int, float]] = []
    current = 0.0
    while len(picked) < budget:
        open_ = ~(members & chosen).any(1) & (sizes <= budget - len(picked))
        remaining = open_.nonzero().flatten()  # (r,) groups not chosen yet that fit the budget
        if remaining.numel() == 0:
            break
        hit = chosen | members[remaining]  # (r, P)
        deltas = (
            set_losses(model, input_ids, candidates, pool, hit, scale=scale, batch_size=batch_size) - baseline
        ) / LN10
        deltas = torch.nan_to_num(deltas, nan=math.inf)  # a NaN loss is a collapse
        size = sizes[remaining].double()
        done = deltas >= epsilon
        if bool(done.any()):  # the fewest neurons that collapse it, then the largest Δ; ties: pool order
            key = torch.where(done, -size * 1e6 + deltas.double().clamp(max=1e5), torch.tensor(-math.inf))
        else:
            key = (deltas.double() - current) / size
        best = int(torch.argmax(key))  # ties: the first (pool order)
        current = float(deltas[best])
        added = members[remaining[best]] & ~chosen
        chosen |= added
        picked.extend(pool[added].tolist())
        curve.append((len(picked), float(deltas[best])))
        if float(deltas[best]) >= epsilon:
            return picked, tuple(curve), True
    return picked, tuple(curve), False


def _in_pool_order(groups: torch.Tensor) -> torch.Tensor:
    """(P,) labels 0..G-1 numbered by each group's first appearance in the pool (ties go to pool order)."""
    return torch.unique(first_positions(groups), return_inverse=True)[1]


def known_sets(model, input_ids: torch.Tensor, candidates: CandidateSet, sets: Sequence[Sequence[Neuron]], *,
               groups: torch.Tensor | None, baseline: float, epsilon: float, scale: float = 0.0,
               batch_size: int | None = None) -> tuple[list[int], float, int] | None:
    """The smallest pruned set among `sets`, each widened to every copy of its neurons (groups: (N,) from
    copies.copy_groups, or None): -> (members, Δ, size before pruning), or None when none collapses."""
    offsets = candidates.offsets
    index = {c.name: i for i, c in enumerate(candidates.candidates)}
    widened: list[torch.Tensor] = []
    for s in sets:
        ids = [int(offsets[index[n.module]]) + n.channel for n in s
               if n.module in index and 0 <= n.channel < candidates.candidates[index[n.module]].width]
        if not ids:
            continue
        ids_t = torch.tensor(sorted(set(ids)), dtype=torch.long)
        if groups is not None:
            ids_t = torch.isin(groups, groups[ids_t]).nonzero().flatten()
        widened.append(ids_t)
    if not widened:
        return None
    pool = torch.unique(torch.cat(widened))
    hit = torch.stack([torch.isin(pool, w) for w in widened])  # (S, P)
    deltas = (set_losses(model, input_ids, candidates, pool, hit, scale=scale, batch_size=batch_size) - baseline) / LN10
    deltas = torch.nan_to_num(deltas, nan=math.inf)
    best: tuple[list[int], float, int] | None = None
    for i in sorted(range(len(widened)), key=lambda i: int(widened[i].numel())):  # smallest first
        if not float(deltas[i]) >= epsilon or (best is not None and len(best[0]) <= 1):
            continue
        kept, delta = prune(model, input_ids, candidates, widened[i].tolist(), baseline=baseline, epsilon=epsilon,
                            scale=scale, batch_size=batch_size, groups=groups)
        if delta >= epsilon and (best is None or len(kept) < len(best[0])):
            best = (kept, delta, int(widened[i].numel()))
    return best


# --- the portfolio -----------------------------------------------------------------------------


def _neurons(candidates: CandidateSet, members: Sequence[int]) -> tuple[Neuron, ...]:
    return tuple(candidates.neurons(members))


def _global(ranking: Ranking, n: int) -> list[int]:
    return ranking.order[:n].tolist()


def _top_groups(ranking: Ranking, groups: torch.Tensor | None, m: int) -> list[int]:
    """Every member of the top-m groups of a grouped ranking (the top m neurons when there are no copies)."""
    if groups is None:
        return _global(ranking, m)
    g = groups[ranking.order]
    starts = torch.cat([torch.ones(1, dtype=torch.bool), g[1:] != g[:-1]]).cumsum(0)  # 1-based group rank
    return ranking.order[starts <= m].tolist()


def run_portfolio(model, input_ids: torch.Tensor, candidates: CandidateSet, rankings: dict, *, attacks: Sequence[str],
                  primary: tuple[str, SearchResult] | None, epsilon: float, step: int, max_neurons: int,
                  scale: float = 0.0, greedy_pool: int = DEFAULT_GREEDY_POOL, times: dict | None = None,
                  groups: torch.Tensor | None = None, pool_rankings: dict | None = None,
                  known: Sequence[Sequence[Neuron]] = ()) -> Portfolio:
    """Run `attacks` (ranked ones use `rankings[name]`); `primary` = (ranking name, its full search)
    is reused for that attack. `times[name]` adds ranking seconds to an attack's entry. `groups` (N,): known
    copies (copies.copy_groups); greedy's pool is then the top groups of `pool_rankings` (the rankings grouped).
    `known`: sets known to collapse the original model, re-tried here with every copy (the `known` attack)."""
    times = times or {}
    baseline = clean_loss(model, input_ids)
    results: list[AttackResult] = []
    bound: int | None = None  # smallest set found so far: later attacks search below it

    def budget() -> int:
        return max_neurons if bound is None else min(max_neurons, bound - 1)

    def finish(name, t0, found: list[int], curve, note="") -> AttackResult:
        nonlocal bound
        kept, delta = prune(model, input_ids, candidates, found, baseline=baseline, epsilon=epsilon, scale=scale,
                            groups=groups)
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
            ranked = pool_rankings if groups is not None and pool_rankings is not None else rankings
            told = groups if ranked is not rankings else None
            pool = torch.tensor(
                list(
                    dict.fromkeys(
                        i for r in RANKED_ATTACKS if r in ranked for i in _top_groups(ranked[r], told, greedy_pool)
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
                                       budget=limit, scale=scale, groups=None if told is None else told[pool])
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
    if known:
        t0 = time.perf_counter()
        found = known_sets(model, input_ids, candidates, known, groups=groups, baseline=baseline, epsilon=epsilon,
                           scale=scale)
        if found is None:
            results.append(AttackResult(KNOWN, False, None, None, (), (), time.perf_counter() - t0, None,
                                        f"none of {len(known)} known set(s) collapses it"))
        else:
            kept, delta, size = found
            results.append(AttackResult(KNOWN, True, len(kept), delta, _neurons(candidates, kept), ((size, delta),),
                                        time.perf_counter() - t0, size))
    by_name = {r.attack: r for r in results}
    ordered = tuple(by_name[a] for a in (*ATTACKS, KNOWN) if a in by_name)
    return Portfolio(ordered, strongest_of(ordered), dict(rankings))


def strongest_of(results: Sequence[AttackResult], text: str | None = None) -> Strongest | None:
    """Smallest converged set; ties: larger Δ, then attack order."""
    done = [r for r in results if r.converged and r.n is not None]
    if not done:
        return None
    best = min(done, key=lambda r: (r.n, -(r.delta_log10 if r.delta_log10 is not None else math.inf)))
    return Strongest(best.attack, best.n, best.delta_log10, best.critical_set, text)
