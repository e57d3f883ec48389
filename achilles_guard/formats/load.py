"""Safe model loading, the one loader entry: a local Hugging Face directory or a GGUF file -> model +
tokenizer, no code executed.

Every check that can refuse a model runs on the files, before transformers sees them:
custom code (`auto_map`) is refused unless the caller opts in (`trust_remote_code`); pickle weights
(`pytorch_model.bin`, `*.pt`) are refused unless `allow_pickle=True`.

    lm = load_model("path/to/model", dtype="auto", device="auto")
    lm.model, lm.tokenizer, lm.dtype, lm.device

A GGUF file (`load_model("model.Q4_1.gguf")`) holds tensors and metadata only: no code, no pickle.
transformers dequantizes every tensor to float (`from_pretrained(dir, gguf_file=name)`); the tokenizer
is built from the file's own vocabulary. Before transformers sees the file, `check_gguf` parses its
header (`formats.gguf.read_layout`) and refuses what cannot load: a truncated file, an architecture
transformers cannot build, a quantization type guard cannot read back, a header that implies far more
parameters than the file holds. `lm.directory` is then the .gguf path.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from achilles_guard.errors import InputError, ModelLoadError, UnsafeModelError, UsageError, first_line
from achilles_guard.formats.gguf import SUPPORTED_TYPES, GGUFLayout, is_gguf, read_layout
from achilles_guard.formats.source import PICKLE_SUFFIXES

__all__ = [
    "LoadedModel",
    "load_model",
    "check_model_dir",
    "config_sha256",
    "resolve_device",
    "resolve_dtype",
    "DTYPES",
    "PICKLE_SUFFIXES",
    "quiet_transformers",
    "check_gguf",
    "gguf_model_type",
    "check_model_path",
    "check_model_header",
]

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}
# Keys of config.json that change when a checkpoint is merely re-saved (dtype, tool version).
_VOLATILE_CONFIG_KEYS = {"torch_dtype", "dtype", "transformers_version", "_name_or_path", "_commit_hash"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded causal LM and what a report says about it."""

    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any
    path: str  # as the user gave it
    directory: str  # the local directory the weights were read from
    architecture: str
    model_type: str
    config_sha256: str
    dtype: torch.dtype
    device: str
    num_parameters: int

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def config_sha256(model_dir: str | Path) -> str:
    """sha256 of config.json in canonical form, ignoring keys a plain re-save changes (dtype...)."""
    config = _read_config(Path(model_dir))
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(stable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UsageError(f"--dtype {dtype!r}: use auto, float16, bfloat16, float32 or float64") from None


def check_model_dir(path: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Refuse what must not be loaded; return the parsed config. Reads files only, imports nothing."""
    model_dir = Path(path)
    if not model_dir.exists():
        raise InputError(f"{path}: no such directory")
    if not model_dir.is_dir():
        raise InputError(f"{path}: is a file; give the model's directory (the one holding config.json)")
    config = _read_config(model_dir)
    if "auto_map" in config and not trust_remote_code:
        raise UnsafeModelError(
            path,
            "its config.json needs custom code (auto_map); pass --trust-remote-code only if you trust its author",
        )
    model_type = config.get("model_type")
    from transformers import CONFIG_MAPPING

    if not model_type or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{path}: unknown architecture model_type={model_type!r}; this transformers version does not know it"
            + ("" if trust_remote_code else " (custom architectures need --trust-remote-code)")
        )
    has_safetensors = any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").exists()
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors:
        if pickles and not allow_pickle:
            raise UnsafeModelError(
                path,
                f"it has only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the file",
            )
        if not pickles:
            raise ModelLoadError(f"{path}: no weights (*.safetensors) in the directory")
    return config


# config keys whose values size the model: (key, fallback keys)
_SIZE_KEYS = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
}
SIZE_MARGIN = 2.0  # refuse when the config implies more than this many times the elements on disk


def _size_value(config: dict, kind: str, path) -> int | None:
    for key in _SIZE_KEYS[kind]:
        if key in config and config[key] is not None:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"{path}/config.json: {key} must be a positive integer (got {value!r})")
            return value
    return None


def implied_parameters(config: dict, path="config.json") -> int:
    """A lower bound on the parameter count a config implies, from its sizes alone (nothing built).

    Every decoder layer has at least an attention output projection (h×h) and an MLP in and out
    projection (2·h·ffn); the model has at least the token embedding (vocab×h). Wrong types are an
    input error (exit 2), never an exception deep in transformers.
    """
    hidden = _size_value(config, "hidden", path) or 0
    layers = _size_value(config, "layers", path) or 0
    ffn = _size_value(config, "ffn", path) or 4 * hidden
    vocab = _size_value(config, "vocab", path) or 0
    return layers * (hidden * hidden + 2 * hidden * ffn) + vocab * hidden


def weights_on_disk(model_dir: Path) -> int | None:
    """Total tensor elements in the safetensors files the loader reads (headers only); for pickle
    weights an upper bound (1 element per byte); None when there are no weights."""
    from achilles_guard.formats.checkpoint import Checkpoint

    try:
        with Checkpoint.open(model_dir) as ckpt:
            total = 0
            for name in ckpt.weight_map:
                shape, _ = ckpt.shape_dtype(name)
                n = 1
                for d in shape:
                    n *= d
                total += n
            return total
    except InputError:
        pickles = [p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()]
        return sum(p.stat().st_size for p in pickles) if pickles else None


def check_config_size(model_dir: str | Path, config: dict) -> None:
    """Refuse (exit 2) a config that implies far more parameters than the weights on disk hold
    (`num_hidden_layers: 1e9`...): building it would allocate without bound before any error."""
    model_dir = Path(model_dir)
    implied = implied_parameters(config, model_dir)
    on_disk = weights_on_disk(model_dir)
    if on_disk is not None and implied > SIZE_MARGIN * on_disk + 1_000_000:
        raise ModelLoadError(
            f"{model_dir}: config.json implies at least {implied:,} parameters but the weights on disk hold "
            f"{on_disk:,}; the config is inconsistent with the checkpoint (refusing to allocate it)"
        )


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM safely (see module docstring); errors are GuardErrors with one clear line."""
    if is_gguf(path):  # a .gguf file: tensors and metadata only, dequantized by transformers (load_gguf_model)
        return load_gguf_model(path, dtype=dtype, device=device)
    model_dir = _local_dir(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    config = check_model_dir(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    check_config_size(model_dir, config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "local_files_only": True,
        _dtype_kwarg(transformers.__version__): torch_dtype,
    }
    has_safetensors = any(Path(model_dir).glob("*.safetensors"))
    if has_safetensors or not allow_pickle:
        kwargs["use_safetensors"] = True
    multi_gpu = device == "cuda" and torch.cuda.device_count() > 1
    if multi_gpu:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelLoadError(
                f"{path}: model_type {config.get('model_type')!r} has no causal language-model head; "
                "guard scans decoder language models"
            ) from None
        raise ModelLoadError(f"{path}: cannot load the model: {first_line(err)}") from None
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, RuntimeError, KeyError, TypeError, AttributeError, IndexError, OverflowError, EOFError,
            pickle.UnpicklingError) as err:
        raise ModelLoadError(f"{path}: cannot load the model: {first_line(err)}") from None
    except Exception as err:  # safetensors' SafetensorError (truncated file, bad header) and kin
        if type(err).__name__ not in ("SafetensorError", "HeaderTooLarge", "UnpicklingError"):
            raise
        raise ModelLoadError(f"{path}: cannot load the model: {first_line(err)}") from None
    if not multi_gpu:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        detail = " ".join(str(err).split())  # transformers' message spans lines; keep all of it on one
        if len(detail) > 400:
            detail = detail[:400] + "…"
        raise ModelLoadError(
            f"{path}: cannot load its tokenizer (no usable tokenizer.json, tokenizer.model or vocab files): {detail}"
        ) from None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=str(path),
        directory=str(model_dir),
        architecture=(config.get("architectures") or [type(model).__name__])[0],
        model_type=config["model_type"],
        config_sha256=config_sha256(model_dir),
        dtype=torch_dtype,
        device=device,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )


def _local_dir(path: str | Path, *, trust_remote_code: bool, allow_pickle: bool) -> Path:
    """A local directory as is; a hub id (`org/name`) is fetched without code or pickle files."""
    local = Path(path)
    if local.exists() or not _HUB_ID.match(str(path)):
        return local
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    patterns += ["*.py"] if trust_remote_code else []
    patterns += ["*.bin"] if allow_pickle else []
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as err:  # any hub failure is the same input error to the user
        raise InputError(f"{path}: no such directory, and fetching it from the hub failed: {first_line(err)}") from None


def _read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; this is not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path}: unreadable config: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path}: config is not a JSON object")
    return config


