"""The slice verdicts of `guard verify-checkpoint`: a checkpoint's critical weight slices vs a fingerprint.

Only the fingerprinted slices are read (`safe_open(...).get_slice(name)[row]`, following
`model.safetensors.index.json`), so a check costs milliseconds whatever the checkpoint size. The
model itself is loaded only for the optional functional check.

    fp = load_fingerprint("guard-out/fingerprint.safetensors", verify_key=None)
    report = verify_slices("path/to/checkpoint", fp)               # integrity.verify; a VerifyResult
    report.ok, report.counts, report.tampered_slices[0].status       # False, {...}, "zeroed"
    report = verify_slices(path, fp, functional=FunctionalParams(max_delta_log10=0.05))

This module holds the verdicts, the float classification and `CheckpointJudge` (the safetensors
side); `gguf_slices.GGUFJudge` is the GGUF side, and `verify.verify_slices` the one loop over both.

Every slice gets exactly one status (`SliceStatus`), decided in this order:
`missing` (the tensor is gone), `shape-mismatch` (the whole tensor's shape changed), `intact`
(same dtype, same bytes), `equivalent` (same values: a dtype change within the coarser dtype's
rounding, or equal values with different bytes such as -0.0), `zeroed` (every element equals the
slice's null value), `sign-flipped` / `scaled` (the slice is `factor × reference` up to rounding),
else `perturbed` with the relative L2 change ||new - ref|| / ||ref||.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from achilles_guard.errors import InputError, UsageError
from achilles_guard.formats.checkpoint import Checkpoint, find_slice, resolve_key, tensor_sha256
from achilles_guard.integrity.fingerprint import NORM_PREFIX, Fingerprint, NeuronRecord, SliceRecord

__all__ = [
    "SliceStatus",
    "SliceVerdict",
    "ConfigCheck",
    "FunctionalParams",
    "FunctionalCheck",
    "VerifyResult",
    "classify",
    "CheckpointJudge",
    "check_config",
    "functional_check",
    "OK_STATUSES",
    "judge_slice",
]


class SliceStatus(str, Enum):
    intact = "intact"
    equivalent = "equivalent"
    zeroed = "zeroed"
    scaled = "scaled"
    sign_flipped = "sign-flipped"
    perturbed = "perturbed"
    missing = "missing"
    shape_mismatch = "shape-mismatch"


OK_STATUSES = frozenset({SliceStatus.intact, SliceStatus.equivalent})

# safetensors dtype strings -> torch dtypes (what `get_slice(...).get_dtype()` returns)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class SliceVerdict:
    """What happened to one fingerprinted slice, and which neurons it produces."""

    key: str  # fingerprint tensor name, e.g. model.layers.0.mlp.down_proj.weight@0:11
    param: str
    checkpoint_key: str | None  # tensor name found in the checkpoint (None when missing)
    shard: str  # shard file holding it now (the fingerprinted shard when missing)
    status: SliceStatus
    neurons: tuple[NeuronRecord, ...]
    expected_dtype: str
    actual_dtype: str | None
    expected_shape: tuple[int, ...]
    actual_shape: tuple[int, ...] | None
    factor: float | None = None  # scaled / sign-flipped: new = factor × reference
    rel_l2: float | None = None  # ||new - ref|| / ||ref|| (inf when the reference is all zeros)
    max_abs_diff: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    @property
    def critical(self) -> bool:
        return any(n.critical for n in self.neurons)

    def describe(self) -> str:
        """One human line: what changed and how much."""
        s = self.status
        if s is SliceStatus.scaled:
            return f"scaled by {self.factor:.4g}"
        if s is SliceStatus.perturbed:
            return f"perturbed (relative L2 change {_fmt(self.rel_l2)})"
        if s is SliceStatus.missing:
            return f"missing: {self.param} is not in the checkpoint"
        if s is SliceStatus.shape_mismatch:
            return f"shape {list(self.actual_shape or ())} != fingerprinted {list(self.expected_shape)}"
        if s is SliceStatus.equivalent:
            return (
                f"equivalent ({self.expected_dtype} -> {self.actual_dtype})"
                if self.expected_dtype != self.actual_dtype
                else "equivalent (same values)"
            )
        return s.value


@dataclass(frozen=True)
class ConfigCheck:
    expected_sha256: str
    actual_sha256: str
    expected_architecture: str
    actual_architecture: str

    @property
    def matches(self) -> bool:
        return self.expected_sha256 == self.actual_sha256


@dataclass(frozen=True)
class FunctionalParams:
    max_delta_log10: float = 0.05  # fail when the probe loss rises by >= this many orders of magnitude of PPL
    dtype: str = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class FunctionalCheck:
    """The model loaded: probe loss vs the fingerprint's baseline, and the critical set re-masked."""

    baseline_loss: float  # nats, from the fingerprint
    loss: float  # nats, this checkpoint, first probe text
    delta_log10: float  # (loss - baseline) / ln 10
    max_delta_log10: float  # FunctionalParams.max_delta_log10
    masked_loss: float | None  # critical set masked (None when the fingerprint has no set)
    masked_delta_log10: float | None  # vs this checkpoint's own clean loss
    epsilon: float  # the scan's collapse threshold
    load_s: float

    @property
    def loss_ok(self) -> bool:
        return math.isfinite(self.delta_log10) and self.delta_log10 < self.max_delta_log10

    @property
    def still_critical(self) -> bool | None:
        return None if self.masked_delta_log10 is None else self.masked_delta_log10 >= self.epsilon

    @property
    def ok(self) -> bool:
        return self.loss_ok and self.still_critical is not False


