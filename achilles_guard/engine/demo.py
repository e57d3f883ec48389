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

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from achilles_guard.engine.neurons import Neuron

__all__ = ["Plant", "DEMO_PLANT", "plant_massive", "build_tokenizer", "build_demo_model", "demo_model_dir"]

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

    from achilles_guard.engine.texts import default_texts

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
        norms = [
            n for layer in layers[plant.layer + 1 :] for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        for norm in [*norms, model.model.norm]:
            norm.weight.fill_(gain)
            norm.weight[list(plant.channels)] = 0.0
    return plant.critical_set()


def build_demo_model(out_dir: str | Path, *, seed: int = 0, plant: Plant = DEMO_PLANT) -> Path:
    """Write the demonstration model (config, safetensors weights, tokenizer) to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from achilles_guard.formats.load import quiet_transformers

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
    root = Path(
        os.environ.get("GUARD_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "achilles-guard"
    )
    target = root / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    from achilles_guard.formats.staging import staged_dir

    with staged_dir(target, mode="first-wins") as staging:  # a concurrent builder's copy wins
        build_demo_model(staging)
    return target
