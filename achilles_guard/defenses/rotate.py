"""Residual-stream rotation: spread every residual channel's content over all channels.

For a pre-norm RMSNorm decoder (Llama, Mistral, Qwen2, Gemma, Phi-3) the residual stream h (T, d)
is read only through RMSNorms and written only by the attention and MLP output projections. With an
orthogonal Q (d, d), rms(h Q) = rms(h), so the model computes the same function on h' = h Q when

    1. every norm weight w is folded into the linears that read the norm (W <- W diag(w)), norm = 1;
    2. the LM head is untied from the embeddings;
    3. embeddings E <- E Q; readers (q, k, v, gate, up, lm_head) W <- W Q;
       writers (o_proj, down_proj) W <- Q^T W, bias b <- Q^T b.

(The "computational invariance" of QuaRot / SliceGPT; the code is our own.) All products run in
float64; the result is stored in the model's dtype. A massive activation on one residual channel
becomes a spread-out direction: zeroing any single channel of the rotated model removes ~1/d of it.

    rotated = rotate_model(model, seed=0)          # in place; returns a RotationRecord
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from achilles_guard.engine.adapters import adapter_for
from achilles_guard.engine.neurons import decoder_blocks
from achilles_guard.errors import UsageError

__all__ = ["ROTATABLE", "RotationRecord", "orthogonal", "rotate_model", "check_rotatable"]

# model_type -> (attention readers, mlp readers, attention writer, mlp writer); names relative to a block.
ROTATABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, str]] = {
    "llama": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        "self_attn.o_proj",
        "mlp.down_proj",
    ),
    "mistral": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        "self_attn.o_proj",
        "mlp.down_proj",
    ),
    "qwen2": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        "self_attn.o_proj",
        "mlp.down_proj",
    ),
    "gemma": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        "self_attn.o_proj",
        "mlp.down_proj",
    ),
    "phi3": (("self_attn.qkv_proj",), ("mlp.gate_up_proj",), "self_attn.o_proj", "mlp.down_proj"),
}


@dataclass(frozen=True)
class RotationRecord:
    kind: str  # hadamard | random
    seed: int
    hidden_size: int
    layers: int
    untied: bool  # the LM head was tied to the embeddings and is now its own matrix
    seconds: float
    seconds_per_layer: float


def check_rotatable(model_type: str) -> None:
    """UsageError (exit 2) for families whose residual stream is not pre-norm RMSNorm only."""
    if model_type not in ROTATABLE or not adapter_for(model_type).rotatable:
        raise UsageError(
            f"--strategy rotate supports pre-norm RMSNorm families ({', '.join(sorted(ROTATABLE))}); "
            f"model_type {model_type!r} is not one of them (use --strategy split, finetune or pin)"
        )


def orthogonal(d: int, *, seed: int, kind: str = "auto") -> tuple[torch.Tensor, str]:
    """A seeded (d, d) float64 orthogonal matrix: randomized Hadamard when d is a power of 2 (auto)."""
    generator = torch.Generator().manual_seed(seed)
    if kind not in ("auto", "hadamard", "random"):
        raise UsageError(f"--rotation {kind!r}: use auto, hadamard or random")
    power_of_two = d > 0 and d & (d - 1) == 0
    if kind == "hadamard" and not power_of_two:
        raise UsageError(f"--rotation hadamard needs a power-of-two hidden size (got {d}); use random")
    if kind in ("auto", "hadamard") and power_of_two:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:  # Sylvester construction
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1  # (d,) random ±1
        return signs[:, None] * h / math.sqrt(d), "hadamard"  # D H / sqrt(d)
    g = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :], "random"  # Haar-distributed


def rotate_model(model: nn.Module, *, seed: int = 0, kind: str = "auto") -> RotationRecord:
    """Rotate `model`'s residual stream in place (see module docstring); returns what was done."""
    import time

    model_type = getattr(model.config, "model_type", "")
    check_rotatable(model_type)
    attn_readers, mlp_readers, attn_writer, mlp_writer = ROTATABLE[model_type]
    offset = adapter_for(model_type).norm_weight_offset  # Gemma norms compute x_hat * (1 + w)
    t0 = time.perf_counter()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    d = embed.weight.shape[1]
    q, kind = orthogonal(d, seed=seed, kind=kind)  # (d, d)
    untied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if untied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        _untie_config(model.config)

    with torch.no_grad():
        _set(embed.weight, embed.weight.double() @ q)  # (V, d) @ (d, d)
        _, blocks = decoder_blocks(model)
        for block in blocks:
            _fold_and_rotate(block.input_layernorm, [block.get_submodule(n) for n in attn_readers], q, offset)
            _rotate_writer(block.get_submodule(attn_writer), q)
            _fold_and_rotate(block.post_attention_layernorm, [block.get_submodule(n) for n in mlp_readers], q, offset)
            _rotate_writer(block.get_submodule(mlp_writer), q)
        _fold_and_rotate(model.base_model.norm, [head], q, offset)
    seconds = time.perf_counter() - t0
    return RotationRecord(kind, seed, d, len(blocks), untied, seconds, seconds / max(len(blocks), 1))


# --- helpers ---------------------------------------------------------------------------------


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _fold_and_rotate(norm: nn.Module, readers: list[nn.Module], q: torch.Tensor, offset: float) -> None:
    """W <- (W diag(offset + w)) Q for every reader of `norm`; the norm becomes the identity gain."""
    gain = norm.weight.double() + offset  # (d,)
    for linear in readers:
        _set(linear.weight, (linear.weight.double() * gain[None, :]) @ q)  # (out, d) @ (d, d)
    norm.weight.fill_(1.0 - offset)


def _rotate_writer(linear: nn.Module, q: torch.Tensor) -> None:
    """W <- Q^T W, b <- Q^T b: the writer's output lands in the rotated basis."""
    _set(linear.weight, q.T @ linear.weight.double())  # (d, d) @ (d, in)
    if getattr(linear, "bias", None) is not None:
        _set(linear.bias, q.T @ linear.bias.double())  # (d,)


def _untie_config(config) -> None:
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False


class RotateDefense:
    """`--strategy rotate`: a rotated checkpoint (the neuron basis changes)."""

    name = "rotate"
    kind = "weights"

    def check(self, request, fp) -> None:
        check_rotatable(fp.model_type)

    def apply(self, step):
        from achilles_guard.defenses.base import Applied

        work = step.load()
        record = rotate_model(work.model, seed=step.request.seed, kind=step.request.rotation)
        details = {
            "rotation": record.kind,
            "seed": record.seed,
            "untied_lm_head": record.untied,
            "rotate_seconds": round(record.seconds, 4),
            "seconds_per_layer": round(record.seconds_per_layer, 5),
        }
        return Applied.saved(step, work, details, same_basis=False)


DEFENSE = RotateDefense()