@dataclass(frozen=True)
class VerifyResult:
    checkpoint: str
    fingerprint: str
    signature: str  # "verified" | "not checked" | "unsigned"
    config: ConfigCheck
    slices: tuple[SliceVerdict, ...]
    neurons: tuple[NeuronRecord, ...]
    functional: FunctionalCheck | None
    verify_s: float
    shards_read: tuple[str, ...] = field(default=())
    functional_skipped: str | None = None  # why --functional did not run, when it did not
    ambiguities: tuple[str, ...] = field(default=())  # layout ambiguities (Checkpoint.ambiguities): a finding
    loaded_files: tuple[str, ...] = field(default=())  # the files the transformers loader reads
    mode: str = "quick"  # "full": every loaded tensor against the fingerprint's tensor records; "quick": slices only
    tensor_check: "object | None" = None  # integrity.records.TensorCheck (full mode, records present)
    not_checked: str | None = None  # what the verdict does not cover, in words (quick mode, or no tensor records)
    bytes_read: int | None = None  # a GGUF: header + the blocks read (None: a safetensors checkpoint)
    header_bytes: int | None = None
    file_size: int | None = None
    file_check: "object | None" = None  # integrity.files.FileCheck: tokenizer, template... (None: a GGUF)

    @property
    def file_findings(self) -> tuple:
        return () if self.file_check is None else self.file_check.findings

    @property
    def tensor_findings(self) -> tuple:
        return () if self.tensor_check is None else self.tensor_check.findings

    @property
    def incomplete(self) -> bool:
        """Full mode asked for, but the fingerprint has no tensor records: the rest of the model went unchecked."""
        return self.mode == "full" and self.tensor_check is None

    @property
    def tampered_slices(self) -> tuple[SliceVerdict, ...]:
        return tuple(v for v in self.slices if not v.ok)

    @property
    def tampered_neurons(self) -> tuple[NeuronRecord, ...]:
        """Fingerprinted neurons with at least one changed producing slice, in fingerprint order."""
        hit = {v.key for v in self.tampered_slices}
        return tuple(n for n in self.neurons if hit.intersection(n.slices))

    @property
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in SliceStatus}
        for v in self.slices:
            out[v.status.value] += 1
        return out

    @property
    def ok(self) -> bool:
        return self.verdict == "intact"

    @property
    def verdict(self) -> str:
        """tampered (a slice, a tensor, a loader file, the config or the behaviour changed), ambiguous (layout only),
        incomplete (no tensor records to check the rest of the model against), or intact."""
        functional_ok = self.functional is None or self.functional.ok
        if (self.tampered_slices or self.tensor_findings or self.file_findings or not self.config.matches
                or not functional_ok):
            return "tampered"
        if self.ambiguities:
            return "ambiguous"
        return "incomplete" if self.incomplete else "intact"


