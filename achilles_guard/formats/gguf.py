"""Read the few quantized blocks of a GGUF file that hold a weight slice, without reading the file.

A GGUF file is a header (key/value metadata, then one info record per tensor: name, dims, type,
offset) followed by the tensor data. It holds no code. A tensor of GGUF dims `ne = [ne0, ne1]` is
stored row-major with `ne0` contiguous: torch's shape is the reverse, `(ne1, ne0)`, so a torch row
(a Linear output channel) is one contiguous GGUF row, cut in blocks of 32 or 256 elements, and a
torch column touches one block per row.

    layout = read_layout("model.Q4_1.gguf")       # header only (memory-mapped)
    name = layout.gguf_name("model.layers.11.mlp.down_proj.weight")    # "blk.11.ffn_down.weight"
    where = layout.locate(name, axis=0, index=507)  # the blocks holding that row
    raw = layout.read_blocks(where)                  # their exact bytes (uint8)
    values = dequantize_slice(where, raw)            # (k,) float32, the slice as torch sees it

`read_layout` parses the header itself: `gguf.GGUFReader` builds one numpy view per vocabulary
string (3 s on SmolLM2's 49k tokens), while a verification must take milliseconds. The values are
dequantized with `gguf.quants.dequantize`, the reference implementation.

transformers loads llama-family q/k projections with their rows permuted back from llama.cpp's
rotary layout (`LlamaTensorProcessor._reverse_permute_weights`); `locate` maps a torch row to
the GGUF row it comes from, so every slice names exactly the bytes the loader turns into it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from achilles_guard.errors import InputError

__all__ = [
    "GGUF_MAGIC",
    "is_gguf",
    "GGUFTensorInfo",
    "SliceBlocks",
    "GGUFLayout",
    "read_layout",
    "dequantize_slice",
    "quant_step",
    "SUPPORTED_TYPES",
    "SCALE_FIELDS",
    "BLOCKS_SUFFIX",
    "GGUFSliceSource",
    "gguf_records",
]

GGUF_MAGIC = b"GGUF"
_MAX_COUNT = 1 << 24  # more KV pairs, tensors or array elements than this is a malformed header

# GGUF value types -> struct format (fixed-size ones)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# Where each block type keeps its float16 scale fields (byte offsets inside one block): multiplying
# every one of them by β multiplies every dequantized value of the block by β (d·q + m, d·sc·q - dmin·m...).
SCALE_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
# Types guard verifies (dequantizes through gguf.quants) and tampers with; others are refused, exit 2.
SUPPORTED_TYPES = frozenset({*FLOAT_TYPES, "BF16", *SCALE_FIELDS})
# Levels of the block grid: the quantization step of a block is its range / (levels - 1) (asymmetric
# types) or max |x| / half (symmetric: Q8_0 d = amax/127, Q4_0 d = amax/8, Q5_0 d = amax/16).
_SYMMETRIC_HALF = {"Q8_0": 127.0, "Q4_0": 8.0, "Q5_0": 16.0, "Q6_K": 32.0, "Q3_K": 4.0}
_ASYMMETRIC_LEVELS = {"Q4_1": 15.0, "Q5_1": 31.0, "Q4_K": 15.0, "Q5_K": 31.0, "Q2_K": 3.0}


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file named *.gguf or a regular file starting with the GGUF magic."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF dims, ne[0] contiguous
    qtype: str  # "Q4_1", "F32"...
    offset: int  # absolute byte offset of the tensor data in the file
    n_bytes: int
    block_size: int  # elements per block
    type_size: int  # bytes per block

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class SliceBlocks:
    """The blocks that hold one slice: byte runs (absolute offset, length) and where the slice's elements sit."""

    tensor: GGUFTensorInfo
    runs: tuple[tuple[int, int], ...]  # (absolute offset, bytes), in slice order
    positions: np.ndarray  # (k,) index of each slice element in the dequantized concatenation of the runs
    gguf_index: int  # the GGUF row (axis 0), column (axis 1) or element (1-D) the slice is

    @property
    def n_bytes(self) -> int:
        return sum(n for _, n in self.runs)

    def relative_runs(self) -> list[list[int]]:
        return [[start - self.tensor.offset, n] for start, n in self.runs]


