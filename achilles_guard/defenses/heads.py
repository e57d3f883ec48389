"""Head duplication (Net2WiderNet over attention heads): replace each critical attention head by k
copies, so that no single query, key or value row decides what the head does.

A Llama-family attention layer computes, per query head h of KV group g = h // G (G query heads share
one KV head),

    out = sum_h  o_proj[:, h] . softmax(q_h k_g^T / sqrt(head_dim)) v_g

Replace KV group g (its KV head and its G query heads) by k copies, each with the same q/k/v rows, and
divide the o_proj input columns of every copy by k: each copy computes exactly the head's output, and
the layer sums k outputs of 1/k each, so the function is unchanged (Chen et al. 2016, Net2WiderNet,
applied to heads). Zeroing one query or key row of one copy now changes only that copy's attention
pattern (softmax is per head): it removes 1/k of the head's contribution and adds 1/k of the broken
pattern's output, instead of all of it. Whole KV groups are copied, so num_attention_heads stays
num_key_value_heads x G.

Which heads: every head that holds a fingerprinted attention input (a q_proj, k_proj or v_proj
channel among the critical sets, every attack's set and the top of every ranking the fingerprint
keeps). On the attention-sink fixture those are exactly the sink heads of every later layer: their
query row on the constant channel and their key row on the massive channels (single points of failure
that residual redundancy does not reach: they read the residual, they are not in it).

HF configs hold one head count for every layer, so every layer gets the same number of KV groups:
the original groups stay where they are (a neuron name keeps its meaning: the original mask can be
re-applied), the copies follow, and layers with fewer copies are padded with zero groups (q, k, v rows
and o_proj columns exactly 0: they output exactly 0). Llama configs also require hidden_size %
num_attention_heads == 0: the head count is padded to the value that needs the fewest zero residual
channels (redundancy.pad_residual, exactly function-preserving); `head_dim` is written explicitly.

    plan = plan_heads(model, fp, copies=64)
    duplicate_heads(model, plan)      # in place; config head counts (and maybe hidden_size) updated
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from achilles_guard.defenses.redundancy import REDUNDANT, pad_residual
from achilles_guard.defenses.split import _cols, _rows, require_copies
from achilles_guard.engine.neurons import decoder_blocks
from achilles_guard.errors import UsageError

__all__ = ["DUPLICABLE", "HeadPlan", "check_duplicable", "plan_heads", "duplicate_heads", "head_counts", "DEFENSE"]

# separate q/k/v/o projections, RoPE per head, residual read only through RMSNorms (pad_residual)
DUPLICABLE = REDUNDANT
_PROJ = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv"}


@dataclass(frozen=True)
class HeadPlan:
    copies: int
    groups: dict[int, tuple[int, ...]]  # layer -> KV groups to replace by `copies` copies
    why: dict[str, list[str]] = field(default_factory=dict)  # "layer.group" -> the fingerprinted neurons in it
    skipped: tuple[str, ...] = ()

    def details(self) -> dict:
        return {
            "head_copies": self.copies,
            "groups": {str(k): list(v) for k, v in self.groups.items()},
            "why": self.why,
            "skipped": list(self.skipped),
        }


def check_duplicable(model_type: str) -> None:
    if model_type not in DUPLICABLE:
        raise UsageError(
            f"--strategy heads supports {', '.join(DUPLICABLE)} (separate q/k/v/o projections, pre-norm "
            f"RMSNorm); model_type {model_type!r} is not one of them"
        )


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def plan_heads(model: nn.Module, fp, *, copies: int) -> HeadPlan:
    """The KV groups holding a fingerprinted q/k/v channel (any record of `fp`), per layer."""
    require_copies("--head-copies", copies)
    check_duplicable(getattr(model.config, "model_type", ""))
    heads, kv, head_dim = head_counts(model.config)
    group_size = heads // kv
    groups: dict[int, set[int]] = {}
    why: dict[str, list[str]] = {}
    skipped = []
    for r in fp.neurons:
        if r.component != "attn_in":
            continue
        proj = r.neuron.module.rsplit(".", 1)[-1]
        if proj not in _PROJ or r.layer < 0:
            skipped.append(f"{r.neuron}: not a q_proj, k_proj or v_proj channel of a decoder block")
            continue
        head = r.neuron.channel // head_dim
        group = head // group_size if _PROJ[proj] == "q" else head
        groups.setdefault(r.layer, set()).add(group)
        why.setdefault(f"{r.layer}.{group}", []).append(str(r.neuron))
    return HeadPlan(copies, {k: tuple(sorted(v)) for k, v in sorted(groups.items())}, why, tuple(skipped))


def duplicate_heads(model: nn.Module, plan: HeadPlan) -> dict:
    """Apply `plan` in place (run it in float64); returns the head counts and hidden size before/after."""
    config = model.config
    check_duplicable(getattr(config, "model_type", ""))
    heads, kv, head_dim = head_counts(config)
    group_size = heads // kv
    d = model.get_input_embeddings().weight.shape[1]
    k = plan.copies
    needed = kv + (k - 1) * max((len(g) for g in plan.groups.values()), default=0)  # KV groups per layer
    kv_new = _kv_count(needed, group_size, d)
    _, blocks = decoder_blocks(model)
    for layer, block in enumerate(blocks):
        chosen = plan.groups.get(layer, ())
        src = torch.cat([torch.arange(kv), torch.tensor(chosen, dtype=torch.long).repeat_interleave(k - 1)])
        pad = kv_new - src.numel()
        keep = torch.cat([torch.ones(src.numel(), dtype=torch.float64), torch.zeros(pad, dtype=torch.float64)])
        src = torch.cat([src, torch.zeros(pad, dtype=torch.long)])  # (kv_new,) source group of each new group
        share = torch.ones(kv, dtype=torch.float64)
        share[list(chosen)] = 1.0 / k
        within = torch.arange(head_dim)
        kv_rows = (src[:, None] * head_dim + within[None, :]).reshape(-1)  # (kv_new * head_dim,)
        kv_keep = keep.repeat_interleave(head_dim)
        q_heads = (src[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)  # (kv_new * G,)
        q_rows = (q_heads[:, None] * head_dim + within[None, :]).reshape(-1)
        q_keep = keep.repeat_interleave(group_size * head_dim)
        o_scale = (share[src] * keep).repeat_interleave(group_size * head_dim)
        attn = block.self_attn
        with torch.no_grad():
            attn.q_proj = _rows(attn.q_proj, q_rows, q_keep)
            attn.k_proj = _rows(attn.k_proj, kv_rows, kv_keep)
            attn.v_proj = _rows(attn.v_proj, kv_rows, kv_keep)
            attn.o_proj = _cols(attn.o_proj, q_rows, o_scale)
        for attr, value in (
            ("num_heads", kv_new * group_size),
            ("num_key_value_heads", kv_new),
            ("num_attention_heads", kv_new * group_size),
        ):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        attn.head_dim = head_dim
    config.head_dim = head_dim
    config.num_attention_heads = kv_new * group_size
    config.num_key_value_heads = kv_new
    d_new = pad_residual(model, config.num_attention_heads)
    return {
        "num_attention_heads": [heads, config.num_attention_heads],
        "num_key_value_heads": [kv, kv_new],
        "head_dim": head_dim,
        "hidden_size": [d, d_new],
    }


def _kv_count(needed: int, group_size: int, d: int) -> int:
    """KV groups per layer (>= needed) whose head count needs the fewest zero residual channels to divide
    the hidden size (ties: the fewest groups)."""
    best = None
    for kv_new in range(needed, 2 * needed + d + 1):
        heads = kv_new * group_size
        cost = (-(-d // heads) * heads, kv_new)  # padded hidden size, then group count
        if best is None or cost < best[0]:
            best = (cost, kv_new)
        if cost[0] == d:
            break
    return best[1]


class HeadsDefense:
    """`--strategy heads`: k copies (`--head-copies`) of every attention head holding a fingerprinted q/k/v channel."""

    name = "heads"
    kind = "weights"

    def check(self, request, fp) -> None:
        check_duplicable(fp.model_type)
        require_copies("--head-copies", request.head_copies)

    def apply(self, step):
        from achilles_guard.defenses.base import Applied

        work = step.load()
        plan = plan_heads(work.model, step.fp, copies=step.request.head_copies)
        counts = duplicate_heads(work.model, plan)
        return Applied.saved(step, work, {**plan.details(), **counts}, same_basis=True)


DEFENSE = HeadsDefense()