def _dtype_kwarg(version: str) -> str:
    """transformers 5 (and 4.56+) take `dtype=`; older versions `torch_dtype=`."""
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"



def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


# GGUF files ------------------------------------------------------------------------------------------

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


@contextmanager
def _parse_once():
    """One parse of the GGUF file per load, not three, and one tensor-name map, not one per tensor.

    transformers' GGUF path builds a new `gguf.GGUFReader` (a Python walk over every metadata field:
    3.9 s for SmolLM2's 49 k-token vocabulary) for the config, again for the weights and again for the
    tokenizer, and calls `gguf.get_tensor_name_map(arch, n)` (14 ms) once per tensor. Both are pure
    functions of their arguments and read-only afterwards, so within one load they are built once and
    handed out again: the same objects, the same model (tests/test_gguf.py checks it). Both names are
    imported from `gguf` inside transformers' functions, so replacing the module attributes for the
    length of the load is what they see; they are put back after it.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def one_reader(path, mode="r", *args, **kwargs):
        if args or kwargs or mode != "r":
            return reader(path, mode, *args, **kwargs)
        key = str(path)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    def one_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = one_reader, one_map
    try:
        yield readers
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_gguf_model(path: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """A LoadedModel from a GGUF file (see module docstring); `directory` is the file itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    with check_gguf(path) as layout:
        config_sha = layout.config_sha256
        model_type = gguf_model_type(layout)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    quiet_transformers()
    folder, name = str(path.parent), path.name
    try:
        with _quiet_dequantize(), _parse_once():
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


def check_model_path(path: str | Path) -> bool:
    """InputError unless `path` exists as its format expects (a .gguf file, or a checkpoint directory);
    returns whether it is a GGUF file."""
    path = Path(path)
    gguf = is_gguf(path)
    if gguf and not path.is_file():
        raise InputError(f"{path}: no such file")
    if not gguf and not path.is_dir():
        raise InputError(f"{path}: no such directory")
    return gguf


def check_model_header(path: str | Path) -> None:
    """The header checks a load would run first (GGUF: truncated file, unsupported type...); a directory's
    files are checked when it loads."""
    if is_gguf(path):
        check_gguf(path).close()