@dataclass
class GGUFLayout:
    """A GGUF file's header: metadata, tensor table, and what reading it cost."""

    path: Path
    version: int
    metadata: dict  # scalars and strings; arrays as ("array", element type, count)
    tensors: dict[str, GGUFTensorInfo]
    data_offset: int
    file_size: int
    header_bytes: int  # bytes parsed to reach the tensor table (the vocabulary makes most of it)
    config_sha256: str  # over the metadata except general.* (name, license...): what the loader builds from
    bytes_read: int = 0  # header + blocks read so far
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> "GGUFLayout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def arch_value(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def gguf_name(self, param: str) -> str | None:
        """The GGUF tensor name of a transformers parameter name (gguf.TensorNameMap), None when unmapped."""
        if param in self.tensors:
            return param
        name, suffix = param, ""
        if param.endswith((".weight", ".bias")):
            name, suffix = param.rsplit(".", 1)
            suffix = "." + suffix
        mapped = _name_map(self.architecture, int(self.arch_value("block_count", 0) or 0)).get_name(name)
        if mapped is None:
            return None
        return mapped + suffix

    def locate(self, name: str, axis: int, index: int) -> SliceBlocks:
        """The blocks of `tensor.select(axis, index)` in torch coordinates (after transformers' q/k permutation)."""
        info = self.tensors[name]
        shape = info.torch_shape
        if axis >= len(shape) or not 0 <= index < shape[axis]:
            raise InputError(
                f"{self.path}: {name} has shape {list(shape)}; index {index} on axis {axis} is out of range"
            )
        bs, ts = info.block_size, info.type_size
        if len(shape) == 1:
            block = index // bs
            return SliceBlocks(info, ((info.offset + block * ts, ts),), np.array([index % bs]), index)
        if len(shape) != 2:
            raise InputError(
                f"{self.path}: {name} has {len(shape)} dims; guard maps slices of 1-D and 2-D tensors only"
            )
        rows, cols = shape  # torch (ne1, ne0)
        if axis == 0:
            row = self._gguf_row(name, index, rows)
            per_row = cols // bs
            start = info.offset + row * per_row * ts
            return SliceBlocks(info, ((start, per_row * ts),), np.arange(cols), row)
        # a column: one block per row (torch row r lives in GGUF row perm[r]), the element at index % bs in each
        perm, first, per_row = self._row_perm(name, rows), index // bs, cols // bs
        runs = tuple((info.offset + (int(g) * per_row + first) * ts, ts) for g in perm)
        return SliceBlocks(info, runs, np.arange(rows) * bs + index % bs, index)

    def read_blocks(self, where: SliceBlocks) -> np.ndarray:
        """The exact bytes of the slice's blocks, concatenated (uint8); counted in `bytes_read`."""
        mapped = self._mapped()
        parts = []
        for start, n in where.runs:
            if start + n > self.file_size:
                raise InputError(f"{self.path}: truncated: {where.tensor.name} ends past the end of the file")
            parts.append(mapped[start : start + n])
            self.bytes_read += n
        return np.frombuffer(b"".join(parts), dtype=np.uint8)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _gguf_row(self, name: str, row: int, rows: int) -> int:
        return int(self._row_perm(name, rows)[row])

    def _row_perm(self, name: str, rows: int) -> np.ndarray:
        """(rows,) GGUF row of each torch row: transformers reverse-permutes llama attn_q / attn_k rows."""
        identity = np.arange(rows)
        if self.architecture != "llama" or not (".attn_q." in name or ".attn_k." in name):
            return identity
        heads = self.arch_value("attention.head_count")
        kv = self.arch_value("attention.head_count_kv", heads)
        if not heads:
            return identity
        n_head = kv if ".attn_k." in name and kv else heads
        dim = rows // n_head // 2
        return identity.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(rows)  # the op transformers applies


def dequantize_slice(where: SliceBlocks, raw: np.ndarray) -> np.ndarray:
    """(k,) float32 values of the slice (0-d for an element of a 1-D tensor) from its blocks' bytes
    (gguf.quants.dequantize)."""
    values = _dequantize(raw, where.tensor)[where.positions].astype(np.float32)
    return values.reshape(()) if len(where.tensor.ne) == 1 else values  # a 1-D tensor's slice is one element


