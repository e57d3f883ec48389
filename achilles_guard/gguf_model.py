"""Load a GGUF file as a transformers model (`from_pretrained(dir, gguf_file=name)`), safely.

A GGUF file holds tensors and metadata only: no code, no pickle, nothing that executes when read.
transformers dequantizes every tensor to float; the tokenizer is built from the file's own
vocabulary. Before transformers sees the file, `check_gguf` parses its header (`gguf_file.read_layout`)
and refuses what cannot load: a truncated file, an architecture transformers cannot build, a
quantization type guard cannot read back, a header that implies far more parameters than the file holds.

    lm = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32", device="cpu")
    lm.directory   # the .gguf path: fingerprint, verify and tamper read its blocks from there
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from achilles_guard.errors import ModelLoadError, first_line
from achilles_guard.gguf_file import SUPPORTED_TYPES, GGUFLayout, read_layout

__all__ = ["check_gguf", "load_gguf_model", "gguf_model_type"]

# GGUF architecture names that differ from transformers' model_type
_MODEL_TYPES = {
    "command-r": "cohere",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


def gguf_model_type(layout: GGUFLayout) -> str:
    return _MODEL_TYPES.get(layout.architecture, layout.architecture)


def check_gguf(path: str | Path) -> GGUFLayout:
    """The file's layout, or a GuardError (exit 2) saying why it cannot be loaded. Reads the header only."""
    from achilles_guard.model import SIZE_MARGIN, implied_parameters

    layout = read_layout(path)
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover - transformers without GGUF support
        raise ModelLoadError(f"{path}: this transformers cannot read GGUF files (upgrade transformers)") from None
    arch = layout.architecture
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        layout.close()
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers' GGUF loader "
            "(convert it to a Hugging Face safetensors directory first)"
        )
    bad = sorted({t.qtype for t in layout.tensors.values() if t.qtype not in SUPPORTED_TYPES})
    if bad:
        layout.close()
        raise ModelLoadError(
            f"{path}: quantization type(s) {', '.join(bad)} are not supported; guard reads "
            f"{', '.join(sorted(SUPPORTED_TYPES))}"
        )
    vocab = layout.metadata.get("tokenizer.ggml.tokens")
    config = {
        "hidden_size": layout.arch_value("embedding_length"),
        "num_hidden_layers": layout.arch_value("block_count"),
        "intermediate_size": layout.arch_value("feed_forward_length"),
        "vocab_size": vocab[2] if isinstance(vocab, tuple) else layout.arch_value("vocab_size"),
    }
    config = {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}
    on_disk = sum(int(torch.tensor(t.ne).prod()) for t in layout.tensors.values())
    implied = implied_parameters(config, path)
    if implied > SIZE_MARGIN * on_disk + 1_000_000:
        layout.close()
        raise ModelLoadError(
            f"{path}: its metadata implies at least {implied:,} parameters but the file holds {on_disk:,}; "
            "the header is inconsistent with the tensors (refusing to allocate it)"
        )
    return layout


@contextmanager
def _quiet_dequantize():
    """transformers' GGUF loader draws its own tqdm bar (not switched off by its logging settings):
    keep it off stderr unless stderr is a terminal, like every other progress line of guard."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_gguf_model(path: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """A LoadedModel from a GGUF file (see module docstring); `directory` is the file itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from achilles_guard.model import LoadedModel, quiet_transformers, resolve_device, resolve_dtype

    path = Path(path)
    with check_gguf(path) as layout:
        config_sha = layout.config_sha256
        model_type = gguf_model_type(layout)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    quiet_transformers()
    folder, name = str(path.parent), path.name
    try:
        with _quiet_dequantize():
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch_dtype, local_files_only=True
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except torch.cuda.OutOfMemoryError:
        raise
    except (
        OSError,
        ValueError,
        RuntimeError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        NotImplementedError,
    ) as err:
        raise ModelLoadError(f"{path}: cannot load the GGUF model: {first_line(err)}") from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the weights are plain float tensors now; lets harden save them
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=str(path),
        directory=str(path),
        architecture=architecture,
        model_type=getattr(model.config, "model_type", model_type),
        config_sha256=config_sha,
        dtype=torch_dtype,
        device=device,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
