"""Clean-prefix reuse: a masked forward equals the clean one up to its first masked block.

Stage 2 and the attack portfolio run many masked forwards of one probe text. Every block before the
first one holding a masked neuron computes exactly what the clean model computes, so a forward can
start there from the clean hidden state instead of recomputing it:

    with clean_prefix(model, input_ids) as stats:           # one text; the weights must not change inside
        logits = masked_logits(model, input_ids.expand(8, -1), plan)
    stats.blocks_skipped, stats.blocks_total

Bit-identical by construction, on any device: the stored state of a batch of B rows entering block
k is the one a forward of B rows of this text *did* compute (captured, never recomputed at another
batch size), and a later forward of B rows whose first masked block is k or later starts from it.
The blocks after k then see the same bits as if they had run the whole prefix themselves, so
logits, losses, Δ and critical sets do not change (tests/test_prefix.py compares every one of them
with the forwards run whole). Batch sizes are never mixed: a GPU may pick another kernel for 8 rows
than for 1 and round differently.

Outside `clean_prefix` (and for plans that mask in the first block, or mask modules outside the
decoder blocks) `masked_logits` is a plain masked forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from achilles_guard.engine.masking import MaskPlan, masked
from achilles_guard.engine.neurons import decoder_blocks

__all__ = ["PrefixStats", "clean_prefix", "masked_logits"]

MAX_CACHE_BYTES = 512 << 20  # stored hidden states per text, over every batch size and block


@dataclass
class PrefixStats:
    """What reuse saved: block evaluations run vs the ones a whole forward would run (mutable counters)."""

    forwards: int = 0
    reused: int = 0  # forwards that started from a stored state
    blocks_total: int = 0  # blocks a whole forward would run, summed over forwards
    blocks_skipped: int = 0

    @property
    def saved(self) -> float:
        return self.blocks_skipped / self.blocks_total if self.blocks_total else 0.0


class _Cache:
    def __init__(self, model: nn.Module, input_ids: torch.Tensor):
        self.prefix, self.blocks = decoder_blocks(model)
        self.input_ids = input_ids
        self.states: dict[int, dict[int, object]] = {}  # batch rows -> first block k -> output of block k-1
        self.bytes = 0
        self.stats = PrefixStats()

    def first_masked_block(self, plan: MaskPlan) -> int:
        """Index of the first block holding a masked module; 0 when a module lies outside the blocks."""
        first = len(self.blocks)
        lead = self.prefix + "."
        for name in plan.channels:
            head, _, _ = name[len(lead):].partition(".") if name.startswith(lead) else ("", "", "")
            if not head.isdigit():
                return 0
            first = min(first, int(head))
        return first

    def same_text(self, batch: torch.Tensor) -> bool:
        ids = self.input_ids
        return batch.dim() == 2 and batch.shape[1] == ids.shape[1] and bool((batch == ids[:1]).all())


_ACTIVE: dict[int, _Cache] = {}  # id(model) -> the cache of the text being attacked


@contextmanager
def clean_prefix(model: nn.Module, input_ids: torch.Tensor) -> Iterator[PrefixStats]:
    """Reuse clean prefixes for the masked forwards of `model` on `input_ids` (1, T) inside the block."""
    cache = _Cache(model, input_ids)
    key = id(model)
    outer = _ACTIVE.get(key)
    _ACTIVE[key] = cache
    try:
        yield cache.stats
    finally:
        if outer is None:
            _ACTIVE.pop(key, None)
        else:
            _ACTIVE[key] = outer


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    return out


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, tuple):
        return sum(_nbytes(o) for o in out)
    return 0


def masked_logits(model: nn.Module, batch: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
    """Logits (B, T, V) of `batch` (B, T) with `plan` applied; from a stored clean prefix where one applies."""
    cache = _ACTIVE.get(id(model))
    if cache is None or not cache.same_text(batch):
        with torch.no_grad(), masked(model, plan):
            return model(input_ids=batch, use_cache=False).logits
    first = cache.first_masked_block(plan)
    rows = batch.shape[0]
    stored = cache.states.setdefault(rows, {})
    start = max((k for k in stored if k <= first), default=0)
    stats = cache.stats
    stats.forwards += 1
    stats.blocks_total += len(cache.blocks)
    restore: list[nn.Module] = []
    handles = []
    try:
        if start > 0:
            state = stored[start]
            for block in list(cache.blocks)[:start]:  # each returns the state entering `start`; only the last counts
                block.forward = lambda *a, _s=state, **kw: _clone(_s)
                restore.append(block)
            stats.reused += 1
            stats.blocks_skipped += start
        if first > start and first not in stored and cache.bytes < MAX_CACHE_BYTES:
            def keep(module, args, output, _k=first):
                cache.states[rows][_k] = _clone(output)
                cache.bytes += _nbytes(output)

            handles.append(cache.blocks[first - 1].register_forward_hook(keep))
        with torch.no_grad(), masked(model, plan):
            return model(input_ids=batch, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
        for block in restore:
            del block.forward  # the class's forward again
