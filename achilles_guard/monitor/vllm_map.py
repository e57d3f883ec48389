"""The fingerprint on a serving engine's fused parameters (vLLM), without importing the engine.

vLLM fuses projections: a Llama block has `self_attn.qkv_proj` (q_proj, k_proj, v_proj stacked on the
output dimension) and `mlp.gate_up_proj` (gate_proj, up_proj). The model class says what each fused
module is made of in `packed_modules_mapping` ({"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...});
the size of each part comes from the fused module itself (`output_partition_sizes` / `output_sizes`,
which vLLM computes from the model config) or, for a module without them, from the config
(heads x head_dim, kv heads x head_dim; intermediate_size). No offset is ever hard-coded.

    layout = packed_layout(model, hf_config)          # Layout: checkpoint module -> (fused module, offset, size)
    live = live_tensors(model, layout, recorded)      # checkpoint tensor name -> live view (shares memory)
    src = LiveSource(live, files)                     # the formats.source interface over memory
    check = records.check_tensors(src, fp.records)    # the whole-model check, same rules as verify-checkpoint
    fp_live, dropped = remap_fingerprint(fp, layout, model)   # neurons and slices on the fused modules

`fp_live` is a Fingerprint whose neurons and slices name vLLM's modules and parameters (a k_proj
channel c is qkv_proj channel q_size + c), so ActivationMonitor and RuntimeIntegrityChecker run on
the served model unchanged. Neurons vLLM has no module for are dropped, with the reason: the MLP
activation (vLLM's `act_fn` is SiluAndMul, silu(gate) * up, not the checkpoint model's act(gate)).
Their producing slices are still checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from achilles_guard.engine.neurons import Neuron
from achilles_guard.errors import InputError
from achilles_guard.formats.source import FLOAT_DTYPES, TensorEntry, width_of

__all__ = ["PackedPart", "Layout", "packed_layout", "live_tensors", "LiveSource", "remap_fingerprint",
           "ST_DTYPE"]

ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}
_UNMAPPED_COMPONENTS = {"mlp_act": "vLLM fuses the activation with the up projection (SiluAndMul): no module "
                                   "outputs the checkpoint model's activation"}


@dataclass(frozen=True)
class PackedPart:
    """One checkpoint module inside a fused one: output rows [offset, offset + size) of `fused`."""

    name: str  # checkpoint module, e.g. model.layers.0.self_attn.k_proj
    fused: str  # engine module, e.g. model.layers.0.self_attn.qkv_proj
    offset: int
    size: int


@dataclass(frozen=True)
class Layout:
    parts: dict  # checkpoint module name -> PackedPart
    by_fused: dict  # fused module name -> tuple[PackedPart, ...] in output order
    vocab_rows: dict  # module name -> rows of the checkpoint's vocabulary (an embedding padded by the engine)

    def module(self, name: str) -> tuple[str, int]:
        """(engine module, channel offset) of a checkpoint module."""
        part = self.parts.get(name)
        return (part.fused, part.offset) if part is not None else (name, 0)


def _config_sizes(leaf: str, subs: list[str], config) -> list[int] | None:
    """The parts' sizes from the model config, for a fused module that does not carry them."""
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    config = get() if callable(get) else config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if subs == ["q_proj", "k_proj", "v_proj"] and heads and hidden:
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return [heads * head_dim, kv * head_dim, kv * head_dim]
    inter = getattr(config, "intermediate_size", None)
    if subs == ["gate_proj", "up_proj"] and inter:
        return [inter, inter]
    return None


def packed_layout(model: torch.nn.Module, config=None) -> Layout:
    """Every fused module of `model` per its class's `packed_modules_mapping`; InputError if the sizes disagree."""
    mapping = dict(getattr(model, "packed_modules_mapping", None) or {})
    parts: dict[str, PackedPart] = {}
    by_fused: dict[str, tuple[PackedPart, ...]] = {}
    vocab: dict[str, int] = {}
    for name, module in model.named_modules():
        org = getattr(module, "org_vocab_size", None)
        weight = getattr(module, "weight", None)
        if isinstance(org, int) and isinstance(weight, torch.Tensor) and 0 < org < weight.shape[0]:
            vocab[name] = org
        leaf = name.rsplit(".", 1)[-1]
        subs = mapping.get(leaf)
        if not subs or not isinstance(weight, torch.Tensor):
            continue
        subs = list(subs)
        if int(getattr(module, "tp_size", 1) or 1) > 1:
            raise InputError(f"{name}: tensor parallel size {module.tp_size}; guard checks one unsharded copy "
                             "of the weights (--tensor-parallel-size 1)")
        sizes = getattr(module, "output_partition_sizes", None) or getattr(module, "output_sizes", None)
        sizes = list(sizes) if sizes else _config_sizes(leaf, subs, config)
        if sizes is None or len(sizes) != len(subs):
            raise InputError(f"{name}: fused from {subs}, but neither the module nor the config gives their sizes")
        if sum(sizes) != weight.shape[0]:
            raise InputError(f"{name}: parts {dict(zip(subs, sizes))} add up to {sum(sizes)} rows, the weight has "
                             f"{weight.shape[0]}")
        prefix = name[: len(name) - len(leaf)]
        offset, group = 0, []
        for sub, size in zip(subs, sizes):
            part = PackedPart(prefix + sub, name, offset, int(size))
            parts[part.name] = part
            group.append(part)
            offset += int(size)
        by_fused[name] = tuple(group)
    return Layout(parts, by_fused, vocab)


