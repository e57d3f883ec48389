"""The one way a hook enters a model, and the one masking mechanism.

Hooks are global state on the model: they are installed only inside `hooks(...)`, which removes
them in `finally`, even when the forward raises.

    with masked(model, MaskPlan.fixed({Neuron("model.layers.0.mlp.down_proj", 7)}, scale=0.0)):
        model(input_ids)                       # channel 7 of down_proj is 0 at every position

    plan = MaskPlan.top_n(names, module_index, channels, ns=[1, 2, 3], scale=0.0)
    with masked(model, plan):                  # row b of the batch masks the top ns[b] neurons
        model(input_ids.expand(3, -1))
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["hooks", "reads_input", "MaskPlan", "masked"]

# A hook function receives the module's output tensor; it may return a replacement. A function marked
# with `reads_input` (below) receives (output, first positional input, module) instead.
OutputFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def reads_input(fn: Callable[[torch.Tensor, torch.Tensor, nn.Module], "torch.Tensor | None"]) -> OutputFn:
    """Mark a hook function that also needs the module and its input: `fn(output, input, module)`."""
    fn.reads_input = True  # type: ignore[attr-defined]
    return fn  # type: ignore[return-value]


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, OutputFn]) -> Iterator[None]:
    """Install forward hooks `{module_name: fn(output) -> output | None}`; always removed on exit."""
    handles = []
    try:
        for name, fn in fns.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(_adapt(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adapt(fn: OutputFn):
    if getattr(fn, "reads_input", False):

        def hook_with_input(module, args, output):
            return fn(output, args[0] if args else None, module)

        return hook_with_input

    def hook(module, args, output):
        return fn(output)

    return hook


@dataclass(frozen=True)
class MaskPlan:
    """Per-module channel indices and per-row factors: output[b, ..., idx] *= factors[b].

    `channels[m]` has shape (k,); `factors[m]` has shape (R, k), R = 1 (same mask for every row of
    the batch) or R = batch size (a different mask per row). A factor is `scale` where the neuron is
    masked and exactly 1.0 elsewhere, so unmasked channels keep their bits.
    """

    channels: Mapping[str, torch.Tensor]
    factors: Mapping[str, torch.Tensor]

    @property
    def rows(self) -> int:
        return max((f.shape[0] for f in self.factors.values()), default=1)

    @staticmethod
    def fixed(neurons: Iterable, scale: float = 0.0) -> "MaskPlan":
        """Mask the same neurons in every row."""
        per_module: dict[str, list[int]] = {}
        for neuron in neurons:
            per_module.setdefault(neuron.module, []).append(neuron.channel)
        channels = {m: torch.tensor(sorted(set(cs)), dtype=torch.long) for m, cs in per_module.items()}
        factors = {m: torch.full((1, len(idx)), float(scale)) for m, idx in channels.items()}
        return MaskPlan(channels, factors)

    @staticmethod
    def per_row(
        module_names: "list[str] | tuple[str, ...]",
        module_index: torch.Tensor,
        channels: torch.Tensor,
        hit: torch.Tensor,
        *,
        scale: float = 0.0,
    ) -> "MaskPlan":
        """Row b masks the neurons j with `hit[b, j]`; neuron j is channel `channels[j]` of
        `module_names[module_index[j]]` (j over a pool of distinct neurons, hit shape (R, P))."""
        out_channels, out_factors = {}, {}
        for m in torch.unique(module_index).tolist():
            cols = (module_index == m).nonzero().flatten()  # (k,) pool positions in this module
            out_channels[module_names[m]] = channels[cols]
            out_factors[module_names[m]] = torch.where(hit[:, cols], float(scale), 1.0).float()
        return MaskPlan(out_channels, out_factors)

    @staticmethod
    def top_n(
        module_names: "list[str] | tuple[str, ...]",
        module_index: torch.Tensor,
        channels: torch.Tensor,
        ns: Iterable[int],
        *,
        scale: float = 0.0,
    ) -> "MaskPlan":
        """Row b masks the first ns[b] neurons of a ranked list.

        The neuron of rank i (0 = most important) is channel `channels[i]` of module
        `module_names[module_index[i]]`. Only neurons with rank < max(ns) are touched.
        """
        ns_t = torch.as_tensor(list(ns), dtype=torch.long)  # (R,)
        top = int(ns_t.max()) if ns_t.numel() else 0
        module_index = module_index[:top]
        channels = channels[:top]
        ranks = torch.arange(top)
        out_channels, out_factors = {}, {}
        for m in torch.unique(module_index).tolist():
            r = ranks[module_index == m]  # (k,) ranks of this module's neurons
            hit = r[None, :] < ns_t[:, None]  # (R, k): is rank r masked in row b?
            out_channels[module_names[m]] = channels[r]
            out_factors[module_names[m]] = torch.where(hit, float(scale), 1.0).float()
        return MaskPlan(out_channels, out_factors)


@contextmanager
def masked(model: nn.Module, plan: MaskPlan) -> Iterator[None]:
    """Apply `plan` to every forward inside the block (works with modules on several devices)."""
    with hooks(model, {name: _mask_fn(plan.channels[name], plan.factors[name]) for name in plan.channels}):
        yield


def _mask_fn(channels: torch.Tensor, factors: torch.Tensor) -> OutputFn:
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(output: torch.Tensor) -> torch.Tensor:
        key = (output.device, output.dtype)
        if key not in cache:
            cache[key] = (channels.to(output.device), factors.to(device=output.device, dtype=output.dtype))
        idx, f = cache[key]
        rows = f.shape[0]
        shape = output.shape
        if rows != 1 and shape[0] != rows:
            # Some blocks flatten batch and positions before the MLP (OPT: fc1/fc2 see (B*T, C));
            # the flattening is batch-major, so (B*T, C) -> (B, T, C) puts row b back together.
            if output.dim() != 2 or shape[0] % rows:
                raise ValueError(f"mask has {rows} rows but the batch has {shape[0]}")
            output = output.reshape(rows, -1, shape[-1])  # (R, T, C)
        # (R, k) -> (R, 1, ..., 1, k) to broadcast over every position
        f = f.reshape(rows, *([1] * (output.dim() - 2)), -1)
        if torch.is_grad_enabled() and output.requires_grad:
            output = output.clone()  # never modify a tensor autograd may need
        output[..., idx] = output[..., idx] * f
        return output.reshape(shape)

    return apply