def quant_step(where: SliceBlocks, raw: np.ndarray) -> np.ndarray:
    """(k,) the quantization step d of the block holding each slice element (0 for float types).

    Recovered from the dequantized block itself: d = range / (levels - 1) for the asymmetric types
    (Q4_1: min and max sit exactly on the grid), max |x| / half for the symmetric ones (Q8_0: amax = 127 d).
    K-quants get their super-block's coarsest step (sub-block scales are 6-bit, so a bound, not exact).
    """
    info = where.tensor
    if info.qtype in FLOAT_TYPES or info.qtype == "BF16":
        return np.zeros(len(where.positions), dtype=np.float64)
    values = _dequantize(raw, info).astype(np.float64).reshape(-1, 32)  # (blocks of 32,)
    if info.qtype in _SYMMETRIC_HALF:
        step = np.abs(values).max(1) / _SYMMETRIC_HALF[info.qtype]
    else:
        step = (values.max(1) - values.min(1)) / _ASYMMETRIC_LEVELS[info.qtype]
    return step[where.positions // 32]


def _dequantize(raw: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[info.qtype]
    if info.qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[info.qtype]).astype(np.float32)
    return np.asarray(gguf.quants.dequantize(raw.reshape(-1, info.type_size), qtype), dtype=np.float32).reshape(-1)


def read_layout(path: str | os.PathLike) -> GGUFLayout:
    """Parse a GGUF header (memory-mapped; the tensor data is not touched). InputError when malformed."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (give the .gguf file)")
    size = path.stat().st_size
    if size < 24:
        raise InputError(f"{path}: truncated GGUF ({size} bytes, shorter than its fixed header)")
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mapped, size)
    except _Truncated:
        mapped.close()
        raise InputError(f"{path}: truncated or corrupt GGUF header (it ends before its tensor table does)") from None
    except BaseException:
        mapped.close()
        raise


class _Truncated(Exception):
    pass


_STRUCTS: dict[str, struct.Struct] = {}
_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        packer = _STRUCTS.get(fmt)
        if packer is None:
            packer = _STRUCTS[fmt] = struct.Struct("<" + fmt)
        if self.pos + packer.size > self.size:
            raise _Truncated
        value = packer.unpack_from(self.buf, self.pos)[0]
        self.pos += packer.size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > self.size - self.pos:
            raise _Truncated
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings (a vocabulary array): only their u64 length prefixes are read, one
        unpack_from each over the mapped header and no Python object per string; a length past the end
        of the header is _Truncated."""
        buf, size, pos, length = self.buf, self.size, self.pos, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            pos += 8 + length(buf, pos)[0]
            if pos > size:
                raise _Truncated
        self.pos = pos


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFLayout:
    import gguf

    cur = _Cursor(buf, size)
    if buf[:4] != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise InputError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise InputError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata entries)")
    metadata: dict = {}
    digest = hashlib.sha256()
    entries: list[tuple[str, int, int]] = []
    for _ in range(n_kv):
        key = cur.string()
        start = cur.pos
        metadata[key] = _value(cur, cur.take("I"))
        entries.append((key, start, cur.pos))
    for key, start, end in sorted(entries):
        if not key.startswith("general."):
            digest.update(key.encode() + b"\0" + bytes(buf[start:end]))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"{path}: corrupt GGUF header (general.alignment={alignment!r})")
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 4:
            raise InputError(f"{path}: corrupt GGUF tensor info ({name}: {n_dims} dims)")
        ne = tuple(cur.take("Q") for _ in range(n_dims))
        raw_infos.append((name, ne, cur.take("I"), cur.take("Q")))
    header_bytes = cur.pos
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, ne, type_id, offset in raw_infos:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise InputError(f"{path}: tensor {name} has unknown GGML type id {type_id}") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        elements = int(np.prod(ne)) if ne else 1
        if ne and ne[0] % block_size:
            raise InputError(
                f"{path}: tensor {name}: row length {ne[0]} is not a multiple of its {qtype.name} block ({block_size})"
            )
        n_bytes = elements // block_size * type_size
        start = data_offset + offset
        if start + n_bytes > size:
            raise InputError(
                f"{path}: truncated GGUF: tensor {name} ends at byte {start + n_bytes:,} but the file has {size:,}"
            )
        tensors[name] = GGUFTensorInfo(name, ne, qtype.name, start, n_bytes, block_size, type_size)
    return GGUFLayout(
        path,
        version,
        metadata,
        tensors,
        data_offset,
        size,
        header_bytes,
        digest.hexdigest(),
        bytes_read=header_bytes,
        _map=buf,
    )