class CheckpointJudge:
    """The safetensors side of `verify.verify_slices`: config.json, each fingerprinted slice and the norm
    gains of a checkpoint directory, read through `formats.checkpoint.Checkpoint` (only the slices' rows)."""

    def __init__(self, root: str | Path, fingerprint: Fingerprint):
        self.root, self.fingerprint = Path(root), fingerprint

    def __enter__(self) -> "CheckpointJudge":
        self.config = check_config(self.root, self.fingerprint)  # before any weight file is opened
        self._ckpt = Checkpoint.open(self.root)
        self._ckpt.__enter__()
        _prefetch(self._ckpt, self.fingerprint.slices.values())
        return self

    def __exit__(self, *exc) -> None:
        self._ckpt.__exit__(*exc)

    def judge(self, key: str, neurons: tuple[NeuronRecord, ...]) -> SliceVerdict:
        return _verify_slice(self._ckpt, self.fingerprint.slices[key], self.fingerprint.tensors[key], neurons)

    def finish(self, verdicts: list[SliceVerdict]) -> list[SliceVerdict]:
        """The verdicts beyond the slices: every scanned norm's whole gain."""
        return _verify_norms(self._ckpt, self.fingerprint)

    def where(self) -> dict:
        """What was read, for the VerifyResult: shards, loaded files, layout ambiguities."""
        ckpt = self._ckpt
        return dict(shards_read=ckpt.opened_shards, ambiguities=tuple(ckpt.ambiguities), loaded_files=tuple(ckpt.files))


def _verify_norms(ckpt: Checkpoint, fingerprint: Fingerprint) -> list[SliceVerdict]:
    """Every scanned norm's whole gain (and bias), which the fingerprint stores for the runtime guard: one norm
    channel can collapse a model alone, fingerprinted neuron or not. An unchanged tensor (same bytes, or a
    re-save's rounding) adds nothing; otherwise each changed channel the fingerprint does not already hold as
    a slice is judged like one (`PARAM@0:C`), and a missing or reshaped tensor is one verdict."""
    records = json.loads(fingerprint.metadata.get("norms", "{}"))
    dtype_names = {v: k for k, v in _ST_DTYPES.items()}
    out: list[SliceVerdict] = []
    for param, rec in sorted(records.items()):
        if str(rec.get("shard", "")).endswith(".gguf"):
            continue  # values transformers loaded from a GGUF file, not a safetensors tensor's bytes
        reference = fingerprint.tensors[NORM_PREFIX + param]  # (d,), checked against its sha256 at load
        null = -float(rec["offset"]) if rec["role"] == "weight" else 0.0  # the gain's zero: -1 for `1 + w` norms
        key = NORM_PREFIX + param  # the whole tensor's verdicts (missing, reshaped, not a float) carry this name
        expected_dtype = dtype_names.get(reference.dtype, str(reference.dtype))
        base = dict(param=param, neurons=(), expected_dtype=expected_dtype, expected_shape=tuple(reference.shape))
        name = rec["checkpoint_key"]
        name = name if name in ckpt.weight_map else resolve_key(ckpt.weight_map, param)
        if name is None:
            out.append(SliceVerdict(key=key, checkpoint_key=None, shard=rec["shard"], status=SliceStatus.missing,
                                    actual_dtype=None, actual_shape=None, **base))
            continue
        for shard in ckpt.copies.get(name, [ckpt.shard_of(name)]):
            shape, dtype = ckpt.shape_dtype(name, shard)
            common = dict(base, checkpoint_key=name, shard=shard, actual_dtype=dtype, actual_shape=shape)
            if shape != base["expected_shape"]:
                out.append(SliceVerdict(key=key, status=SliceStatus.shape_mismatch, **common))
                continue
            current = ckpt.read(name, shard)
            if dtype == expected_dtype and tensor_sha256(current.contiguous()) == rec["sha256"]:
                continue
            if dtype not in _ST_DTYPES or not current.is_floating_point():
                out.append(SliceVerdict(key=key, status=SliceStatus.perturbed, **common))
                continue
            if classify(reference, current, null)[0] in OK_STATUSES:
                continue  # a re-save's rounding of the whole tensor
            changed = torch.ne(current.double(), reference.double()).nonzero().flatten().tolist()
            for c in changed:  # only the changed channels: at most the norm's width
                channel = f"{param}@0:{c}"
                if channel in fingerprint.slices:
                    continue  # a fingerprinted neuron: its own slice verdict already judged it
                status, factor, rel_l2, max_abs = classify(reference[c], current[c], null)
                if status not in OK_STATUSES:
                    out.append(SliceVerdict(key=channel, status=status, factor=factor, rel_l2=rel_l2,
                                            max_abs_diff=max_abs, **common))
    return out


