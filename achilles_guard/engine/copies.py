"""Known copies: candidate neurons that are exact duplicates of each other.

A hardened checkpoint (`redundancy`, `heads`, `split`) carries one value on k neurons that compute
the same thing: k residual channels with identical writer rows and embedding columns, k query/key/value
rows of duplicated heads, k MLP units with identical gate/up rows. The strongest attacker reads the
weights and knows this: masking any m of a group's k members is the same attack whichever m it picks.
The copy-aware greedy (`portfolio.greedy` with `groups`) therefore scores groups, not members: its
pool is the top groups of each ranking (`Ranking.grouped`, members' importance summed), and each step
tries the next unmasked member of every group in one batched forward. On a model without copies every
group is one neuron, and the greedy is exactly the plain one.

Two neurons are copies when they sit in the same module and everything that produces them is equal,
bit for bit:
    linear / conv1d   the weight row (and bias)
    activation        the rows of the projections that feed it (gate and up)
    norm              gain (and bias); for a residual-width norm also the embedding column, since
                      distinct channels can share a gain value (all 1.0 at initialisation)
Rows that are exactly 0 (padding heads, padding units) are copies of each other too: they output 0
and have importance 0, so they never reach a pool.

    groups = copy_groups(model, candidates)   # (N,) long: the group of each global neuron index
"""

from __future__ import annotations

import torch
from torch import nn

from achilles_guard.engine.adapters import adapter_for
from achilles_guard.engine.neurons import CandidateSet, _split_block_name, output_width

__all__ = ["copy_groups", "first_positions", "has_copies", "residual_copies"]


def copy_groups(model: nn.Module, candidates: CandidateSet) -> torch.Tensor:
    """(N,) long: for each global neuron index, the smallest global index of the neurons it is a copy of
    (its own index when it has no copy)."""
    offsets = candidates.offsets
    groups = torch.arange(candidates.total, dtype=torch.long)
    residual_ids = residual_copies(model)  # (d,) copy id of each residual channel
    d = residual_ids.numel()
    for i, cand in enumerate(candidates.candidates):
        sig = _signature(model, cand, d, residual_ids)
        if sig is None or sig.shape[0] != cand.width:
            continue
        ids = _row_ids(sig)  # (width,) the first row index of each row's copy class
        groups[int(offsets[i]) : int(offsets[i + 1])] = int(offsets[i]) + ids
    return groups


def residual_copies(model: nn.Module) -> torch.Tensor:
    """(d,) long: for each residual channel, the first channel whose embedding column is identical
    (a redundancy step's carriers share it)."""
    return _row_ids(model.get_input_embeddings().weight.detach().T.float())


def has_copies(groups: torch.Tensor) -> bool:
    return bool((groups != torch.arange(groups.numel())).any())


def _signature(model: nn.Module, cand, d: int, residual_ids: torch.Tensor) -> torch.Tensor | None:
    """(width, F) float64: what produces each output channel of `cand`."""
    module = model.get_submodule(cand.name)
    if cand.kind in ("linear", "conv1d"):
        return _rows(module)
    if cand.kind == "norm":
        cols = [p.detach().double().reshape(-1, 1) for _, p in module.named_parameters(recurse=False)]
        if not cols or cols[0].shape[0] != cand.width:
            return None
        if cand.width == d:  # a residual channel: equal gains are copies only if the channels are
            cols.append(residual_ids.double()[:, None])
        return torch.cat(cols, 1)
    if cand.kind == "activation":
        adapter = adapter_for(getattr(model.config, "model_type", ""))
        block_prefix, rel = _split_block_name(model, cand.name)
        parts = []
        for feed in adapter.feeders(rel):
            proj = model.get_submodule(f"{block_prefix}.{feed.proj}")
            start = int(round(feed.offset_fraction * (output_width(proj) or 0)))
            rows = _rows(proj)
            if rows is None or rows.shape[0] < start + cand.width:
                return None
            parts.append(rows[start : start + cand.width])
        return torch.cat(parts, 1) if parts else None
    return None


def _rows(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    w = weight.detach()
    w = w.T if type(module).__name__ == "Conv1D" else w  # Conv1D weight is (in, out)
    bias = getattr(module, "bias", None)
    parts = [w.double()] + ([bias.detach().double()[:, None]] if bias is not None else [])
    return torch.cat(parts, 1)


def first_positions(labels: torch.Tensor) -> torch.Tensor:
    """(R,) long: for each position of `labels` (R,) long, the first position holding the same label."""
    labels = labels.cpu()
    first = torch.full((int(labels.max()) + 1,), labels.numel(), dtype=torch.long)
    first.scatter_reduce_(0, labels, torch.arange(labels.numel()), reduce="amin")
    return first[labels]


def _row_ids(rows: torch.Tensor) -> torch.Tensor:
    """(R,) long: the first index of the row equal to each row."""
    return first_positions(torch.unique(rows.cpu(), dim=0, return_inverse=True)[1])