def _value(cur: _Cursor, vtype: int):
    if vtype in _SCALARS:
        return cur.take(_SCALARS[vtype])
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        etype, count = cur.take("I"), cur.take("Q")
        if count > _MAX_COUNT * 4:
            raise _Truncated
        if etype in _SCALARS:
            n = struct.calcsize("<" + _SCALARS[etype]) * count
            if cur.pos + n > cur.size:
                raise _Truncated
            cur.pos += n
        elif etype == _STRING:
            cur.skip_strings(count)
        elif etype == _ARRAY:
            for _ in range(count):
                _value(cur, _ARRAY)
        else:
            raise _Truncated
        return ("array", etype, count)
    raise _Truncated


_NAME_MAPS: dict = {}


def _name_map(architecture: str, blocks: int):
    import gguf

    key = (architecture, blocks)
    if key not in _NAME_MAPS:
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture), None)
        if arch is None:
            raise InputError(
                f"GGUF architecture {architecture!r} is unknown to the gguf package; guard cannot map its tensors"
            )
        _NAME_MAPS[key] = gguf.get_tensor_name_map(arch, blocks)
    return _NAME_MAPS[key]


# slices for a fingerprint ------------------------------------------------------------------------------

BLOCKS_SUFFIX = "#blocks"  # a fingerprint tensor holding the raw blocks of a GGUF slice


def _sha(raw: bytes | np.ndarray) -> str:
    return hashlib.sha256(bytes(raw)).hexdigest()


class GGUFSliceSource:
    """What `fingerprint_bytes` reads from a GGUF instead of a safetensors checkpoint.

    with GGUFSliceSource(path) as source:
        key = source.add(weight_slice, tensors, slices)   # fills both dicts, returns the slice key
        metadata["gguf"] = source.metadata_json()
    """

    def __init__(self, path: str | Path):
        self.layout = read_layout(path)
        self.records: dict[str, dict] = {}

    def __enter__(self) -> "GGUFSliceSource":
        return self

    def __exit__(self, *exc) -> None:
        self.layout.close()

    def add(self, ws, tensors: dict, slices: dict) -> str:
        name = self.layout.gguf_name(ws.param)
        if name is None or name not in self.layout.tensors:
            raise InputError(f"{self.layout.path}: parameter {ws.param} has no GGUF tensor (mapped to {name!r})")
        key = f"{name}@{ws.axis}:{ws.index}"
        if key in tensors:
            return key
        import torch  # the fingerprint's tensors are torch tensors; reading a GGUF needs none

        where = self.layout.locate(name, ws.axis, ws.index)
        raw = self.layout.read_blocks(where)
        values = np.ascontiguousarray(dequantize_slice(where, raw))
        value = torch.from_numpy(values.copy())
        info = where.tensor
        tensors[key] = value
        tensors[key + BLOCKS_SUFFIX] = torch.from_numpy(raw.copy())
        slices[key] = {
            "param": ws.param,
            "checkpoint_key": name,
            "axis": ws.axis,
            "index": ws.index,
            "null_value": ws.null_value,
            "shard": self.layout.path.name,
            "dtype": info.qtype,
            "shape": list(info.torch_shape),
            "sha256": _sha(values),  # = tensor_sha256(value): the float32 values' exact bytes
        }
        self.records[key] = {
            "tensor": name,
            "qtype": info.qtype,
            "ne": list(info.ne),
            "gguf_index": where.gguf_index,
            "runs": where.relative_runs(),
            "blocks_sha256": _sha(raw),
        }
        return key

    def metadata_json(self) -> str:
        return json.dumps(
            {
                "file": self.layout.path.name,
                "architecture": self.layout.architecture,
                "config_sha256": self.layout.config_sha256,
                "slices": self.records,
            },
            sort_keys=True,
        )


def gguf_records(fp) -> dict | None:
    """The fingerprint's GGUF metadata (None for a fingerprint of a safetensors checkpoint)."""
    raw = fp.metadata.get("gguf")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        doc["slices"]
        return doc
    except (ValueError, KeyError, TypeError):
        raise InputError(f"fingerprint {fp.path}: malformed gguf metadata") from None
