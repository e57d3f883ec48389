"""The built-in demonstration model: a tiny Llama whose critical set is known by construction.

It mirrors how massive activations arise in real LLMs (Sun et al. 2024) and why the paper's
critical neurons collapse a model:

1. every token embedding carries a constant channel `const_channel` (value 1);
2. one MLP unit of an early layer reads that channel (gate and up) and, through `down_proj`,
   writes a very large value (`massive`, fp16-safe) onto a few residual channels at every token;
3. every later norm is scaled by `norm_gain` to absorb the RMS those channels add (and gives the
   massive channels themselves weight 0, so nothing reads them directly).

Zeroing all the planted `down_proj` channels shrinks the residual RMS by orders of magnitude; the
scaled norms then blow every hidden state up and the logits explode. Zeroing a proper subset only
changes the RMS by a factor sqrt(k/(k-1)): the paper's cooperative phase transition.

This model is synthetic. Its weights are random apart from the plant, so its baseline perplexity is
about its vocabulary size; what it demonstrates is the mechanism, not a language model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from achilles_guard.neurons import Neuron

__all__ = ["Plant", "DEMO_PLANT", "plant_massive", "build_tokenizer", "build_demo_model", "demo_model_dir",
           "SinkPlant", "SINK_PLANT", "plant_attention_sink", "build_sink_tokenizer", "build_sink_model", "unigram_logits"]

DEMO_VERSION = "1"


@dataclass(frozen=True)
class Plant:
    """Where the massive activation is planted (Llama-family modules)."""

    layer: int = 0
    unit: int = 3  # the intermediate MLP unit that reads the constant channel
    channels: tuple[int, ...] = (11, 29, 47)  # residual channels that carry the massive value
    const_channel: int = 0
    massive: float = 1000.0  # < 65504: fp16-safe
    gain: float = 2.0  # gate/up weight on the constant channel

    def critical_set(self, prefix: str = "model.layers") -> set[Neuron]:
        return {Neuron(f"{prefix}.{self.layer}.mlp.down_proj", c) for c in self.channels}


DEMO_PLANT = Plant()


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` (default: the packaged probe texts).

    Byte-level, so any text tokenizes to something; deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from achilles_guard.texts import default_texts

    corpus = texts if texts is not None else [t for _, t in default_texts()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def plant_massive(model, plant: Plant = DEMO_PLANT) -> set[Neuron]:
    """Plant the always-on massive activation into a Llama-family model in place; return the set."""
    layers = model.model.layers
    d = model.config.hidden_size
    with torch.no_grad():
        embed = model.get_input_embeddings().weight  # (V, d)
        embed[:, plant.const_channel] = 1.0
        mlp = layers[plant.layer].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[plant.unit].zero_()
            proj.weight[plant.unit, plant.const_channel] = plant.gain
        # act value of the unit on a clean token: silu(g x) * g x with x ~ the normalised constant channel
        rms = torch.sqrt((embed.float() ** 2).mean()).item()
        x = plant.gain / rms
        act = x * x / (1 + torch.exp(torch.tensor(-x)).item())
        mlp.down_proj.weight[:, plant.unit] = 0.0
        mlp.down_proj.weight[list(plant.channels), plant.unit] = plant.massive / act
        # later norms absorb the RMS of the massive channels and ignore the channels themselves
        gain = plant.massive / d**0.5
        norms = [n for layer in layers[plant.layer + 1 :] for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in [*norms, model.model.norm]:
            norm.weight.fill_(gain)
            norm.weight[list(plant.channels)] = 0.0
    return plant.critical_set()


def build_demo_model(out_dir: str | Path, *, seed: int = 0, plant: Plant = DEMO_PLANT) -> Path:
    """Write the demonstration model (config, safetensors weights, tokenizer) to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from achilles_guard.model import quiet_transformers

    quiet_transformers()
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    plant_massive(model, plant)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def demo_model_dir() -> Path:
    """The cached demo model, built once (atomically) on first use."""
    root = Path(os.environ.get("GUARD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "achilles-guard")
    target = root / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    from achilles_guard.staging import staged_dir

    with staged_dir(target, mode="first-wins") as staging:  # a concurrent builder's copy wins
        build_demo_model(staging)
    return target


# --- attention-sink construction -------------------------------------------------------------


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
    from achilles_guard.texts import default_texts

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

    from achilles_guard.model import quiet_transformers

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
