"""PCICN, exactly as docs/design.md "The algorithm" states it.

Stage 1 (`rank`): K noisy copies of the input embeddings, `x + alpha * eps_k`, eps_k ~ N(0, I) drawn
one by one from a CPU `torch.Generator` seeded with `seed` (so the noise does not depend on the
batch size or the device); per neuron and position the mean over k of |A_clean - A_k|; a neuron's
importance is its maximum over positions. Samples run in batches; only running sums of shape
(T, channels) per module are kept, never K copies. Ties break by forward order of modules, then
channel (a stable sort over neurons laid out in that order).

Stage 2 (`search`): Δ(n) = (L_masked(n) - L_clean) / ln 10 for n = step, 2 step, ...; the first n
with Δ(n) >= epsilon is n*. Many consecutive n are evaluated in one forward, row b of the batch
masking the top n_b neurons (`MaskPlan.top_n`); the curve and n* equal sequential evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from achilles_guard.engine.copies import first_positions
from achilles_guard.engine.masking import MaskPlan, hooks
from achilles_guard.engine.neurons import CandidateSet, Neuron
from achilles_guard.engine.paper import PAPER
from achilles_guard.engine.params import RANKINGS
from achilles_guard.engine.perplexity import delta_log10, row_losses
from achilles_guard.engine.prefix import masked_logits
from achilles_guard.errors import RuntimeFailure, UsageError

__all__ = [
    "RANKINGS",
    "Ranking",
    "SearchResult",
    "Progress",
    "rank",
    "search",
    "clean_loss",
    "masked_losses",
    "search_batch_size",
]


# progress(stage, done, total): stage is "rank" or "search"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Ranking:
    """Every candidate neuron, most important first."""

    method: str
    candidates: CandidateSet
    order: torch.Tensor  # (N,) global neuron indices, best first
    importance: torch.Tensor  # (N,) float32 importance of order[i]
    module_index: torch.Tensor  # (N,) index into candidates.candidates of order[i]
    channels: torch.Tensor  # (N,) channel of order[i]

    def __len__(self) -> int:
        return int(self.order.numel())

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates.candidates)

    def top(self, n: int) -> list[Neuron]:
        """The n most important neurons."""
        names = self.module_names
        return [
            Neuron(names[m], c)
            for m, c in zip(self.module_index[:n].tolist(), self.channels[:n].tolist())
        ]

    def plan(self, ns: Sequence[int], scale: float = 0.0) -> MaskPlan:
        """A mask plan whose row b masks the top ns[b] neurons."""
        return MaskPlan.top_n(self.module_names, self.module_index, self.channels, ns, scale=scale)

    def demoted(self, neurons) -> "Ranking":
        """The same ranking with `neurons` moved to the end (order kept among both groups): what an attacker who
        knows a runtime guard restores those neurons would rank. Self when none of them is a candidate."""
        offsets = self.candidates.offsets
        cands = self.candidates.candidates
        index = {c.name: i for i, c in enumerate(cands)}
        ids = [
            int(offsets[index[n.module]]) + n.channel
            for n in neurons
            if n.module in index and 0 <= n.channel < cands[index[n.module]].width
        ]
        if not ids:
            return self
        out = torch.zeros(self.candidates.total, dtype=torch.bool)
        out[torch.tensor(ids, dtype=torch.long)] = True
        last = out[self.order]
        keep = torch.cat([torch.nonzero(~last).flatten(), torch.nonzero(last).flatten()])
        return Ranking(self.method, self.candidates, self.order[keep], self.importance[keep],
                       self.module_index[keep], self.channels[keep])

    def grouped(self, groups: torch.Tensor) -> "Ranking":
        """Copies ranked as one (copies.copy_groups: (N,) group of each global index): every member gets its
        group's summed importance, groups are ordered by it (ties: the group whose best member ranks first)
        and their members stay together in their own order. Self when no neuron has a copy."""
        g = groups[self.order]  # (N,) group of each ranked neuron
        if bool((g == self.order).all()):
            return self
        total = torch.zeros(groups.numel(), dtype=torch.float64).index_add_(0, g, self.importance.double())
        best = first_positions(g)  # (N,) the rank of each neuron's group's best member
        keep = torch.sort(best, stable=True).indices  # groups together, in order of their best member
        keep = keep[torch.sort(total[g[keep]], descending=True, stable=True).indices]
        return Ranking(self.method, self.candidates, self.order[keep], total[g[keep]].float(),
                       self.module_index[keep], self.channels[keep])

    @staticmethod
    def from_scores(method: str, candidates: CandidateSet, scores: torch.Tensor) -> "Ranking":
        """Sort (N,) scores laid out in forward order; a stable sort keeps that order among ties."""
        scores = torch.nan_to_num(scores.float(), nan=math.inf)  # a neuron that broke under noise ranks first
        importance, order = torch.sort(scores, descending=True, stable=True)
        offsets = candidates.offsets
        module_index = torch.searchsorted(offsets, order, right=True) - 1
        return Ranking(method, candidates, order, importance, module_index, order - offsets[module_index])

    @staticmethod
    def from_order(method: str, candidates: CandidateSet, order: torch.Tensor, importance: torch.Tensor) -> "Ranking":
        offsets = candidates.offsets
        module_index = torch.searchsorted(offsets, order, right=True) - 1
        return Ranking(method, candidates, order, importance.float(), module_index, order - offsets[module_index])


@dataclass(frozen=True)
class SearchResult:
    """Stage 2's answer: n* and its critical set, or `converged=False` past the budget."""

    baseline_loss: float  # mean NLL in nats of the clean model on the probe
    converged: bool
    n_star: int | None
    critical_set: tuple[Neuron, ...]
    delta_log10: float  # Δ at n*, or at the last n tried when not converged
    curve: tuple[tuple[int, float], ...]  # (n, Δ(n)) for every n tried, in order, up to n*
    max_neurons: int


