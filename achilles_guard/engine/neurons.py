"""The neuron model: which neurons a model has, and which weights produce each one.

A neuron is `(module, channel)`: `module` is the qualified name of a leaf module inside a decoder
block, `channel` an index into the last dimension of its output (docs/design.md, "The neuron model").

    cands = discover(model, components="all")        # CandidateSet, modules in forward order
    cands.neuron(1234)                               # -> Neuron("model.layers.0.mlp.down_proj", 7)
    producing_slices(model, cands, Neuron(...))      # -> (WeightSlice(...), ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from achilles_guard.engine.adapters import adapter_for
from achilles_guard.engine.masking import hooks
from achilles_guard.engine.params import parse_components
from achilles_guard.errors import UsageError

__all__ = [
    "Neuron",
    "parse_neuron",
    "Candidate",
    "CandidateSet",
    "WeightSlice",
    "discover",
    "decoder_blocks",
    "producing_slices",
    "output_width",
    "parse_components",
]


@dataclass(frozen=True, order=True)
class Neuron:
    """One output channel of one leaf module."""

    module: str
    channel: int

    def __str__(self) -> str:
        return f"{self.module}[{self.channel}]"


def parse_neuron(spec: object) -> Neuron:
    """`"module[channel]"` (how reports print a neuron) or `"module:channel"` -> Neuron; ValueError otherwise.

    The one neuron syntax: every command and endpoint that takes a neuron name parses it here.
    """
    if isinstance(spec, str):
        if spec.endswith("]") and "[" in spec:
            module, _, channel = spec[:-1].rpartition("[")
        else:
            module, _, channel = spec.rpartition(":")
        if module and channel.isdigit():
            return Neuron(module, int(channel))
    raise ValueError(f"{spec!r}: not a neuron; use MODULE[CHANNEL], e.g. model.layers.0.mlp.down_proj[11]")


@dataclass(frozen=True)
class Candidate:
    """A leaf module whose output channels are candidate neurons."""

    name: str  # qualified module name
    layer: int  # decoder block index
    component: str  # label from adapters.COMPONENTS
    kind: str  # linear | conv1d | activation | norm
    width: int  # size of the output's last dimension


@dataclass(frozen=True)
class WeightSlice:
    """A slice of one parameter that produces a neuron: `param[index]` along `axis`.

    `null_value` is what the slice is set to to switch the neuron off (0, or -1 for norms that
    compute x_hat * (1 + weight)).
    """

    param: str
    axis: int
    index: int
    null_value: float = 0.0

    @property
    def key(self) -> str:
        """Stable tensor name, e.g. `model.layers.0.mlp.down_proj.weight@0:17`."""
        return f"{self.param}@{self.axis}:{self.index}"

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.select(self.axis, self.index)


@dataclass(frozen=True)
class CandidateSet:
    """Candidate modules in forward order; neurons get global indices in that order."""

    model_type: str
    components: str
    candidates: tuple[Candidate, ...]

    @property
    def offsets(self) -> torch.Tensor:
        """Start of each module's block of global indices, shape (M + 1,)."""
        widths = torch.tensor([c.width for c in self.candidates], dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long), widths.cumsum(0)])

    @property
    def total(self) -> int:
        return sum(c.width for c in self.candidates)

    def by_name(self) -> dict[str, Candidate]:
        return {c.name: c for c in self.candidates}

    def neurons(self, global_indices: Iterable[int]) -> list[Neuron]:
        """Neurons of the given global indices (vectorised lookup)."""
        idx = torch.as_tensor(list(global_indices), dtype=torch.long)
        if idx.numel() == 0:
            return []
        offsets = self.offsets
        module_idx = torch.searchsorted(offsets, idx, right=True) - 1
        channels = idx - offsets[module_idx]
        return [
            Neuron(self.candidates[m].name, c)
            for m, c in zip(module_idx.tolist(), channels.tolist())
        ]

    def neuron(self, global_index: int) -> Neuron:
        return self.neurons([global_index])[0]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks, found by its length = number of layers."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return name, module
    raise UsageError(
        f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
        f"{n_layers} layers; this architecture is not supported"
    )