def live_tensors(model: torch.nn.Module, layout: Layout, recorded: set[str] | frozenset = frozenset(),
                 served=None) -> dict:
    """Checkpoint tensor name -> the live tensor (a view: it follows any later change in memory).

    A fused parameter is split into its parts' rows; a padded vocabulary is cut to the checkpoint's rows. A
    tensor the engine ties under two names (lm_head = embed_tokens) is listed once, under the name the
    fingerprint records (or the first). A parameter `served` (monitor.served.ServedWeights) holds is a
    ServedTensor, read back through the engine's kernel when judged; one the engine emptied otherwise is left out."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        module, _, leaf = pname.rpartition(".")
        if served is not None and pname in served:
            data = served.tensor(pname)
        elif param.numel() == 0 and param.dim() == 1:
            continue  # repacked into a kernel guard cannot read back
        else:
            data = param.detach()
        if module in layout.vocab_rows and data.dim() >= 1:
            data = data.narrow(0, 0, layout.vocab_rows[module])
        group = layout.by_fused.get(module)
        pieces = ([(f"{p.name}.{leaf}", data.narrow(0, p.offset, p.size)) for p in group] if group and data.dim() >= 1
                  else [(pname, data)])
        for name, tensor in pieces:
            ident = ((tensor.data_ptr(),) if isinstance(tensor, torch.Tensor) else (tensor.param, tensor.start)) + (
                tuple(tensor.shape), tensor.dtype)
            first = seen.get(ident)
            if first is not None:  # an alias of a tensor already listed (tied weights)
                if name in recorded and first not in recorded:
                    out[name] = out.pop(first)
                    seen[ident] = name
                continue
            seen[ident] = name
            out[name] = tensor
    return out


class LiveSource:
    """The formats.source interface (entries, raw, rows, has_values) over tensors in memory, so
    records.check_tensors judges the served weights exactly as verify-checkpoint judges a file. A value
    that is not a tensor (a ServedTensor) is read when an entry is judged."""

    kind = "safetensors"

    def __init__(self, tensors: dict, files, file_of: dict | None = None):
        self.files = list(files)
        self._tensors = {}
        self.entries = []
        file_of = file_of or {}
        for name, t in tensors.items():
            dtype = ST_DTYPE.get(t.dtype)
            if dtype is None:
                raise InputError(f"{name}: dtype {t.dtype} in memory, which no fingerprint records")
            if isinstance(t, torch.Tensor):
                t = t.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
            self._tensors[name] = t
            self.entries.append(TensorEntry(name, dtype, tuple(t.shape), file_of.get(name, "<memory>"), 0,
                                            math.prod(t.shape) * t.dtype.itemsize))

    def _bytes(self, entry: TensorEntry) -> np.ndarray:
        t = self._tensor(entry.name).reshape(-1)
        return t.contiguous().view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)

    def raw(self, entry: TensorEntry) -> memoryview:
        return memoryview(self._bytes(entry))

    def has_values(self, entry: TensorEntry) -> bool:
        return entry.dtype in FLOAT_DTYPES

    def rows(self, entry: TensorEntry, start: int, stop: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """(stop - start, c1 - c0) float64 values of rows [start, stop), columns [c0, c1) of the row view."""
        width = width_of(entry.shape)
        c1 = width if c1 is None else c1
        view = self._tensor(entry.name).reshape(-1, width)
        return view[start:stop, c0:c1].to(torch.float64).numpy()

    def _tensor(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        return t if isinstance(t, torch.Tensor) else t.read()

    def close(self) -> None:
        self._tensors = {}


def remap_fingerprint(fp, layout: Layout, model: torch.nn.Module):
    """(fingerprint on the engine's modules and parameters, dropped neurons as (name, reason) pairs)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    slices = {}
    for key, rec in fp.slices.items():
        module, _, leaf = rec.param.rpartition(".")
        fused, offset = layout.module(module)
        if offset and rec.axis != 0:
            raise InputError(f"fingerprint slice {key}: axis {rec.axis} of a fused parameter (only output rows are)")
        pname = f"{fused}.{leaf}"
        param = params.get(pname)
        if param is None:
            raise InputError(f"fingerprint {fp.path}: parameter {rec.param} is not in the served model "
                             f"(looked for {pname}); the fingerprint belongs to another model")
        slices[key] = replace(rec, param=pname, index=rec.index + (offset if rec.axis == 0 else 0),
                              shape=tuple(param.shape))
    modules = dict(model.named_modules())
    neurons, dropped = [], []
    for record in fp.neurons:
        reason = _UNMAPPED_COMPONENTS.get(record.component)
        fused, offset = layout.module(record.neuron.module)
        if reason is None and fused not in modules:
            reason = f"no module {fused} in the served model"
        if reason is not None:
            dropped.append((str(record.neuron), reason))
            continue
        neurons.append(replace(record, neuron=Neuron(fused, record.neuron.channel + offset)))
    critical = tuple(Neuron(*_shift(layout, n)) for n in fp.critical_set)
    return replace(fp, slices=slices, neurons=tuple(neurons), critical_set=critical), tuple(dropped)


def _shift(layout: Layout, neuron: Neuron) -> tuple[str, int]:
    fused, offset = layout.module(neuron.module)
    return fused, neuron.channel + offset
