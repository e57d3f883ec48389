"""A whole scan: probe texts -> (ranking, critical set) per text, plus what they agree on.

    lm = load_model(path)
    params = ScanParams(alpha=5, samples=100).validated()
    probes = [tokenize_probe(lm, "probe", text)]
    result = run_scan(lm, probes, params)
    result.primary.result.critical_set
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

import torch

from achilles_guard.engine.copies import copy_groups, has_copies
from achilles_guard.engine.neurons import CandidateSet, Neuron, discover
from achilles_guard.engine.params import ScanParams, read_probe_texts
from achilles_guard.engine.pcicn import Progress, Ranking, SearchResult, rank, search
from achilles_guard.engine.portfolio import (
    DEFAULT_GREEDY_POOL,
    RANKED_ATTACKS,
    Portfolio,
    Strongest,
    run_portfolio,
)
from achilles_guard.engine.prefix import PrefixStats, clean_prefix
from achilles_guard.errors import TextError, UsageError
from achilles_guard.formats.load import LoadedModel

__all__ = [
    "ScanParams",
    "ProbeText",
    "TextScan",
    "ScanResult",
    "read_probe_texts",
    "tokenize_probe",
    "run_scan",
    "MIN_TOKENS",
]

MIN_TOKENS = 10  # the paper's minimum probe length


@dataclass(frozen=True)
class ProbeText:
    name: str
    text: str
    input_ids: torch.Tensor  # (1, T) on the model's input device

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class TextScan:
    probe: ProbeText
    ranking: Ranking
    result: SearchResult
    rank_s: float
    search_s: float
    portfolio: Portfolio | None = None
    portfolio_s: float = 0.0
    prefix: PrefixStats | None = None  # what clean-prefix reuse saved in stage 2 and the portfolio


@dataclass(frozen=True)
class ScanResult:
    lm: LoadedModel
    params: ScanParams
    candidates: CandidateSet
    texts: tuple[TextScan, ...]
    load_s: float = 0.0

    @property
    def primary(self) -> TextScan:
        """The first probe text's scan: its set is the report's top-level `critical_set`."""
        return self.texts[0]

    @cached_property
    def intersection(self) -> tuple[Neuron, ...]:
        """Neurons in the critical set of every text (empty if any text did not converge)."""
        sets = [set(t.result.critical_set) for t in self.texts]
        if not sets or not all(t.result.converged for t in self.texts):
            return ()
        common = set.intersection(*sets)
        return tuple(n for n in self.primary.result.critical_set if n in common)

    @property
    def smallest_set(self) -> int | None:
        """Size of the smallest converged critical set over all texts (the most severe finding)."""
        sizes = [len(t.result.critical_set) for t in self.texts if t.result.converged]
        return min(sizes) if sizes else None

    @property
    def strongest(self) -> Strongest | None:
        """The smallest collapsing set over every attack and text (ties: larger Δ), naming its text."""
        best = None
        for t in self.texts:
            s = t.portfolio.strongest if t.portfolio else None
            if s is not None and (best is None or (s.n, -s.delta_log10) < (best.n, -best.delta_log10)):
                best = replace(s, text=t.probe.name)
        return best

    @property
    def gate_size(self) -> int | None:
        """What --fail-under gates on: strongest.n when the portfolio ran, else the smallest PCICN set."""
        if any(t.portfolio is not None for t in self.texts):
            s = self.strongest
            return s.n if s else None
        return self.smallest_set

    def with_load_time(self, load_s: float) -> "ScanResult":
        return replace(self, load_s=load_s)


def tokenize_probe(lm: LoadedModel, name: str, text: str, *, allow_short: bool = False) -> ProbeText:
    """Tokenize a probe text; refuse empty, untokenizable or (unless allowed) < 10-token texts."""
    if not text.strip():
        raise TextError(f"probe text {name!r} is empty")
    encoded = lm.tokenizer(text, return_tensors="pt")
    input_ids = encoded["input_ids"]
    if input_ids.numel() == 0:
        raise TextError(
            f"probe text {name!r} tokenizes to nothing with this model's tokenizer "
            f"({type(lm.tokenizer).__name__}); check that the tokenizer files match the model"
        )
    if input_ids.shape[1] < 2:
        raise TextError(f"probe text {name!r} has {input_ids.shape[1]} token; the loss needs at least 2")
    if input_ids.shape[1] < MIN_TOKENS and not allow_short:
        raise TextError(
            f"probe text {name!r} has {input_ids.shape[1]} tokens; PCICN needs at least {MIN_TOKENS} "
            "(the paper's minimum): give a longer text, or pass --allow-short"
        )
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    if int(input_ids.max()) >= vocab:
        raise TextError(
            f"probe text {name!r}: the tokenizer produced id {int(input_ids.max())} but the model has only "
            f"{vocab} embeddings; the tokenizer does not belong to this model"
        )
    return ProbeText(name, text, input_ids.to(lm.input_device))


def run_scan(
    lm: LoadedModel,
    probes: list[ProbeText],
    params: ScanParams,
    *,
    progress: Callable[[str, str, int, int], None] | None = None,
    candidates: CandidateSet | None = None,
    demote: tuple[Neuron, ...] = (),
    known_sets: tuple[tuple[Neuron, ...], ...] = (),
    copy_aware: bool = False,
    prefix_reuse: bool = True,
) -> ScanResult:
    """Rank and search on every probe text. `progress(text_name, stage, done, total)`.

    `prefix_reuse`: masked forwards start at their first masked block from the clean state a forward
    of the same batch size computed (engine/prefix.py; bit-identical results; False runs every block).

    `demote`: neurons every ranking moves to its end (a runtime guard restores them; an attacker who knows
    the guard spends no budget on them). `known_sets`: sets known to collapse the original model, re-tried with
    every copy of their neurons (portfolio.known_sets; guard harden passes them). `copy_aware`: greedy works on
    the model's copy groups (copies.py; guard harden's re-attack sets it: a hardened checkpoint carries copies,
    an untouched model has none, and finding them costs a pass over every weight)."""
    params = params.validated()
    candidates = candidates or discover(lm.model, params.components)
    attacks = params.attack_list
    pool = params.greedy_pool
    if "greedy" in attacks and pool is not None and pool > candidates.total:
        raise UsageError(f"--greedy-pool {pool} is larger than the model's {candidates.total} candidate neurons")
    pool = min(DEFAULT_GREEDY_POOL, candidates.total) if pool is None else pool
    needed = set(RANKED_ATTACKS) if "greedy" in attacks else {a for a in attacks if a in RANKED_ATTACKS}
    groups = copy_groups(lm.model, candidates) if copy_aware and ("greedy" in attacks or known_sets) else None
    groups = groups if groups is not None and has_copies(groups) else None
    scans = []
    for probe in probes:
        report: Progress | None = (
            (lambda stage, done, total, _n=probe.name: progress(_n, stage, done, total)) if progress else None
        )
        t0 = time.perf_counter()
        also: dict = {}
        raw = rank(
            lm.model, probe.input_ids, candidates,
            method=params.ranking, alpha=params.alpha, samples=params.samples, seed=params.seed, progress=report,
            also=also if "activation" in needed else None,
        )
        raws = {params.ranking: raw, **also}
        ranking = raw.demoted(demote)
        also = {m: r.demoted(demote) for m, r in also.items()}
        t1 = time.perf_counter()
        reuse = clean_prefix(lm.model, probe.input_ids) if prefix_reuse else nullcontext(PrefixStats())
        with reuse as saved:  # stage 2 and the portfolio start each masked forward at its first masked block
            result = search(
                lm.model, probe.input_ids, ranking,
                epsilon=params.epsilon, step=params.step, max_neurons=params.max_neurons,
                scale=params.mask_scale, progress=report,
            )
            t2 = time.perf_counter()
            rankings, times = {params.ranking: ranking, **also}, {params.ranking: t1 - t0}
            for method in sorted(needed - set(rankings)):
                t3 = time.perf_counter()
                raws[method] = rank(lm.model, probe.input_ids, candidates, method=method, alpha=params.alpha,
                                    samples=params.samples, seed=params.seed, progress=report)
                rankings[method] = raws[method].demoted(demote)
                times[method] = time.perf_counter() - t3
            pools = None if groups is None else {m: r.grouped(groups).demoted(demote) for m, r in raws.items()}
            portfolio = run_portfolio(
                lm.model, probe.input_ids, candidates, rankings, attacks=attacks, primary=(params.ranking, result),
                epsilon=params.epsilon, step=params.step, max_neurons=params.max_neurons, scale=params.mask_scale,
                greedy_pool=pool, times={**times, params.ranking: t2 - t0}, groups=groups, pool_rankings=pools,
                known=known_sets,
            )
        t3 = time.perf_counter()
        scans.append(TextScan(probe, ranking, result, t1 - t0, t2 - t1, portfolio, t3 - t2, prefix=saved))
    return ScanResult(lm, params, candidates, tuple(scans))

