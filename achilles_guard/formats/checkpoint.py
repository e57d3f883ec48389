"""Read single weight slices from a safetensors checkpoint without loading the model.

    ckpt = Checkpoint.open("path/to/model")            # follows model.safetensors.index.json
    ckpt.shard_of("model.layers.0.mlp.down_proj.weight")  # "model-00001-of-00003.safetensors"
    ckpt.read_slice("model.layers.0.mlp.down_proj.weight", axis=0, index=17)  # (in_features,) tensor

Only the bytes of the requested rows are read (`safe_open(...).get_slice(name)[...]`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from achilles_guard.errors import InputError, first_line
from achilles_guard.formats.source import SafetensorsSource, loader_files

__all__ = ["Checkpoint", "loader_files", "resolve_key", "tensor_sha256", "find_slice", "check_readable_weights"]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's exact bytes (any dtype, bfloat16 included)."""
    import hashlib

    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory, resolved as the transformers loader resolves it (`loader_files`).

    `weight_map`: tensor name -> the file it is read from (the first loaded file holding it);
    `copies`: tensor name -> every loaded file holding it (more than one is an ambiguity);
    `ambiguities`: one human line per layout ambiguity (empty for a clean checkpoint).
    """

    root: Path
    weight_map: dict[str, str]  # tensor name -> shard file name (relative to root)
    copies: dict[str, list[str]] = field(default_factory=dict)
    ambiguities: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _handles: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def open(path: str | Path) -> "Checkpoint":
        # one resolution of the loader's files and their ambiguities, shared with the tensor check
        with SafetensorsSource.open(path) as src:
            return Checkpoint(Path(path), dict(src.weight_map), {k: list(v) for k, v in src.copies.items()},
                              list(src.ambiguities), list(src.files))

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def opened_shards(self) -> tuple[str, ...]:
        """Shard files actually opened so far (a verification opens only the ones it needs)."""
        return tuple(sorted(self._handles))

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]

    def shape_dtype(self, name: str, shard: str | None = None) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string ("F16", "BF16", "F32"...) from the header only."""
        sl = self._handle(name, shard).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read_slice(self, name: str, axis: int, index: int, shard: str | None = None) -> torch.Tensor:
        """`tensor.select(axis, index)` reading only those bytes (from `shard`, default the first copy)."""
        sl = self._handle(name, shard).get_slice(name)
        shape = sl.get_shape()
        if axis >= len(shape) or not 0 <= index < shape[axis]:
            raise InputError(
                f"{self.root}: {name} has shape {list(shape)}; index {index} on axis {axis} is out of range"
            )
        if axis == 0:
            return sl[index]
        if axis == 1:
            return sl[:, index]
        raise ValueError(f"axis {axis} not supported")

    def read(self, name: str, shard: str | None = None) -> torch.Tensor:
        return self._handle(name, shard).get_tensor(name)

    def _handle(self, name: str, shard: str | None = None):
        from safetensors import safe_open

        shard = shard or self.weight_map[name]
        if shard not in self._handles:
            try:
                self._handles[shard] = self._stack.enter_context(safe_open(str(self.root / shard), framework="pt"))
            except Exception as err:  # SafetensorError and OSError alike
                raise InputError(f"{self.root / shard}: not a readable safetensors file ({first_line(err)})") from None
        return self._handles[shard]


def resolve_key(weight_map: dict[str, str], param: str) -> str | None:
    """The checkpoint tensor name of a model parameter name (exact, else a unique suffix match)."""
    if param in weight_map:
        return param
    tail = param.split(".", 1)[1] if "." in param else param
    matches = [k for k in weight_map if k.endswith("." + tail) or k == tail or param.endswith("." + k)]
    return matches[0] if len(matches) == 1 else None


def find_slice(ckpt: "Checkpoint | dict[str, str]", record) -> str | None:
    """The one slice lookup (verify, tamper, repair): the checkpoint tensor name holding a fingerprinted
    slice: its recorded key when present, else the parameter's unique match. Accepts a weight map too."""
    weight_map = ckpt if isinstance(ckpt, dict) else ckpt.weight_map
    if record.checkpoint_key in weight_map:
        return record.checkpoint_key
    return resolve_key(weight_map, record.param)


def check_readable_weights(path: str | Path) -> None:
    """InputError unless the weights a scan fingerprints can be read: a GGUF file's blocks (its header
    was checked when it loaded), or a safetensors checkpoint the loader resolves (pickle-only cannot be)."""
    from achilles_guard.formats.gguf import is_gguf

    if is_gguf(path):
        return
    Checkpoint.open(path).close()
