"""Read single weight slices from a safetensors checkpoint without loading the model.

    ckpt = Checkpoint.open("path/to/model")            # follows model.safetensors.index.json
    ckpt.shard_of("model.layers.0.mlp.down_proj.weight")  # "model-00001-of-00003.safetensors"
    ckpt.read_slice("model.layers.0.mlp.down_proj.weight", axis=0, index=17)  # (in_features,) tensor

Only the bytes of the requested rows are read (`safe_open(...).get_slice(name)[...]`).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from achilles_guard.errors import InputError, first_line
from achilles_guard.model import PICKLE_SUFFIXES

__all__ = ["Checkpoint", "resolve_key", "tensor_sha256"]

INDEX_NAME = "model.safetensors.index.json"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's exact bytes (any dtype, bfloat16 included)."""
    import hashlib

    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory: tensor name -> shard file, opened lazily."""

    root: Path
    weight_map: dict[str, str]  # tensor name -> shard file name (relative to root)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _handles: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def open(path: str | Path) -> "Checkpoint":
        root = Path(path)
        if not root.exists():
            raise InputError(f"{path}: no such directory")
        if not root.is_dir():
            raise InputError(f"{path}: is a file; give the checkpoint's directory")
        index = root / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise InputError(f"{index}: unreadable shard index ({err})") from None
            missing = sorted({s for s in weight_map.values() if not (root / s).is_file()})
            if missing:
                raise InputError(f"{path}: shard {missing[0]} is listed in {INDEX_NAME} but missing")
            return Checkpoint(root, dict(weight_map))
        shards = sorted(root.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise InputError(
                    f"{path}: only pickle weights ({', '.join(pickles)}); guard reads safetensors only "
                    "(convert the checkpoint first)"
                )
            raise InputError(f"{path}: no *.safetensors weights in the directory")
        weight_map = {}
        for shard in shards:
            for name in _keys(shard):
                weight_map[name] = shard.name
        return Checkpoint(root, weight_map)

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

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string ("F16", "BF16", "F32"...) from the header only."""
        sl = self._handle(name).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read_slice(self, name: str, axis: int, index: int) -> torch.Tensor:
        """`tensor.select(axis, index)` reading only those bytes."""
        sl = self._handle(name).get_slice(name)
        if axis == 0:
            return sl[index]
        if axis == 1:
            return sl[:, index]
        raise ValueError(f"axis {axis} not supported")

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        from safetensors import safe_open

        shard = self.weight_map[name]
        if shard not in self._handles:
            try:
                self._handles[shard] = self._stack.enter_context(safe_open(str(self.root / shard), framework="pt"))
            except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike
                raise InputError(f"{self.root / shard}: not a readable safetensors file ({first_line(err)})") from None
        return self._handles[shard]


def resolve_key(weight_map: dict[str, str], param: str) -> str | None:
    """The checkpoint tensor name of a model parameter name (exact, else a unique suffix match)."""
    if param in weight_map:
        return param
    tail = param.split(".", 1)[1] if "." in param else param
    matches = [k for k in weight_map if k.endswith("." + tail) or k == tail or param.endswith("." + k)]
    return matches[0] if len(matches) == 1 else None


def _keys(shard: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(shard), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{shard}: not a readable safetensors file ({first_line(err)})") from None
