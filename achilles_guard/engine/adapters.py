"""Architecture knowledge, in one table.

Every model family is described by an `Adapter`: how to name the role (component) of each leaf
module inside a decoder block, which projections feed an activation module, and how a norm
channel is switched off in the weights. Nothing else in the package says "llama" or "gpt2".

    >>> adapter_for("llama").component("mlp.down_proj")
    'mlp_out'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["COMPONENTS", "PRESETS", "Adapter", "ADAPTERS", "adapter_for", "FeedSlice"]

# Every component label a candidate module can carry.
COMPONENTS = (
    "mlp_out",  # MLP output projection: writes the residual stream (down_proj, c_proj, fc2...)
    "mlp_gate",  # gate projection of a gated MLP
    "mlp_up",  # up projection of a gated MLP
    "mlp_in",  # ungated MLP input (c_fc, fc1, dense_h_to_4h) or fused gate_up
    "mlp_act",  # the MLP activation module
    "attn_in",  # q, k, v or fused qkv projections
    "attn_out",  # attention output projection
    "norm",  # LayerNorm / RMSNorm inside the block
    "other",  # any other leaf with a weight (kept for `all` and regexes)
)

# Presets of `--components`, as sets of component labels. `paper` and regexes match names instead.
PRESETS: dict[str, frozenset[str]] = {
    "all": frozenset(COMPONENTS),
    "mlp-out": frozenset({"mlp_out"}),
    "mlp": frozenset({"mlp_out", "mlp_gate", "mlp_up", "mlp_in", "mlp_act"}),
    "attention": frozenset({"attn_in", "attn_out"}),
    "norms": frozenset({"norm"}),
    "up": frozenset({"mlp_up", "mlp_in"}),
    "gate": frozenset({"mlp_gate"}),
}
PAPER_NAME_RE = re.compile(r"mlp|ffn|feed_forward|attention|self_attn", re.IGNORECASE)


@dataclass(frozen=True)
class FeedSlice:
    """Projection `proj` (relative to the activation's parent) row `offset + c` feeds act channel c.

    `offset` is a multiple of the activation width for fused projections (Phi-3 `gate_up_proj`),
    expressed as a fraction of the projection's output width: 0.0 = first half, 0.5 = second half.
    """

    proj: str
    offset_fraction: float = 0.0


@dataclass(frozen=True)
class Adapter:
    """What we know about one model family."""

    family: str
    # (regex matched against the module name relative to its decoder block, component label)
    roles: tuple[tuple[str, str], ...]
    # activation module name (relative to the block) -> projections that feed it
    act_feeders: dict[str, tuple[FeedSlice, ...]] = field(default_factory=dict)
    # norms compute x_hat * (offset + weight): Gemma uses 1, everyone else 0
    norm_weight_offset: float = 0.0
    # pre-norm RMSNorm residual layout that `defenses.rotate` understands
    rotatable: bool = False

    def component(self, rel_name: str) -> str | None:
        """Component label of a block-relative module name, or None if the table does not know it."""
        for pattern, label in self.roles:
            if re.search(pattern, rel_name):
                return label
        return None

    def feeders(self, rel_name: str) -> tuple[FeedSlice, ...]:
        return self.act_feeders.get(rel_name, ())


_LLAMA_ROLES = (
    (r"(^|\.)down_proj$", "mlp_out"),
    (r"(^|\.)gate_proj$", "mlp_gate"),
    (r"(^|\.)up_proj$", "mlp_up"),
    (r"(^|\.)gate_up_proj$", "mlp_in"),
    (r"(^|\.)(act_fn|activation_fn)$", "mlp_act"),
    (r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj)$", "attn_in"),
    (r"(^|\.)o_proj$", "attn_out"),
    (r"norm$", "norm"),
)
_SWIGLU = {"mlp.act_fn": (FeedSlice("mlp.gate_proj"), FeedSlice("mlp.up_proj"))}

ADAPTERS: dict[str, Adapter] = {}


def _register(adapter: Adapter, *model_types: str) -> None:
    for model_type in model_types:
        ADAPTERS[model_type] = adapter


_register(
    Adapter("llama", _LLAMA_ROLES, _SWIGLU, rotatable=True),
    "llama", "mistral", "qwen2", "qwen3", "mixtral",
)
_register(
    Adapter("gemma", _LLAMA_ROLES, _SWIGLU, norm_weight_offset=1.0, rotatable=True),
    "gemma", "gemma2", "gemma3_text",
)
_register(
    Adapter(
        "phi3",
        _LLAMA_ROLES,
        {"mlp.activation_fn": (FeedSlice("mlp.gate_up_proj", 0.0), FeedSlice("mlp.gate_up_proj", 0.5))},
        rotatable=True,
    ),
    "phi3",
)
_register(
    Adapter(
        "gpt2",
        (
            (r"^mlp\.c_proj$", "mlp_out"),
            (r"^mlp\.c_fc$", "mlp_in"),
            (r"^mlp\.act$", "mlp_act"),
            (r"^attn\.c_attn$", "attn_in"),
            (r"^attn\.c_proj$", "attn_out"),
            (r"^ln_\d$", "norm"),
        ),
        {"mlp.act": (FeedSlice("mlp.c_fc"),)},
    ),
    "gpt2",
)
_register(
    Adapter(
        "gpt_neox",
        (
            (r"^mlp\.dense_4h_to_h$", "mlp_out"),
            (r"^mlp\.dense_h_to_4h$", "mlp_in"),
            (r"^mlp\.act$", "mlp_act"),
            (r"^attention\.query_key_value$", "attn_in"),
            (r"^attention\.dense$", "attn_out"),
            (r"layernorm$", "norm"),
        ),
        {"mlp.act": (FeedSlice("mlp.dense_h_to_4h"),)},
    ),
    "gpt_neox",
)
_register(
    Adapter(
        "opt",
        (
            (r"^fc2$", "mlp_out"),
            (r"^fc1$", "mlp_in"),
            (r"^activation_fn$", "mlp_act"),
            (r"^self_attn\.(q_proj|k_proj|v_proj)$", "attn_in"),
            (r"^self_attn\.out_proj$", "attn_out"),
            (r"layer_norm$", "norm"),
        ),
        {"activation_fn": (FeedSlice("fc1"),)},
    ),
    "opt",
)

# Families without an entry still work: names are classified by the generic table below.
_GENERIC = Adapter(
    "generic",
    (
        (r"(down_proj|dense_4h_to_h|fc2|mlp\.c_proj|w2)$", "mlp_out"),
        (r"(gate_proj|w1)$", "mlp_gate"),
        (r"(up_proj|w3)$", "mlp_up"),
        (r"(gate_up_proj|c_fc|fc1|dense_h_to_4h)$", "mlp_in"),
        (r"(act|act_fn|activation_fn)$", "mlp_act"),
        (r"(q_proj|k_proj|v_proj|qkv_proj|c_attn|query_key_value|Wqkv)$", "attn_in"),
        (r"(o_proj|out_proj|attn\.c_proj|attention\.dense)$", "attn_out"),
        (r"(norm|ln_\d|layernorm|layer_norm)$", "norm"),
    ),
)


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a `config.model_type`; the generic name table for unknown families."""
    return ADAPTERS.get(model_type, _GENERIC)
