"""The attention-sink test model: a tiny Llama with a first-token attention sink, built for the tests.

`tests/test_sink_fixture.py` checks the construction and what each defence does on it
(docs/fixtures.md, "attention sink"). The demo model that `guard scan --demo` uses is
`achilles_guard.engine.demo`; this one only serves the tests, so it lives here.

    model_dir = build_sink_model(tmp / "model")
    SINK_PLANT.critical_set()          # the planted down_proj channels
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from achilles_guard.engine.demo import build_tokenizer
from achilles_guard.engine.neurons import Neuron

__all__ = [
    "SinkPlant",
    "SINK_PLANT",
    "plant_attention_sink",
    "build_sink_tokenizer",
    "build_sink_model",
    "unigram_logits",
]


@dataclass(frozen=True)
class SinkPlant:
    """A massive activation at the first (BOS) position only, used by later heads as an attention sink.

    The shape real LLMs show (Sun et al. 2024; Xiao et al. 2023), with every norm weight left at 1:

    1. the BOS embedding carries a detector channel `bos_channel` that no other token has;
    2. one MLP unit of layer `layer` reads it and writes `massive` onto `channels` at the BOS
       position only (zero elsewhere: its input is exactly 0 at every other token);
    3. in every later layer, heads `sink_heads` have a query that reads the constant channel
       `const_channel` and a key that reads `channels`, both on the lowest-frequency RoPE pair, so
       every position attends to position 0 with a logit of about `sink_logit`; the value of
       position 0 is exactly 0 (values read only the constant channel, which BOS lacks and no
       layer writes), so the heads are a no-op;
    4. nothing else writes `channels`; a "junk" channel `junk_channel` is written only by the sink
       heads (their value reads the constant channel) and read by the LM head, which turns it into
       confident predictions of `junk_tokens`.

    Remove the massive value and the BOS key vanishes: the sink heads attend uniformly, average the
    constant channel into `junk_channel`, and the model predicts junk everywhere. Remove a proper
    subset and RMSNorm rescales the rest: the BOS key shrinks by at most sqrt(k) and the sink holds.
    The LM head also reads the constant channel with the log unigram frequencies of the probe texts
    (`unigram=True`), so the clean model is better than uniform.
    """

    layer: int = 0
    unit: int = 3
    channels: tuple[int, ...] = (11, 29, 47)
    bos_channel: int = 1
    const_channel: int = 0
    junk_channel: int = 5
    massive: float = 1000.0  # fp16-safe
    gain: float = 2.0  # gate/up weight on the BOS channel
    sink_heads: tuple[int, ...] = (0, 1)
    sink_logit: float = 30.0
    junk_gain: float = 50.0  # o_proj weight onto the junk channel, per sink head
    junk_logit: float = 4.0  # LM-head weight from the junk channel to each junk token
    junk_tokens: int = 8  # the last `junk_tokens` ids of the vocabulary
    embed_std: float = 1.0

    def critical_set(self, prefix: str = "model.layers") -> set[Neuron]:
        return {Neuron(f"{prefix}.{self.layer}.mlp.down_proj", c) for c in self.channels}


SINK_PLANT = SinkPlant()


def build_sink_tokenizer(texts: list[str] | None = None):
    """`build_tokenizer()` that prepends the BOS token to every text, as Llama tokenizers do."""
    from tokenizers import processors

    tok = build_tokenizer(texts)
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def unigram_logits(tokenizer, vocab_size: int, texts: list[str] | None = None) -> torch.Tensor:
    """Centered log unigram frequencies (add-one smoothed) of `texts` (default: the probe texts); (V,)."""
    from achilles_guard.engine.texts import default_texts

    corpus = texts if texts is not None else [t for _, t in default_texts()]
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for text in corpus:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    logp = counts.log() - counts.sum().log()
    return (logp - logp.mean()).float()


def plant_attention_sink(model, plant: SinkPlant = SINK_PLANT, *, bos_token_id: int = 0,
                         unigram: torch.Tensor | None = None) -> set[Neuron]:
    """Plant the first-token attention sink (see SinkPlant) into a Llama model in place; return the set.

    `unigram` (V,): LM-head weights on the constant channel (e.g. `unigram_logits(...)`).
    """
    cfg = model.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    if cfg.num_key_value_heads != heads:
        raise ValueError("plant_attention_sink needs num_key_value_heads == num_attention_heads")
    layers = model.model.layers
    massive = list(plant.channels)
    special = [*massive, plant.bos_channel, plant.const_channel, plant.junk_channel]
    if len(set(special)) != len(special) or max(special) >= d:
        raise ValueError(f"SinkPlant channels must be distinct and < hidden size {d}: {special}")
    slow = head_dim // 2 - 1  # lowest-frequency RoPE pair is (slow, slow + head_dim/2): cos ~ 1 over the context
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        embed = model.get_input_embeddings().weight  # (V, d)
        embed.normal_(0.0, plant.embed_std)
        embed[:, special] = 0.0
        embed[:, plant.const_channel] = 1.0
        embed[bos_token_id] = 0.0
        embed[bos_token_id, plant.bos_channel] = 1.0  # BOS: the detector channel only (constant channel 0)
        # nobody but the planted unit writes the massive channels, nobody but the sink heads writes junk,
        # nobody writes the BOS or constant channels: at BOS the constant channel (the sink value) is exactly 0
        for layer in layers:
            fixed = [*massive, plant.junk_channel, plant.bos_channel, plant.const_channel]
            layer.self_attn.o_proj.weight[fixed] = 0.0
            layer.mlp.down_proj.weight[fixed] = 0.0
            layer.self_attn.v_proj.weight[:, massive] = 0.0  # values never read the massive channels
        mlp = layers[plant.layer].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[plant.unit] = 0.0
            proj.weight[plant.unit, plant.bos_channel] = plant.gain
        # RMSNorm of the BOS embedding (one unit channel): the BOS channel reads sqrt(d)
        x = plant.gain * d**0.5
        act = x * x / (1 + math.exp(-x))  # silu(x) * x
        mlp.down_proj.weight[:, plant.unit] = 0.0
        mlp.down_proj.weight[massive, plant.unit] = plant.massive / act
        # sink heads: q reads the constant channel (~1 after norm), k reads the massive channels
        # (each sqrt(d / k) after norm at BOS, 0 elsewhere); logit = q k / sqrt(head_dim)
        key_at_bos = len(massive) * (d / len(massive)) ** 0.5
        qk = (plant.sink_logit * head_dim**0.5 / key_at_bos) ** 0.5
        for layer in layers[plant.layer + 1 :]:
            attn = layer.self_attn
            for h in plant.sink_heads:
                rows = slice(h * head_dim, (h + 1) * head_dim)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.weight[rows] = 0.0
                attn.q_proj.weight[h * head_dim + slow, plant.const_channel] = qk
                attn.k_proj.weight[h * head_dim + slow, massive] = qk
                attn.v_proj.weight[h * head_dim, plant.const_channel] = 1.0
                attn.o_proj.weight[:, rows] = 0.0
                attn.o_proj.weight[plant.junk_channel, h * head_dim] = plant.junk_gain
        head = model.lm_head.weight  # (V, d)
        head[:, special] = 0.0
        head[vocab - plant.junk_tokens :, plant.junk_channel] = plant.junk_logit
        if unigram is not None:
            head[:, plant.const_channel] = unigram.to(head.dtype)
    return plant.critical_set()


def build_sink_model(out_dir: str | Path, *, seed: int = 0, plant: SinkPlant = SINK_PLANT, hidden: int = 64,
                     layers: int = 4, intermediate: int = 128) -> Path:
    """Write the attention-sink model (config, safetensors, BOS-prepending tokenizer) to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from achilles_guard.formats.load import quiet_transformers

    quiet_transformers()
    tokenizer = build_sink_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    plant_attention_sink(model, plant, bos_token_id=tokenizer.bos_token_id,
                         unigram=unigram_logits(tokenizer, config.vocab_size))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
