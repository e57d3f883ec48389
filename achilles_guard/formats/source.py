"""One door per weight format: every tensor the loader loads, its raw bytes, and its values row by row.

Two sources implement it, and nothing else in guard parses a weights file's layout:

- `SafetensorsSource`: a Hugging Face directory resolved as `from_pretrained` resolves it
  (`loader_files`: `transformers_weights`, then `model.safetensors`, then the index's shards);
  every tensor of every loaded file is an entry (a name in two loaded files is an ambiguity);
- `GGUFSource`: a GGUF file; entries are its tensors in the loader's (torch) orientation.

    with open_source("path/to/model") as src:       # or "model.Q4_1.gguf"
        for e in src.entries:                        # TensorEntry(name, dtype, shape, file, offset, nbytes)
            digest = hashlib.sha256(src.raw(e)).hexdigest()   # zero-copy memoryview of the mapped file
            rows = src.rows(e, 0, 8)                 # (8, width) float64: the values the model computes with

No torch, no transformers: JSON headers, `mmap` and numpy. Every malformed header is one
`InputError` (exit 2) before any allocation sized by the file's own claims.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from achilles_guard.errors import InputError

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "PICKLE_SUFFIXES",
    "ST_ITEMSIZE",
    "TensorEntry",
    "SafetensorsSource",
    "GGUFSource",
    "open_source",
    "loader_files",
    "read_header",
    "decode",
    "width_of",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 << 20  # the safetensors library's own limit on a header

# safetensors dtype string -> bytes per element
ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what `decode` turns into values (and so what a sketch covers)


@dataclass(frozen=True)
class TensorEntry:
    """One loaded tensor: where its bytes are and what the loader makes of them."""

    name: str  # the name the loader reads (checkpoint key, or GGUF tensor name)
    dtype: str  # safetensors dtype string ("BF16"...), or the GGUF type ("Q4_1", "F32"...)
    shape: tuple[int, ...]  # in the loader's orientation (torch)
    file: str  # file name, relative to the source's root
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows of the row view: every axis but the last flattened (a 1-D tensor is one row per element)."""
        if len(self.shape) == 0:
            return 1
        if len(self.shape) == 1:
            return self.shape[0]
        return math.prod(self.shape[:-1])


def width_of(shape: tuple[int, ...]) -> int:
    """Elements per row of the row view (`TensorEntry.rows`): the last axis, 1 for 0-D and 1-D tensors."""
    return shape[-1] if len(shape) >= 2 else 1


def decode(raw, dtype: str) -> np.ndarray | None:
    """(n,) float64 values of raw little-endian bytes of a float dtype; None for another dtype."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if dtype in ("F64", "F32", "F16"):
        return np.frombuffer(raw, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float64)
    return None


class _Mapped:
    """Read-only maps of a source's files, opened on first use and closed together."""

    def __init__(self, root: Path):
        self.root = root
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, file: str, offset: int, nbytes: int) -> memoryview:
        m = self._maps.get(file)
        if m is None:
            path = self.root / file
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                m = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            if m is None:
                raise InputError(f"{path}: empty file")
            self._maps[file] = m
        if offset + nbytes > len(m):
            raise InputError(f"{self.root / file}: truncated: a tensor ends past the end of the file")
        return memoryview(m)[offset : offset + nbytes]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
        self._maps.clear()