def rank(
    model,
    input_ids: torch.Tensor,
    candidates: CandidateSet,
    *,
    method: str = "pcicn",
    alpha: float = PAPER.alpha,
    samples: int = PAPER.samples,
    seed: int = PAPER.seed,
    batch_size: int | None = None,
    progress: Progress | None = None,
    also: dict | None = None,
) -> Ranking:
    """Stage 1: rank every candidate neuron (see module docstring).

    `also`: for method "pcicn", a dict that receives `also["activation"]`, the activation ranking
    computed from the same clean forward (the portfolio's rankings share it)."""
    if method not in RANKINGS:
        raise UsageError(f"--ranking {method!r}: use one of {', '.join(RANKINGS)}")
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(candidates.total, generator=generator)
        return Ranking.from_order(method, candidates, order, torch.zeros(candidates.total))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)  # (1, T, d)
    if method == "activation":
        scores = _activation_scores(model, embeds, candidates)
    elif method == "gradient":
        scores = _gradient_scores(model, embeds, input_ids, candidates)
    else:
        clean_means: dict[str, torch.Tensor] | None = {} if also is not None else None
        scores = _pcicn_scores(model, embeds, candidates, alpha, samples, seed, batch_size, progress, clean_means)
        if also is not None:
            names = [c.name for c in candidates.candidates]
            also["activation"] = Ranking.from_scores(
                "activation", candidates, torch.cat([clean_means[n] for n in names])
            )
    return Ranking.from_scores(method, candidates, scores)


def clean_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of the unmasked model on `input_ids` (1, T)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return float(row_losses(logits, input_ids)[0])


