"""Residual redundancy: carry each critical residual channel on k channels, and split the units that
write it, so that no single neuron holds the value any more.

A pre-norm RMSNorm decoder reads the residual stream h (T, d) only through RMSNorms. Replace channel
c by k channels c_1..c_k, each holding h_c / sqrt(k):

    writers  (embedding column, o_proj / down_proj rows, biases)   W[c] -> k copies of W[c] / sqrt(k)
    readers  (q, k, v, gate, up, lm_head columns)                  W[:, c] -> k copies of W[:, c] / sqrt(k)

The sum of squares of h is unchanged (k (h_c / sqrt(k))^2 = h_c^2), but RMSNorm divides it by the
hidden size, now d' = d + k - 1: every norm gain is multiplied by sqrt(d / d') and eps by d / d',
which makes rms' = sqrt(d / d') rms exactly, so every norm output (and so every reader) is unchanged.
When d' is not a multiple of the head count (configs require it), channels that are exactly 0 pad it.
A tied LM head stays tied (embedding and head columns get the same factor). `head_dim` is written into
the config explicitly (it no longer equals hidden_size / heads).

Zeroing one copy now removes 1/k of the value in that channel. With `wide_copies` = k' > 0, every
other residual channel the fingerprint stores (the top of every ranking, not only the attack sets) is
carried on k' channels too: on a real model the next weak links after the massive channel are other
outlier channels of the same short list (SmolLM2: layer 0's o_proj[199] with a norm channel 322).
The units that create the value become the next weakest link, so the MLP units of the writing layer
that produce most of it (measured on the fingerprint's probe texts at the position where the channel
peaks) are split into k Net2WiderNet copies too (split.split_model), with the critical MLP units of every attack's set.

    plan = plan_redundancy(model, fp, probes, copies=32, wide_copies=8)
    widen_residual(model, plan)       # in place; config.hidden_size, head_dim, rms_norm_eps updated
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from achilles_guard.defenses.rotate import ROTATABLE
from achilles_guard.defenses.split import SplitPlan, _cols, _rows, require_copies, split_model
from achilles_guard.engine.adapters import adapter_for
from achilles_guard.engine.copies import residual_copies
from achilles_guard.engine.neurons import decoder_blocks
from achilles_guard.errors import UsageError

__all__ = [
    "REDUNDANT",
    "RedundancyPlan",
    "plan_redundancy",
    "widen_residual",
    "pad_residual",
    "rewrite_residual",
    "check_redundant",
    "carried_channels",
    "DEFENSE",
]

# families whose residual stream is read only through RMSNorms and whose embeddings are not scaled by
# sqrt(hidden_size) (Gemma's are: widening would change them)
REDUNDANT = ("llama", "mistral", "qwen2")
_RESIDUAL = {"mlp_out", "attn_out", "norm"}
_UNITS = {"mlp_act", "mlp_gate", "mlp_up"}


@dataclass(frozen=True)
class RedundancyPlan:
    copies: int
    channels: tuple[int, ...]  # residual channels carried by `copies` channels each
    units: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> MLP units split into `copies`
    skipped: tuple[str, ...] = ()  # critical neurons this defence does not address, and why
    wide: tuple[int, ...] = ()  # other fingerprinted residual channels, carried by `wide_copies` channels each
    wide_copies: int = 0

    def copies_of(self) -> dict[int, int]:
        """Residual channel -> how many channels carry it (only the ones made redundant)."""
        return {**{c: self.wide_copies for c in self.wide}, **{c: self.copies for c in self.channels}}

    def details(self) -> dict:
        return {
            "copies": self.copies,
            "channels": list(self.channels),
            "wide_copies": self.wide_copies,
            "wide": list(self.wide),
            "units": {str(k): list(v) for k, v in self.units.items()},
            "skipped": list(self.skipped),
        }


def check_redundant(model_type: str) -> None:
    if model_type not in REDUNDANT:
        raise UsageError(
            f"--strategy redundancy supports {', '.join(REDUNDANT)} (pre-norm RMSNorm, unscaled "
            f"embeddings); model_type {model_type!r} is not one of them (use rotate, split or pin)"
        )


def plan_redundancy(
    model: nn.Module,
    fp,
    probes: list[torch.Tensor],
    *,
    copies: int,
    wide_copies: int = 0,
    max_units: int = 16,
    share: float = 0.95,
) -> RedundancyPlan:
    """Channels and units to make redundant for every attack's set in `fp` (probes: (1, T) ids), and with
    `wide_copies` > 0 every other residual channel `fp` stores."""
    require_copies("--redundancy-copies", copies)
    if wide_copies:
        require_copies("--redundancy-wide", wide_copies, "or 0 to carry only the attack sets' channels")
    d = model.get_input_embeddings().weight.shape[1]
    records = [r for r in fp.neurons if r.critical or r.attacks]
    carried = carried_channels(model)
    channels, units, skipped, writers = set(), {}, [], {}
    for r in records:
        if r.component in _RESIDUAL and r.neuron.channel in carried:
            skipped.append(f"{r.neuron} ({r.component}): already carried on {carried[r.neuron.channel]} channels")
        elif r.component in _RESIDUAL and r.neuron.channel < d and _is_residual(model, r.neuron.module, d):
            channels.add(r.neuron.channel)
            if r.component == "mlp_out" and r.layer >= 0:
                writers.setdefault(r.layer, set()).add(r.neuron.channel)
        elif r.component in _UNITS and r.layer >= 0:
            units.setdefault(r.layer, set()).add(r.neuron.channel)
        else:
            skipped.append(f"{r.neuron} ({r.component}): not a residual channel or an MLP unit")
    for layer, chans in writers.items():  # the units that create each written value
        units.setdefault(layer, set()).update(_writing_units(model, layer, sorted(chans), probes, max_units, share))
    wide = set()
    if wide_copies:
        wide = {
            r.neuron.channel
            for r in fp.neurons
            if r.component in _RESIDUAL and r.neuron.channel < d and _is_residual(model, r.neuron.module, d)
        } - channels - set(carried)
    return RedundancyPlan(
        copies,
        tuple(sorted(channels)),
        {k: tuple(sorted(v)) for k, v in sorted(units.items())},
        tuple(skipped),
        tuple(sorted(wide)),
        wide_copies if wide else 0,
    )


def carried_channels(model: nn.Module) -> dict[int, int]:
    """Residual channels an earlier redundancy step already carries: channel -> how many channels hold
    the same value (identical, non-zero embedding columns; a chain step does not copy copies again)."""
    ids = residual_copies(model)  # (d,)
    counts = torch.bincount(ids, minlength=ids.numel())[ids]  # (d,) channels holding each channel's value
    nonzero = model.get_input_embeddings().weight.detach().abs().amax(0).cpu() > 0  # zero padding carries nothing
    return {int(c): int(counts[c]) for c in ((counts > 1) & nonzero).nonzero().flatten().tolist()}


def widen_residual(model: nn.Module, plan: RedundancyPlan) -> int:
    """Apply `plan` in place (run it in float64); returns the new hidden size."""
    model_type = getattr(model.config, "model_type", "")
    check_redundant(model_type)
    if plan.units:
        split_model(model, SplitPlan(plan.copies, plan.units, (), (), {}))
    counts = plan.copies_of()
    if not counts:
        return model.config.hidden_size
    d = model.get_input_embeddings().weight.shape[1]
    chosen = torch.tensor(sorted(counts), dtype=torch.long)
    k = torch.tensor([counts[c] for c in sorted(counts)], dtype=torch.long)
    src = torch.cat([torch.arange(d), chosen.repeat_interleave(k - 1)])  # (d',) source channel of each new channel
    scale = torch.ones(d, dtype=torch.float64)
    scale[chosen] = 1.0 / k.double().sqrt()
    return rewrite_residual(model, src, scale[src], multiple=model.config.num_attention_heads)


def pad_residual(model: nn.Module, multiple: int) -> int:
    """Pad the residual stream in place with channels that are exactly 0 (no writer, no reader) up to a
    multiple of `multiple` (Llama configs require hidden_size % num_attention_heads == 0); the function is
    unchanged (norm gains and eps rescaled as in `widen_residual`). Returns the new hidden size."""
    check_redundant(getattr(model.config, "model_type", ""))
    d = model.get_input_embeddings().weight.shape[1]
    if d % multiple == 0:
        return d
    return rewrite_residual(model, torch.arange(d), torch.ones(d, dtype=torch.float64), multiple=multiple)


def rewrite_residual(model: nn.Module, src: torch.Tensor, scale: torch.Tensor, *, multiple: int = 1) -> int:
    """Replace the residual stream by channels `src` (d',) of the old one, each times `scale` (d',), and pad
    it with zero channels to a multiple of `multiple`; every norm output stays exactly the same as long as
    the sum of squares of the residual does. Returns the new hidden size."""
    model_type = getattr(model.config, "model_type", "")
    attn_readers, mlp_readers, attn_writer, mlp_writer = ROTATABLE[model_type]
    offset = adapter_for(model_type).norm_weight_offset
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    d = embed.weight.shape[1]
    # configs require hidden_size % heads == 0: pad with channels that are exactly 0 (no writer, no reader)
    pad = -int(src.numel()) % multiple
    src = torch.cat([src, torch.zeros(pad, dtype=torch.long)])
    scale = torch.cat([scale.double(), torch.zeros(pad, dtype=torch.float64)])
    d_new = int(src.numel())
    tied = head is not None and head.weight is embed.weight
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        w = embed.weight  # (V, d)
        embed.weight = nn.Parameter((w.double()[:, src] * scale[None, :]).to(w.dtype), requires_grad=False)
        embed.embedding_dim = d_new
        if tied:
            head.weight = embed.weight
        _, blocks = decoder_blocks(model)
        norms = [model.base_model.norm]
        for block in blocks:
            for name in (*attn_readers, *mlp_readers):
                _swap(block, name, _cols(block.get_submodule(name), src, scale))
            for name in (attn_writer, mlp_writer):
                _swap(block, name, _rows(block.get_submodule(name), src, scale))
            norms += [block.input_layernorm, block.post_attention_layernorm]
        if not tied:
            model.lm_head = _cols(head, src, scale)
        gain_factor = math.sqrt(d / d_new)  # rms' = sqrt(d / d') rms once eps' = eps d / d'
        for norm in norms:
            gain = norm.weight.double() + offset  # (d,)
            norm.weight = nn.Parameter((gain[src] * gain_factor - offset).to(norm.weight.dtype), requires_grad=False)
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(norm, attr, None), float):
                    setattr(norm, attr, getattr(norm, attr) * d / d_new)
    config.rms_norm_eps = config.rms_norm_eps * d / d_new
    config.head_dim = head_dim
    config.hidden_size = d_new
    return d_new


# --- helpers ---------------------------------------------------------------------------------


def _is_residual(model: nn.Module, module: str, d: int) -> bool:
    sub = model.get_submodule(module)
    width = getattr(sub, "out_features", None) or getattr(getattr(sub, "weight", None), "shape", (None,))[0]
    return width == d


def _writing_units(
    model, layer: int, channels: list[int], probes: list[torch.Tensor], max_units: int, share: float
) -> set[int]:
    """MLP units of `layer` that write most of each channel where it peaks: contribution = down[c, u] x input[u]."""
    _, blocks = decoder_blocks(model)
    down = blocks[layer].mlp.down_proj
    seen: list[torch.Tensor] = []

    def record(module, args):
        seen.append(args[0].detach()[0].double())  # (T, I): the input of down_proj

    handle = down.register_forward_pre_hook(record)  # removed in finally, like masking.hooks
    try:
        with torch.no_grad():
            for ids in probes:
                model(input_ids=ids.to(down.weight.device), use_cache=False)
    finally:
        handle.remove()
    chosen: set[int] = set()
    weight = down.weight.detach().double()  # (d, I)
    for c in channels:
        for x in seen:
            contrib = x * weight[c][None, :]  # (T, I)
            t = int(contrib.sum(-1).abs().argmax())  # the position where the channel peaks
            row = contrib[t]
            order = torch.argsort(row * torch.sign(row.sum()), descending=True)  # units pushing the value its way first
            total, acc = float(row.sum()), 0.0
            for u in order[:max_units].tolist():
                chosen.add(u)
                acc += float(row[u])
                if abs(total) > 0 and acc / total >= share:
                    break
    return chosen


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, new)


class RedundancyDefense:
    """`--strategy redundancy`: k residual copies of every critical channel and k copies of its writing units."""

    name = "redundancy"
    kind = "weights"

    def check(self, request, fp) -> None:
        check_redundant(fp.model_type)
        require_copies("--redundancy-copies", request.redundancy_copies)
        if request.redundancy_wide:
            require_copies("--redundancy-wide", request.redundancy_wide, "or 0 to carry only the attack sets' channels")

    def apply(self, step):
        from achilles_guard.defenses.base import Applied

        work = step.load()
        probes = [work.tokenizer(t, return_tensors="pt")["input_ids"] for t in step.fp.probe_texts]
        plan = plan_redundancy(
            work.model,
            step.fp,
            probes,
            copies=step.request.redundancy_copies,
            wide_copies=step.request.redundancy_wide,
        )
        d_before = work.model.config.hidden_size
        d_after = widen_residual(work.model, plan)
        details = {
            **plan.details(),
            "hidden_size": [d_before, d_after],
            "intermediate_size": work.model.config.intermediate_size,
        }
        return Applied.saved(step, work, details, same_basis=True)


DEFENSE = RedundancyDefense()
