"""Fingerprint and verify the critical weight slices of a GGUF file, reading only their blocks.

A fingerprint taken from a GGUF (`guard scan model.gguf`) names each slice by its GGUF tensor
(`blk.11.ffn_down.weight@0:507`), records the tensor's quantization type (`dtype`, e.g. "Q4_1"), and
stores two tensors per slice: the dequantized values (float32, `sha256` is theirs: what the model
computes with) and `KEY#blocks`, the raw bytes of exactly the blocks that hold the slice. Metadata
`gguf` (JSON) holds, per slice, the tensor name, type, GGUF dims, the byte runs (relative to the
tensor's start) and the sha256 of the raw blocks.

    fp = load_fingerprint("guard-out/fingerprint.safetensors")
    report = verify_slices("model.Q4_1.gguf", fp)        # integrity.verify: a VerifyResult (+ bytes_read)

Verification: raw blocks identical to the fingerprinted ones -> `intact`. Otherwise the dequantized
values are classified (`classify_quantized`). A fingerprint taken from the float safetensors release
verifies a GGUF quantization of it: values within the type's quantization error of the float
original are `equivalent` (docs/gguf.md gives the bound per type and its measured false-positive rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from achilles_guard.errors import InputError
from achilles_guard.formats.gguf import (
    GGUFLayout,
    SliceBlocks,
    _sha,
    dequantize_slice,
    gguf_records,
    quant_step,
    read_layout,
)
from achilles_guard.integrity.slices import ConfigCheck, SliceStatus, SliceVerdict

__all__ = [
    "GGUFConfigCheck",
    "GGUFJudge",
    "GGUFSlice",
    "classify_quantized",
    "find_gguf_slice",
    "judge_gguf_slice",
    "ELEMENT_BOUND",
    "MSE_BOUND",
    "MIN_SCALE_CHANGE",
]

ELEMENT_BOUND = 1.0  # cross-format: |q(x) - x| <= ELEMENT_BOUND · d (RTN gives d/2; Q4_0's clipped top gives d)
MSE_BOUND = 2.0  # cross-format: mean (q(x) - x)^2 <= MSE_BOUND · mean(d^2) / 12 (uniform rounding noise)
MIN_SCALE_CHANGE = 0.02  # cross-format: a least-squares factor this far from 1 (and 6 standard errors) is `scaled`
_FP16_REL = 2.0**-10  # a block's float16 scales round to this relative precision


@dataclass(frozen=True)
class GGUFConfigCheck(ConfigCheck):
    """Same-format: the GGUF metadata digest vs the fingerprinted one. A safetensors fingerprint's
    config.json digest cannot be compared with GGUF metadata: `comparable` is False and it matches."""

    comparable: bool = True

    @property
    def matches(self) -> bool:
        return not self.comparable or self.expected_sha256 == self.actual_sha256


@dataclass(frozen=True)
class GGUFSlice:
    """One fingerprinted slice found in a GGUF file."""

    name: str
    where: SliceBlocks
    raw: np.ndarray  # (bytes,) uint8
    values: np.ndarray  # (k,) float32


def find_gguf_slice(layout: GGUFLayout, record) -> str | None:
    """The GGUF tensor holding a fingerprinted slice: its recorded name, else the parameter's mapped name."""
    if record.checkpoint_key in layout.tensors:
        return record.checkpoint_key
    name = layout.gguf_name(record.param)
    return name if name in layout.tensors else None


def judge_gguf_slice(
    layout: GGUFLayout, fp, key: str, neurons=(), gguf_meta: dict | None = None
) -> tuple[SliceVerdict, GGUFSlice | None]:
    """The verdict on one fingerprinted slice (and what was read), shared by verify, tamper and repair."""
    record = fp.slices[key]
    base = dict(
        key=key, param=record.param, neurons=tuple(neurons), expected_dtype=record.dtype, expected_shape=record.shape
    )
    name = find_gguf_slice(layout, record)
    if name is None:
        return SliceVerdict(
            **base,
            checkpoint_key=None,
            shard=record.shard,
            status=SliceStatus.missing,
            actual_dtype=None,
            actual_shape=None,
        ), None
    info = layout.tensors[name]
    common = dict(
        base, checkpoint_key=name, shard=layout.path.name, actual_dtype=info.qtype, actual_shape=info.torch_shape
    )
    if info.torch_shape != tuple(record.shape):
        return SliceVerdict(**common, status=SliceStatus.shape_mismatch), None
    where = layout.locate(name, record.axis, record.index)
    raw = layout.read_blocks(where)
    values = dequantize_slice(where, raw)
    found = GGUFSlice(name, where, raw, values)
    mine = (gguf_meta or {}).get("slices", {}).get(key)
    same_format = mine is not None and mine.get("qtype") == info.qtype
    if same_format and mine.get("blocks_sha256") == _sha(raw):
        return SliceVerdict(**common, status=SliceStatus.intact, factor=1.0, rel_l2=0.0, max_abs_diff=0.0), found
    reference = fp.tensors[key]
    step = None if same_format else quant_step(where, raw)
    status, factor, rel_l2, max_abs = classify_quantized(
        reference, torch.from_numpy(np.asarray(values).copy()), record.null_value, step=step
    )
    return SliceVerdict(**common, status=status, factor=factor, rel_l2=rel_l2, max_abs_diff=max_abs), found