def masked_losses(
    model,
    input_ids: torch.Tensor,
    ranking: Ranking,
    ns: Sequence[int],
    *,
    scale: float = 0.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Loss with the top n neurons masked, for every n in `ns`; batched, shape (len(ns),)."""
    ns = list(ns)
    per_batch = batch_size or search_batch_size(model, input_ids.shape[1])
    out = []
    for start in range(0, len(ns), per_batch):
        chunk = ns[start : start + per_batch]
        out.append(_losses_for(model, input_ids, ranking, chunk, scale))
    return torch.cat(out) if out else torch.zeros(0)


def search(
    model,
    input_ids: torch.Tensor,
    ranking: Ranking,
    *,
    epsilon: float = PAPER.epsilon,
    step: int = PAPER.step,
    max_neurons: int = PAPER.max_neurons,
    scale: float = 0.0,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Stage 2: the smallest n in step, 2 step, ... <= max_neurons with Δ(n) >= epsilon."""
    baseline = clean_loss(model, input_ids)
    if not math.isfinite(baseline):
        raise RuntimeFailure("the clean model's loss on the probe text is not finite; try --dtype float32")
    limit = min(max_neurons, len(ranking))
    ns_all = list(range(step, limit + 1, step))
    max_batch = batch_size or search_batch_size(model, input_ids.shape[1])
    curve: list[tuple[int, float]] = []
    done, chunk = 0, min(8, max_batch)  # small first chunk: critical sets are usually tiny
    while done < len(ns_all):
        ns = ns_all[done : done + chunk]
        losses = _losses_for(model, input_ids, ranking, ns, scale)
        for n, loss in zip(ns, losses.tolist()):
            delta = delta_log10(loss, baseline)
            curve.append((n, delta))
            if delta >= epsilon:
                if progress:
                    progress("search", len(ns_all), len(ns_all))
                return SearchResult(baseline, True, n, tuple(ranking.top(n)), delta, tuple(curve), max_neurons)
        done += len(ns)
        chunk = min(chunk * 2, max_batch)
        if progress:
            progress("search", done, len(ns_all))
    last = curve[-1][1] if curve else 0.0
    return SearchResult(baseline, False, None, (), last, tuple(curve), max_neurons)


# --- helpers ---------------------------------------------------------------------------------


def _losses_for(model, input_ids, ranking: Ranking, ns: Sequence[int], scale: float) -> torch.Tensor:
    batch = input_ids.expand(len(ns), -1)  # (B, T): one row per candidate n
    logits = masked_logits(model, batch, ranking.plan(ns, scale))  # (B, T, V)
    return row_losses(logits, batch)


def _pcicn_scores(
    model, embeds, candidates: CandidateSet, alpha, samples, seed, batch_size, progress, clean_means=None
):
    """(N,) importance: max over positions of mean_k |A_clean - A_k|, in forward order."""
    names = [c.name for c in candidates.candidates]
    clean: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    T, d = embeds.shape[1], embeds.shape[2]

    def keep_clean(name):
        def fn(output):
            clean[name] = _per_position(output, T)[0].float().clone()  # (T, C), never an alias of the output
            sums[name] = torch.zeros_like(clean[name])
            if clean_means is not None:  # the activation ranking's score, from this same clean forward
                clean_means[name] = clean[name].abs().mean(0).cpu()
        return fn

    scratch: dict[tuple, torch.Tensor] = {}  # reused buffers: no allocation (or page fault) per forward

    def accumulate(name):
        def fn(output):
            out = _per_position(output, T)
            b, c = out.shape[0], out.shape[-1]
            diff = scratch.get(("diff", b, c))
            if diff is None:
                diff = scratch[("diff", b, c)] = torch.empty(b, T, c, device=out.device)
                scratch[("sum", c)] = torch.empty(T, c, device=out.device)
            part = scratch[("sum", c)]
            torch.sub(out.float(), clean[name], out=diff)  # the same operations as (out - clean).abs().sum(0),
            diff.abs_()                                     # in place: bit-identical, with no temporaries
            torch.sum(diff, 0, out=part)  # (B, T, C) -> (T, C)
            sums[name] += part
        return fn

    base = model.base_model
    with torch.no_grad():
        with hooks(model, {n: keep_clean(n) for n in names}):
            base(inputs_embeds=embeds, use_cache=False)
        per_batch = batch_size or _rank_batch(model, T, candidates.total)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        clean_embeds = embeds.float()
        with hooks(model, {n: accumulate(n) for n in names}):
            for start in range(0, samples, per_batch):
                b = min(per_batch, samples - start)
                noise = _noise(generator, b, T, d)  # (b, T, d)
                noisy = (clean_embeds + alpha * noise.to(embeds.device)).to(embeds.dtype)
                base(inputs_embeds=noisy, use_cache=False)
                if progress:
                    progress("rank", start + b, samples)
    per_module = [(sums[n] / samples).amax(dim=0).cpu() for n in names]  # each (C,)
    return torch.cat(per_module)


def _noise(generator: torch.Generator, b: int, T: int, d: int) -> torch.Tensor:
    """(b, T, d) standard normal noise: b draws of (T, d) in a row from the CPU generator, as one call when that
    is provably the same numbers. torch's CPU normal sampler fills uniforms in order and transforms them in
    blocks of 16, redrawing a tail when the size is not a multiple of 16: so one draw of b·T·d values equals b
    draws of T·d exactly when T·d is a multiple of 16 (tests/test_pcicn.py checks both branches)."""
    if (T * d) % 16 == 0:
        return torch.randn(b, T, d, generator=generator)
    return torch.stack([torch.randn(T, d, generator=generator) for _ in range(b)])


def _activation_scores(model, embeds, candidates: CandidateSet) -> torch.Tensor:
    """(N,) mean |activation| over positions of the clean forward."""
    names = [c.name for c in candidates.candidates]
    scores: dict[str, torch.Tensor] = {}
    T = embeds.shape[1]

    def grab(name):
        def fn(output):
            scores[name] = _per_position(output, T)[0].float().abs().mean(0).cpu()  # (C,)
        return fn

    with torch.no_grad(), hooks(model, {n: grab(n) for n in names}):
        model.base_model(inputs_embeds=embeds, use_cache=False)
    return torch.cat([scores[n] for n in names])


def _gradient_scores(model, embeds, input_ids, candidates: CandidateSet) -> torch.Tensor:
    """(N,) mean over positions of |dL/d activation|, L the clean next-token loss."""
    names = [c.name for c in candidates.candidates]
    outputs: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(output):
            output.retain_grad()
            outputs[name] = output
        return fn

    inputs = embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad(), hooks(model, {n: grab(n) for n in names}):
        logits = model(inputs_embeds=inputs, use_cache=False).logits
        loss = row_losses(logits, input_ids)[0]
        loss.backward()
    scores = []
    for n in names:
        grad = outputs[n].grad
        if grad is None:
            scores.append(torch.zeros(outputs[n].shape[-1]))
        else:
            scores.append(_per_position(grad, embeds.shape[1])[0].float().abs().mean(0).cpu())  # (C,)
    return torch.cat(scores)


def _per_position(output: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T, C) view of a module output; OPT's MLP flattens batch and positions to (B*T, C)."""
    return output.reshape(-1, T, output.shape[-1])


def _memory_budget(model) -> int:
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    return 1 << 30  # 1 GiB of activations on CPU is plenty to saturate the cores


def _rank_batch(model, T: int, total_channels: int) -> int:
    hidden = model.get_input_embeddings().weight.shape[1]
    elt = model.get_input_embeddings().weight.element_size()
    per_sample = T * (total_channels * (elt + 8) + hidden * 16 * elt)
    return max(1, min(64, _memory_budget(model) // max(per_sample, 1)))


def search_batch_size(model, T: int) -> int:
    """Rows per stage-2 / evaluation forward of T tokens that fit the memory budget."""
    weight = model.get_input_embeddings().weight
    vocab, hidden, elt = weight.shape[0], weight.shape[1], weight.element_size()
    per_row = T * (vocab * elt + hidden * 24 * elt) + T * vocab * 4  # logits + activations + one fp32 row
    return max(1, min(64, _memory_budget(model) // max(per_row, 1)))
