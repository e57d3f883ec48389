"""Net2WiderNet neuron splitting: duplicate critical MLP units, divide their outgoing weights.

A gated MLP computes down(act(gate x) * up x). Unit u is row u of gate and up and column u of
down. Replacing it by k copies, each with row u of gate and up and column u of down divided by k,
computes exactly the same function (Chen et al. 2016, Net2WiderNet), and masking one copy now
removes 1/k of the unit's contribution instead of all of it. Every layer is widened to the same
`intermediate_size` (layers with fewer splits get zero units, which contribute exactly 0).

What splitting cannot protect: a *residual* channel (an output channel of down_proj or o_proj, a
norm channel). Zeroing it removes the whole value however many units write it. `plan_split` says so.

    plan = plan_split(model, critical_neurons, candidates_by_name, copies=4)
    split_model(model, plan)          # in place; config.intermediate_size updated
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from achilles_guard.engine.neurons import Neuron, decoder_blocks
from achilles_guard.errors import UsageError

__all__ = ["SplitPlan", "plan_split", "split_model", "SPLITTABLE"]

_SPLIT_WHY = "a unit needs at least two copies to be split"
SPLITTABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma")  # separate gate_proj / up_proj / down_proj
_UNIT_COMPONENTS = {"mlp_act", "mlp_gate", "mlp_up"}
_RESIDUAL_COMPONENTS = {"mlp_out", "attn_out", "norm"}


@dataclass(frozen=True)
class SplitPlan:
    copies: int
    units: dict[int, tuple[int, ...]]  # layer -> intermediate units to split
    residual: tuple[Neuron, ...]  # critical neurons that are residual channels (not protected)
    unsupported: tuple[Neuron, ...]  # critical neurons splitting does not address (attention inputs...)
    fed_units: dict[str, tuple[int, int]]  # residual neuron -> (layer, strongest feeding unit) split anyway

    @property
    def protects_all(self) -> bool:
        return not self.residual and not self.unsupported

    def notes(self) -> list[str]:
        out = []
        if self.residual:
            out.append(
                f"{len(self.residual)} critical neuron(s) are residual-stream channels "
                f"({', '.join(str(n) for n in self.residual[:4])}{'...' if len(self.residual) > 4 else ''}): "
                "splitting cannot protect them - zeroing the channel removes its whole value however many "
                "units write it; their strongest feeding units were split, which only protects against "
                "masking those units"
            )
        if self.unsupported:
            out.append(f"{len(self.unsupported)} critical neuron(s) are not MLP units and were left as they are")
        return out


def require_copies(flag: str, copies: int, why: str = "") -> None:
    """The one check behind --copies, --redundancy-copies and --head-copies: a copy count is at least 2."""
    if copies < 2:
        raise UsageError(f"{flag} must be >= 2 (got {copies})" + (f": {why}" if why else ""))


def plan_split(model: nn.Module, critical: tuple[Neuron, ...], by_name: dict, *, copies: int) -> SplitPlan:
    """Which units to split for `critical` (Candidates looked up in `by_name`)."""
    require_copies("--copies", copies, _SPLIT_WHY)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in SPLITTABLE:
        raise UsageError(
            f"--strategy split supports gated MLPs with separate gate/up/down projections "
            f"({', '.join(SPLITTABLE)}); model_type {model_type!r} is not one of them"
        )
    prefix, blocks = decoder_blocks(model)
    units: dict[int, set[int]] = {}
    residual, unsupported, fed = [], [], {}
    for neuron in critical:
        cand = by_name.get(neuron.module)
        component = cand.component if cand else "other"
        layer = cand.layer if cand else -1
        if component in _UNIT_COMPONENTS:
            units.setdefault(layer, set()).add(neuron.channel)
        elif component in _RESIDUAL_COMPONENTS:
            residual.append(neuron)
            if component == "mlp_out":
                down = blocks[layer].mlp.down_proj.weight  # (d, I)
                u = int(down[neuron.channel].abs().argmax())
                units.setdefault(layer, set()).add(u)
                fed[str(neuron)] = (layer, u)
        else:
            unsupported.append(neuron)
    return SplitPlan(
        copies,
        {layer: tuple(sorted(u)) for layer, u in sorted(units.items())},
        tuple(residual),
        tuple(unsupported),
        fed,
    )


def split_model(model: nn.Module, plan: SplitPlan) -> int:
    """Apply `plan` in place; returns the new intermediate size."""
    _, blocks = decoder_blocks(model)
    width = blocks[0].mlp.gate_proj.out_features
    extra = max((len(u) for u in plan.units.values()), default=0) * (plan.copies - 1)
    new_width = width + extra
    k = plan.copies
    for layer, block in enumerate(blocks):
        mlp = block.mlp
        chosen = torch.tensor(plan.units.get(layer, ()), dtype=torch.long)  # (s,)
        src = torch.cat([torch.arange(width), chosen.repeat_interleave(k - 1)])  # (width + s(k-1),) source unit
        pad = new_width - src.numel()
        keep = torch.cat([torch.ones(src.numel()), torch.zeros(pad)])  # (new_width,) 0 = zero unit
        src = torch.cat([src, torch.zeros(pad, dtype=torch.long)])
        share = torch.ones(width)
        share[chosen] = 1.0 / k
        out_scale = share[src] * keep  # (new_width,) outgoing weight factor per new unit
        with torch.no_grad():
            mlp.gate_proj = _rows(mlp.gate_proj, src, keep)
            mlp.up_proj = _rows(mlp.up_proj, src, keep)
            mlp.down_proj = _cols(mlp.down_proj, src, out_scale)
    model.config.intermediate_size = new_width
    for block in blocks:
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = new_width
    return new_width


def _rows(linear: nn.Linear, src: torch.Tensor, keep: torch.Tensor) -> nn.Linear:
    """A wider Linear whose output row j is row src[j] of `linear` times keep[j]."""
    w = linear.weight  # (I, d)
    new = nn.Linear(linear.in_features, src.numel(), bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w[src.to(w.device)] * keep.to(w)[:, None])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[src.to(w.device)] * keep.to(w))
    return new.requires_grad_(False)


def _cols(linear: nn.Linear, src: torch.Tensor, scale: torch.Tensor) -> nn.Linear:
    """A wider Linear whose input column j is column src[j] of `linear` times scale[j]."""
    w = linear.weight  # (d, I)
    new = nn.Linear(src.numel(), linear.out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w[:, src.to(w.device)] * scale.to(w)[None, :])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new.requires_grad_(False)


class SplitDefense:
    """`--strategy split`: Net2WiderNet copies of the critical MLP units (`--copies`)."""

    name = "split"
    kind = "weights"

    def check(self, request, fp) -> None:
        require_copies("--copies", request.copies, _SPLIT_WHY)

    def apply(self, step):
        from achilles_guard.defenses.base import Applied
        from achilles_guard.engine.neurons import discover

        work = step.load()
        by_name = discover(work.model, step.fp.scan_params.get("components", "all")).by_name()
        plan = plan_split(work.model, step.fp.critical_set, by_name, copies=step.request.copies)
        width = split_model(work.model, plan)
        details = {
            "copies": plan.copies,
            "units": {str(k): list(v) for k, v in plan.units.items()},
            "intermediate_size": width,
            "protects_all": plan.protects_all,
            "notes": plan.notes(),
        }
        return Applied.saved(step, work, details, same_basis=True)


DEFENSE = SplitDefense()
