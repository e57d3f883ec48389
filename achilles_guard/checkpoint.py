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

__all__ = ["Checkpoint", "loader_files", "resolve_key", "tensor_sha256", "find_slice"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's exact bytes (any dtype, bfloat16 included)."""
    import hashlib

    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def loader_files(root: Path) -> tuple[list[str], dict[str, str] | None, list[str]]:
    """The safetensors files `from_pretrained` reads from a local directory, exactly as transformers 5.23 does.

    Loader precedence (transformers `modeling_utils._get_resolved_checkpoint_files`, local directory,
    safetensors; guard never falls back to pickle):
      1. config.json `transformers_weights` names a file inside the directory: that file
         (a `*.safetensors.index.json` is an index, else a single safetensors file);
      2. else `model.safetensors` when it is a file: that file alone (an index next to it is ignored);
      3. else `model.safetensors.index.json`: every shard its `weight_map` lists
         (`sorted(set(weight_map.values()))`), and every tensor of each of those shards is loaded;
      4. else nothing: the loader finds no safetensors weights.
    Returns (files read, in order; the index weight_map or None; ambiguities). An ambiguity is a
    layout fact that makes "which bytes are loaded" depend on a reader's choice: an ignored index,
    a stray `*.safetensors` the loader does not read but a person might ship. Tensors present in
    two loaded files and index/file disagreements are added by `Checkpoint.open`.
    """
    ambiguities: list[str] = []
    explicit = None
    config = root / "config.json"
    if config.is_file():
        try:
            explicit = json.loads(config.read_text(encoding="utf-8")).get("transformers_weights")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            explicit = None  # reported by whoever reads the config
    index_map = None
    if isinstance(explicit, str) and explicit:
        target = (root / explicit).resolve()
        if root.resolve() not in target.parents:
            raise InputError(f"{root}: config.json transformers_weights {explicit!r} points outside the directory")
        if explicit.endswith(".safetensors.index.json"):
            index_map = _read_index(root / explicit)
            files = sorted(set(index_map.values()))
        else:
            files = [explicit]
    elif _regular(root / SINGLE_NAME):
        files = [SINGLE_NAME]
        if _regular(root / INDEX_NAME):
            ambiguities.append(f"{INDEX_NAME} is ignored by the loader because {SINGLE_NAME} exists")
    elif _regular(root / INDEX_NAME):
        index_map = _read_index(root / INDEX_NAME)
        files = sorted(set(index_map.values()))
    else:
        files = []
    for name in files:
        path = root / name
        if not path.exists():
            raise InputError(f"{root}: shard {name} is listed for loading but missing")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file (refusing to read a FIFO, device or directory)")
    read = set(files)
    for stray in sorted(p.name for p in root.glob("*.safetensors")):
        if stray not in read:
            _regular(root / stray)
            ambiguities.append(f"stray file {stray}: the loader does not read it, but it ships with the checkpoint")
    return files, index_map, ambiguities


def _regular(path: Path) -> bool:
    """True for a regular file; InputError for a FIFO, device or directory under a weights name (never block on one)."""
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a regular file (refusing to read a FIFO, device or directory)")
    return path.is_file()


def _read_index(index: Path) -> dict[str, str]:
    if not index.is_file():
        raise InputError(f"{index}: not a regular file")
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{index}: unreadable shard index ({first_line(err)})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(f"{index}: weight_map must be an object mapping tensor names to shard file names")
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard.startswith("."):
            raise InputError(f"{index}: shard name {shard!r} is not a file in the checkpoint directory")
    return dict(weight_map)


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
        root = Path(path)
        if not root.exists():
            raise InputError(f"{path}: no such directory")
        if not root.is_dir():
            raise InputError(f"{path}: is a file; give the checkpoint's directory")
        files, index_map, ambiguities = loader_files(root)
        if not files:
            pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise InputError(
                    f"{path}: only pickle weights ({', '.join(pickles)}); guard reads safetensors only "
                    "(convert the checkpoint first)"
                )
            strays = sorted(p.name for p in root.glob("*.safetensors"))
            if strays:
                raise InputError(
                    f"{path}: no {SINGLE_NAME} or {INDEX_NAME}; the loader would read none of {', '.join(strays)}"
                )
            raise InputError(f"{path}: no *.safetensors weights in the directory")
        weight_map: dict[str, str] = {}
        copies: dict[str, list[str]] = {}
        for shard in files:
            for name in _keys(root / shard):
                copies.setdefault(name, []).append(shard)
                weight_map.setdefault(name, shard)
        for name, where in copies.items():
            if len(where) > 1:
                ambiguities.append(
                    f"tensor {name} is in {len(where)} loaded files ({', '.join(where)}): which copy loads is the "
                    "loader's pick"
                )
        if index_map is not None:
            for name, shard in index_map.items():
                if name not in copies:
                    ambiguities.append(f"index lists {name} in {shard} but no loaded file holds it")
                elif shard not in copies[name]:
                    ambiguities.append(f"index lists {name} in {shard} but it is in {', '.join(copies[name])}")
            for name, where in copies.items():
                if name not in index_map:
                    ambiguities.append(f"tensor {name} in {where[0]} is not listed in the index but is loaded")
        return Checkpoint(root, weight_map, copies, ambiguities, list(files))

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


def _keys(shard: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(shard), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:
        raise InputError(f"{shard}: not a readable safetensors file ({first_line(err)})") from None


def find_slice(ckpt: "Checkpoint | dict[str, str]", record) -> str | None:
    """The one slice lookup (verify, tamper, repair): the checkpoint tensor name holding a fingerprinted
    slice: its recorded key when present, else the parameter's unique match. Accepts a weight map too."""
    weight_map = ckpt if isinstance(ckpt, dict) else ckpt.weight_map
    if record.checkpoint_key in weight_map:
        return record.checkpoint_key
    return resolve_key(weight_map, record.param)