def classify_quantized(
    reference: torch.Tensor, current: torch.Tensor, null_value: float, *, step: np.ndarray | None
) -> tuple[SliceStatus, float | None, float, float]:
    """Status, factor, relative L2 change and max |diff| of dequantized `current` vs `reference`.

    `step` None: both sides are dequantized from the same quantization type (a GGUF fingerprint);
    only the blocks' float16 scales may round (relative 2^-10), so equal values are `equivalent`
    and `factor × reference` within that rounding is `scaled` / `sign-flipped`.
    `step` (k,): the quantization step d of each element's block in `current`, and `reference` is a
    float original (a safetensors fingerprint): `equivalent` when every |cur - ref| <= ELEMENT_BOUND·d
    (+ float16 rounding) and the mean square error is <= MSE_BOUND × the uniform-rounding d^2/12.
    """
    ref = reference.double().reshape(-1).numpy()  # (k,)
    cur = current.double().reshape(-1).numpy()  # (k,)
    diff = cur - ref
    ref_norm = float(np.linalg.norm(ref))
    rel_l2 = float(np.linalg.norm(diff)) / ref_norm if ref_norm > 0 else (0.0 if not diff.any() else math.inf)
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    if not np.isfinite(cur).all():
        return SliceStatus.perturbed, None, math.inf, math.inf
    if np.array_equal(ref, cur):
        return SliceStatus.equivalent, 1.0, 0.0, 0.0
    if (cur == null_value).all():
        return SliceStatus.zeroed, 0.0 if null_value == 0 else None, rel_l2, max_abs
    if step is None:  # same quantization type on both sides
        tol = _FP16_REL
        bound = tol * (np.abs(ref) + np.abs(cur)) + 1e-30
    else:
        d = np.asarray(step, dtype=np.float64).reshape(-1)
        bound = ELEMENT_BOUND * d + _FP16_REL * (np.abs(ref) + np.abs(cur)) + np.finfo(np.float32).tiny
    if ref_norm > 0:
        factor = float(cur @ ref) / float(ref @ ref)  # least squares cur ≈ factor · ref
        residual = cur - factor * ref
        if step is None:
            # d and m (or dmin) round separately: the error scales with the block's magnitude, not the element's
            fits = bool(
                (np.abs(residual) <= 4 * tol * (np.abs(cur).max() + abs(factor) * np.abs(ref).max()) + 1e-30).all()
            )
            changed = abs(factor - 1.0) > 4 * tol
        else:  # the factor's standard error from the residual (rounding noise is independent of ref)
            se = float(np.linalg.norm(residual)) / (math.sqrt(max(cur.size, 1)) * ref_norm)
            fits = bool((np.abs(residual) <= abs(factor) * bound + _FP16_REL * np.abs(cur)).all())
            changed = abs(factor - 1.0) > max(MIN_SCALE_CHANGE, 6 * se)
        if fits and changed:
            flipped = abs(factor + 1.0) <= (4 * tol if step is None else MIN_SCALE_CHANGE)
            return (SliceStatus.sign_flipped if flipped else SliceStatus.scaled), factor, rel_l2, max_abs
        if step is not None and changed and abs(factor - 1.0) > MIN_SCALE_CHANGE:
            return SliceStatus.perturbed, None, rel_l2, max_abs
    within = bool((np.abs(diff) <= bound).all())
    if within and step is not None and np.any(step):  # float types (step 0): the element bound alone
        d = np.asarray(step, dtype=np.float64).reshape(-1)
        expected = float((d * d).mean()) / 12.0
        within = float((diff * diff).mean()) <= MSE_BOUND * expected + 1e-30
    if within:
        return SliceStatus.equivalent, 1.0, rel_l2, max_abs
    return SliceStatus.perturbed, None, rel_l2, max_abs


class GGUFJudge:
    """The GGUF side of `verify.verify_slices`: the metadata digest and each fingerprinted slice of a GGUF
    file, reading its header and those blocks only. InputError (exit 2): unreadable or truncated file,
    another architecture, or a fingerprint of another model (no tensor of the fingerprinted shape)."""

    def __init__(self, path: str | Path, fingerprint):
        self.path, self.fingerprint = Path(path), fingerprint

    def __enter__(self) -> "GGUFJudge":
        from achilles_guard.formats.load import gguf_model_type

        fp = self.fingerprint
        self.meta = gguf_records(fp)
        self._layout = layout = read_layout(self.path)
        try:
            model_type = gguf_model_type(layout)
            if model_type != fp.model_type:
                raise InputError(
                    f"fingerprint {fp.path} was taken from a {fp.architecture} ({fp.model_type}) but {self.path} is "
                    f"a GGUF {layout.architecture} model: architecture differs; use this model's own fingerprint"
                )
        except BaseException:
            layout.close()
            raise
        expected = self.meta.get("config_sha256", "") if self.meta is not None else fp.config_sha256
        self.config = GGUFConfigCheck(expected, layout.config_sha256, fp.architecture, fp.architecture,
                                      comparable=self.meta is not None)
        return self

    def __exit__(self, *exc) -> None:
        self._layout.close()

    def judge(self, key: str, neurons) -> SliceVerdict:
        return judge_gguf_slice(self._layout, self.fingerprint, key, neurons, self.meta)[0]

    def finish(self, verdicts: list[SliceVerdict]) -> list[SliceVerdict]:
        """No norm gains to add (a GGUF fingerprint stores none); refuse a fingerprint of another model."""
        if verdicts and all(v.status in (SliceStatus.missing, SliceStatus.shape_mismatch) for v in verdicts):
            raise InputError(
                f"fingerprint {self.fingerprint.path} is of another model: none of its {len(verdicts)} slices has "
                f"a tensor of the fingerprinted shape in {self.path}; use this model's own fingerprint"
            )
        return []

    def where(self) -> dict:
        layout = self._layout
        return dict(shards_read=(self.path.name,), loaded_files=(self.path.name,), bytes_read=layout.bytes_read,
                    header_bytes=layout.header_bytes, file_size=layout.file_size)