def check_config(root: Path, fingerprint: Fingerprint) -> ConfigCheck:
    """config.json's sha256 vs the fingerprint's; InputError when the architecture itself differs."""
    from achilles_guard.formats.load import config_sha256

    config_path = root / "config.json"
    if not root.is_dir():
        raise InputError(
            f"{root}: no such directory" if not root.exists() else f"{root}: is a file; give the checkpoint's directory"
        )
    if not config_path.is_file():
        raise InputError(f"{root}: no config.json; give a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        actual_arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        model_type = config.get("model_type", "?")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise InputError(f"{config_path}: unreadable config ({err})") from None
    if model_type != fingerprint.model_type or actual_arch != fingerprint.architecture:
        raise InputError(
            f"fingerprint {fingerprint.path} was taken from a {fingerprint.architecture} ({fingerprint.model_type}) "
            f"but {root} is a {actual_arch} ({model_type}): architecture differs; use this model's own fingerprint"
        )
    return ConfigCheck(fingerprint.config_sha256, config_sha256(root), fingerprint.architecture, actual_arch)


def classify(
    reference: torch.Tensor, current: torch.Tensor, null_value: float
) -> tuple[SliceStatus, float | None, float, float]:
    """Status, factor, relative L2 change, max |diff| of `current` vs `reference` (same shape, 1-D or 0-D).

    Tolerances are one ulp of the coarser of the two dtypes: what a re-save (fp32 -> fp16/bf16)
    or a scale-then-round can introduce.
    """
    ref = reference.double().reshape(-1)  # (k,)
    cur = current.double().reshape(-1)  # (k,)
    eps = max(_eps(reference.dtype), _eps(current.dtype))
    tiny = max(_tiny(reference.dtype), _tiny(current.dtype))
    diff = cur - ref
    ref_norm = float(ref.norm())
    rel_l2 = float(diff.norm()) / ref_norm if ref_norm > 0 else (0.0 if float(diff.norm()) == 0 else math.inf)
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    if not torch.isfinite(cur).all() and torch.isfinite(ref).all():
        return SliceStatus.perturbed, None, math.inf, math.inf
    if torch.equal(ref, cur):
        return SliceStatus.equivalent, 1.0, 0.0, 0.0
    if reference.dtype != current.dtype and bool((diff.abs() <= eps * ref.abs() + tiny).all()):
        return SliceStatus.equivalent, 1.0, rel_l2, max_abs
    if any(torch.equal(cur, reference.to(half).to(current.dtype).double().reshape(-1)) for half in _ROUND_TRIPS
           if _eps(half) > _eps(current.dtype)):
        return SliceStatus.equivalent, 1.0, rel_l2, max_abs  # cast to fp16/bf16 and back: rounding, not tampering
    if bool((cur == null_value).all()):
        return SliceStatus.zeroed, 0.0 if null_value == 0 else None, rel_l2, max_abs
    if ref_norm > 0:
        factor = float(cur @ ref) / float(ref @ ref)  # least-squares fit cur ≈ factor · ref
        residual = float((cur - factor * ref).norm())
        scale_tol = 2 * eps * max(float(cur.norm()), abs(factor) * ref_norm) + tiny * math.sqrt(cur.numel())
        if residual <= scale_tol and abs(factor - 1.0) > 4 * eps:
            status = SliceStatus.sign_flipped if abs(factor + 1.0) <= 4 * eps else SliceStatus.scaled
            return status, factor, rel_l2, max_abs
    return SliceStatus.perturbed, None, rel_l2, max_abs


def _verify_slice(
    ckpt: Checkpoint, record: SliceRecord, reference: torch.Tensor, neurons: tuple[NeuronRecord, ...]
) -> SliceVerdict:
    """Judge every loaded copy of the slice; a tensor held by two loaded files reports its worst copy."""
    verdicts = judge_slice(ckpt, record, reference, neurons)
    return next((v for v in verdicts if not v.ok), verdicts[0])


def judge_slice(
    ckpt: Checkpoint, record: SliceRecord, reference: torch.Tensor, neurons: tuple[NeuronRecord, ...] = ()
) -> list[SliceVerdict]:
    """The one slice lookup: find a fingerprinted slice in a checkpoint (`find_slice`) and judge each copy.

    Used by verify-checkpoint, `guard tamper` and `guard repair`, so what one calls `equivalent`
    the others accept as intact too.
    """
    base = dict(
        key=record.key, param=record.param, neurons=neurons, expected_dtype=record.dtype, expected_shape=record.shape
    )
    name = find_slice(ckpt, record)
    if name is None:
        return [
            SliceVerdict(
                **base,
                checkpoint_key=None,
                shard=record.shard,
                status=SliceStatus.missing,
                actual_dtype=None,
                actual_shape=None,
            )
        ]
    out = []
    for shard in ckpt.copies.get(name, [ckpt.shard_of(name)]):
        shape, dtype = ckpt.shape_dtype(name, shard)
        common = dict(base, checkpoint_key=name, shard=shard, actual_dtype=dtype, actual_shape=shape)
        if shape != record.shape:
            out.append(SliceVerdict(**common, status=SliceStatus.shape_mismatch))
            continue
        current = ckpt.read_slice(name, record.axis, record.index, shard)  # (k,) or () for a bias entry
        if dtype == record.dtype and tensor_sha256(current) == record.sha256:
            out.append(SliceVerdict(**common, status=SliceStatus.intact, factor=1.0, rel_l2=0.0, max_abs_diff=0.0))
            continue
        if dtype not in _ST_DTYPES or not current.is_floating_point():
            out.append(SliceVerdict(**common, status=SliceStatus.perturbed))
            continue
        status, factor, rel_l2, max_abs = classify(reference, current, record.null_value)
        out.append(SliceVerdict(**common, status=status, factor=factor, rel_l2=rel_l2, max_abs_diff=max_abs))
    return out


def _prefetch(ckpt: Checkpoint, records) -> None:
    """Ask the kernel for every needed row at once (posix_fadvise WILLNEED) so cold reads overlap.

    A cold checkpoint on a network or virtual disk costs one I/O latency per slice when the slices
    are read one by one; announced together, they are fetched in parallel. Best effort: any
    problem here is left to the real read, which reports it.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    wanted: dict[str, list[tuple[str, SliceRecord]]] = {}
    for r in records:
        name = find_slice(ckpt, r)
        if name is not None and r.axis == 0:
            wanted.setdefault(ckpt.shard_of(name), []).append((name, r))
    for shard, items in wanted.items():
        try:
            fd = os.open(ckpt.root / shard, os.O_RDONLY)
        except OSError:
            continue
        try:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8)) if n < (100 << 20) else {}
            for name, r in items:
                entry = header.get(name)
                if not isinstance(entry, dict) or not r.shape:
                    continue
                start, end = entry["data_offsets"]
                row = (end - start) // r.shape[0]
                os.posix_fadvise(fd, 8 + n + start + r.index * row, row, os.POSIX_FADV_WILLNEED)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass
        finally:
            os.close(fd)


def functional_check(root: Path, fingerprint: Fingerprint, params: FunctionalParams) -> FunctionalCheck:
    """Load the model, compare its probe loss with the baseline, re-mask the critical set."""
    from achilles_guard.engine.masking import MaskPlan, masked
    from achilles_guard.engine.pcicn import clean_loss
    from achilles_guard.engine.perplexity import delta_log10
    from achilles_guard.engine.scan import tokenize_probe
    from achilles_guard.formats.load import load_model

    if not (params.max_delta_log10 > 0 and math.isfinite(params.max_delta_log10)):
        raise UsageError(f"--max-delta-log10 must be a positive number (got {params.max_delta_log10})")
    if not fingerprint.probe_texts:
        raise InputError(f"fingerprint {fingerprint.path}: has no probe text; --functional cannot run")
    t0 = time.perf_counter()
    lm = load_model(root, dtype=params.dtype, device=params.device)
    load_s = time.perf_counter() - t0
    probe = tokenize_probe(lm, "probe", fingerprint.probe_texts[0], allow_short=True)
    loss = clean_loss(lm.model, probe.input_ids)
    masked_loss = masked_delta = None
    if fingerprint.critical_set:
        scale = float(fingerprint.scan_params.get("mask_scale", 0.0))
        with masked(lm.model, MaskPlan.fixed(fingerprint.critical_set, scale)):
            masked_loss = clean_loss(lm.model, probe.input_ids)
        masked_delta = delta_log10(masked_loss, loss)
    return FunctionalCheck(
        baseline_loss=fingerprint.baseline_loss, loss=loss, delta_log10=delta_log10(loss, fingerprint.baseline_loss),
        max_delta_log10=params.max_delta_log10, masked_loss=masked_loss, masked_delta_log10=masked_delta,
        epsilon=float(fingerprint.scan_params.get("epsilon", 1.0)), load_s=load_s,
    )


_ROUND_TRIPS = (torch.float16, torch.bfloat16)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.3g}")