def discover(model: nn.Module, components: str = "all") -> CandidateSet:
    """Candidate modules of `model` matching `--components`, in the order the forward calls them."""
    how, selector = parse_components(components)
    model_type = getattr(model.config, "model_type", "")
    adapter = adapter_for(model_type)
    prefix, blocks = decoder_blocks(model)
    found: dict[str, tuple[int, str, str]] = {}
    for layer, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if not rel or any(True for _ in module.children()):
                continue
            kind = _kind(module)
            if kind is None:
                continue
            label = adapter.component(rel) or ("norm" if kind == "norm" else "other")
            name = f"{prefix}.{layer}.{rel}"
            if how == "preset" and label not in selector:
                continue
            if how in ("paper", "regex") and not selector.search(name):
                continue
            found[name] = (layer, label, kind)
    if not found:
        raise UsageError(
            f"--components {components!r} matches no module inside the decoder blocks of this model"
        )
    order, widths = _probe_forward(model, list(found))
    candidates = tuple(
        Candidate(name, found[name][0], found[name][1], found[name][2], widths[name]) for name in order
    )
    return CandidateSet(model_type, components, candidates)


def producing_slices(model: nn.Module, neuron: Neuron, candidate: Candidate | None = None) -> tuple[WeightSlice, ...]:
    """The weight slices that produce `neuron`; zeroing them is the same attack as masking it."""
    module = model.get_submodule(neuron.module)
    kind = candidate.kind if candidate else _kind(module)
    adapter = adapter_for(getattr(model.config, "model_type", ""))
    c = neuron.channel
    if kind in ("linear", "conv1d"):
        return tuple(_projection_slices(module, neuron.module, c))
    if kind == "norm":
        out = []
        for pname, _ in module.named_parameters(recurse=False):
            null = adapter.norm_weight_offset * -1.0 if pname == "weight" else 0.0
            out.append(WeightSlice(f"{neuron.module}.{pname}", 0, c, null))
        return tuple(out)
    if kind == "activation":
        block_prefix, rel = _split_block_name(model, neuron.module)
        out = []
        for feed in adapter.feeders(rel):
            proj_name = f"{block_prefix}.{feed.proj}"
            proj = model.get_submodule(proj_name)
            width = output_width(proj)
            out.extend(_projection_slices(proj, proj_name, int(round(feed.offset_fraction * width)) + c))
        return tuple(out)
    return ()


def _projection_slices(module: nn.Module, name: str, row: int) -> list[WeightSlice]:
    axis = 1 if _kind(module) == "conv1d" else 0
    out = [WeightSlice(f"{name}.weight", axis, row)]
    if getattr(module, "bias", None) is not None:
        out.append(WeightSlice(f"{name}.bias", 0, row))
    return out


def output_width(module: nn.Module) -> int | None:
    """Output channels of a projection or norm from its weight; None when only a forward would tell."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return int(weight.shape[1] if _kind(module) == "conv1d" else weight.shape[0])  # Conv1D weight is (in, out)


def _split_block_name(model: nn.Module, name: str) -> tuple[str, str]:
    prefix, _ = decoder_blocks(model)
    rest = name[len(prefix) + 1 :]
    layer, _, rel = rest.partition(".")
    return f"{prefix}.{layer}", rel


def _kind(module: nn.Module) -> str | None:
    cls = type(module)
    if isinstance(module, nn.Linear):
        return "linear"
    if cls.__name__ == "Conv1D":
        return "conv1d"
    if isinstance(module, (nn.Dropout, nn.Identity)) or "Dropout" in cls.__name__:
        return None  # identity at inference: it would duplicate its input
    if "Norm" in cls.__name__:
        return "norm"
    mod = cls.__module__
    if mod.startswith("torch.nn.modules.activation") or mod == "transformers.activations":
        return "activation"
    return None


def _probe_forward(model: nn.Module, names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Run a 2-token forward to learn each module's output width and the forward call order."""
    order: list[str] = []
    widths: dict[str, int] = {}

    def recorder(name):
        def record(output):
            if name not in widths:
                order.append(name)
                widths[name] = int(output.shape[-1])
        return record

    embed = model.get_input_embeddings()
    device = embed.weight.device
    inputs = torch.zeros(1, 2, embed.weight.shape[1], dtype=embed.weight.dtype, device=device)
    with torch.no_grad(), hooks(model, {n: recorder(n) for n in names}):
        model.base_model(inputs_embeds=inputs, use_cache=False)
    return order, widths  # modules the forward never calls are not candidates