def read_header(path: Path) -> tuple[dict, dict, int]:
    """A safetensors file's tensors {name: (dtype, shape, start, end)} (offsets relative to the data),
    its `__metadata__`, and the absolute offset of its data. InputError on anything malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a readable safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise InputError(f"{path}: not a readable safetensors file (header length {n:,} for {size:,} bytes)")
            text = handle.read(n)
    except OSError as err:
        raise InputError(f"{path}: unreadable ({err.strerror or err})") from None
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a readable safetensors file (its header is not an object)")
    data = 8 + n
    meta = doc.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in doc.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (
                dtype in ST_ITEMSIZE
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size - data
                and end - start == math.prod(shape) * ST_ITEMSIZE[dtype]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{path}: not a readable safetensors file (tensor {name!r} has a malformed entry)")
        tensors[name] = (dtype, shape, start, end)
    return tensors, meta if isinstance(meta, dict) else {}, data


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
    two loaded files and index/file disagreements are added by `SafetensorsSource`.
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
    from achilles_guard.errors import first_line

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
class SafetensorsSource:
    """A safetensors checkpoint directory as the transformers loader resolves it.

    `entries`: every tensor of every loaded file, in file order (a name held by two files appears twice);
    `weight_map`: name -> the first loaded file holding it; `copies`: name -> every loaded file holding it;
    `ambiguities`: one human line per layout ambiguity (empty for a clean checkpoint).
    """

    root: Path
    files: list[str]
    entries: list[TensorEntry]
    weight_map: dict[str, str]
    copies: dict[str, list[str]]
    ambiguities: list[str]
    kind: str = "safetensors"
    _mapped: _Mapped | None = field(default=None, repr=False)

    @staticmethod
    def open(path: str | Path) -> "SafetensorsSource":
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
        entries: list[TensorEntry] = []
        weight_map: dict[str, str] = {}
        copies: dict[str, list[str]] = {}
        for shard in files:
            tensors, _, data = read_header(root / shard)
            for name, (dtype, shape, start, end) in tensors.items():
                entries.append(TensorEntry(name, dtype, shape, shard, data + start, end - start))
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
        return SafetensorsSource(root, list(files), entries, weight_map, copies, ambiguities, _mapped=_Mapped(root))

    def raw(self, entry: TensorEntry) -> memoryview:
        return self._mapped.view(entry.file, entry.offset, entry.nbytes)

    def has_values(self, entry: TensorEntry) -> bool:
        return entry.dtype in FLOAT_DTYPES

    def rows(self, entry: TensorEntry, start: int, stop: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """(stop - start, c1 - c0) float64 values of rows [start, stop), columns [c0, c1) of the row view."""
        width, item = width_of(entry.shape), ST_ITEMSIZE[entry.dtype]
        c1 = width if c1 is None else c1
        n = stop - start
        if c0 == 0 and c1 == width:
            raw = self._mapped.view(entry.file, entry.offset + start * width * item, n * width * item)
            return decode(raw, entry.dtype).reshape(n, width)
        raw = self._mapped.view(entry.file, entry.offset + start * width * item, n * width * item)
        cells = np.frombuffer(raw, np.uint8).reshape(n, width * item)[:, c0 * item : c1 * item]
        return decode(np.ascontiguousarray(cells).reshape(-1), entry.dtype).reshape(n, c1 - c0)

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class GGUFSource:
    """A GGUF file: its tensors in torch orientation (rows of llama attn_q/attn_k as transformers permutes them)."""

    root: Path
    files: list[str]
    entries: list[TensorEntry]
    layout: object  # formats.gguf.GGUFLayout
    ambiguities: list[str] = field(default_factory=list)
    kind: str = "gguf"

    @staticmethod
    def open(path: str | Path) -> "GGUFSource":
        from achilles_guard.formats.gguf import read_layout

        layout = read_layout(path)
        p = Path(path)
        entries = [
            TensorEntry(info.name, info.qtype, info.torch_shape, p.name, info.offset, info.n_bytes)
            for info in layout.tensors.values()
        ]
        return GGUFSource(p.parent, [p.name], entries, layout)

    def raw(self, entry: TensorEntry) -> memoryview:
        return memoryview(self.layout._mapped())[entry.offset : entry.offset + entry.nbytes]

    def has_values(self, entry: TensorEntry) -> bool:
        from achilles_guard.formats.gguf import SUPPORTED_TYPES

        return entry.dtype in SUPPORTED_TYPES

    def rows(self, entry: TensorEntry, start: int, stop: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """(stop - start, c1 - c0) float64 dequantized values (gguf.quants), torch row order; c0 and c1 on block
        boundaries."""
        from achilles_guard.formats.gguf import _dequantize

        info = self.layout.tensors[entry.name]
        width = width_of(entry.shape)
        c1 = width if c1 is None else c1
        if len(entry.shape) <= 1:
            values = _dequantize(np.frombuffer(self.raw(entry), dtype=np.uint8), info).astype(np.float64)
            return values[start:stop].reshape(-1, 1)
        per_row = info.n_bytes // entry.rows
        perm = self.layout._row_perm(entry.name, entry.shape[0]) if len(entry.shape) == 2 else np.arange(entry.rows)
        b0, b1 = c0 // info.block_size * info.type_size, c1 // info.block_size * info.type_size
        buf = np.frombuffer(self.raw(entry), dtype=np.uint8).reshape(entry.rows, per_row)[perm[start:stop], b0:b1]
        values = _dequantize(np.ascontiguousarray(buf).reshape(-1), info).astype(np.float64)
        return values.reshape(stop - start, c1 - c0)

    def close(self) -> None:
        try:
            self.layout.close()
        except BufferError:  # a caller still holds a view; the map goes with it
            pass

    def __enter__(self) -> "GGUFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(path: str | Path) -> SafetensorsSource | GGUFSource:
    """The door for a model path: a GGUF file, else a safetensors checkpoint directory."""
    from achilles_guard.formats.gguf import is_gguf

    return GGUFSource.open(path) if is_gguf(path) else SafetensorsSource.open(path)
