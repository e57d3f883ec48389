"""RED-TEAM `guard tamper` and the recovery `guard repair` on GGUF files, editing quantized blocks.

Both copy the input to a temporary file beside `--out`, patch bytes of the copy in place (the file's
size, header and tensor table are unchanged, so it stays a valid GGUF that llama.cpp and transformers
load), fsync it and rename it to `--out`. The input is never written.

Tamper kinds on a slice whose blocks it fills (a torch row = whole GGUF blocks):
  zero       every byte of the blocks := 0 (block scales d = 0: every value 0);
  scale β    every float16 scale field of the blocks × β (`formats.gguf.SCALE_FIELDS`: d, and m / dmin);
  sign-flip  the same with β = -1;
  noise      dequantize, add Gaussian noise of relative L2 size `noise`, re-quantize (`gguf.quants.quantize`:
             F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
Float tensors (F32, F16, BF16) and column slices are edited on their values and re-quantized.

    tamper_gguf(src, out, fingerprint_or_neurons..., kind="scale", scale=0.9)
    repair_gguf(src, fp, out)   # restores the fingerprinted raw blocks; RepairOutcome
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from achilles_guard.errors import InputError, UsageError
from achilles_guard.formats.gguf import FLOAT_TYPES, SCALE_FIELDS, GGUFLayout, SliceBlocks, read_layout

__all__ = ["gguf_targets", "select_gguf_targets", "tamper_gguf", "repair_gguf", "patched_copy"]


def gguf_targets(layout: GGUFLayout, targets) -> list[tuple[object, SliceBlocks]]:
    """(TamperTarget, its blocks) for targets named by transformers parameter or GGUF tensor name."""
    out = []
    for t in targets:
        name = t.checkpoint_key if t.checkpoint_key in layout.tensors else layout.gguf_name(t.checkpoint_key)
        if name is None or name not in layout.tensors:
            raise InputError(
                f"{layout.path}: parameter {t.checkpoint_key} (producing {t.neuron}) is not in the GGUF file"
            )
        out.append((t, layout.locate(name, t.axis, t.index)))
    return out


def select_gguf_targets(src: Path, source: Path | None, explicit: list[str], top: int | None) -> list:
    """`guard tamper`'s neuron choice (fingerprint, report.json or --neuron) resolved to slices of a GGUF file."""
    from achilles_guard.integrity.tamper import (
        TamperTarget,
        neuron_option,
        neuron_slices,
        neurons_from_report,
        targets_from_fingerprint,
    )

    if (source is None) == (not explicit):
        raise UsageError("give either --neurons REPORT_OR_FINGERPRINT or --neuron MODULE[CHANNEL] (exactly one way)")
    if top is not None and top < 1:
        raise UsageError(f"--top must be >= 1 (got {top})")
    targets = []
    with read_layout(src) as layout:
        if source is not None and source.suffix == ".safetensors":
            from achilles_guard.integrity.gguf_slices import find_gguf_slice

            return targets_from_fingerprint(source, top, lambda record: find_gguf_slice(layout, record), str(src))
        chosen = neurons_from_report(source, top) if source is not None else [neuron_option(s) for s in explicit]
        model = _meta_model(src)
        for n in chosen:
            slices = neuron_slices(model, n)
            targets.extend(TamperTarget(n, ws.param, ws.axis, ws.index, ws.null_value) for ws in slices)
        gguf_targets(layout, targets)  # every slice exists and is in range, before anything is written
    return targets


def _meta_model(src: Path):
    """The GGUF model's module tree on the meta device (config from the file's metadata; no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from achilles_guard.formats.load import check_gguf, quiet_transformers

    check_gguf(src).close()
    quiet_transformers()
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def patched_copy(src: Path, out: Path, patches: list[tuple[int, bytes]]) -> Path:
    """Copy `src` to `out` with each (offset, bytes) written over the copy; atomic (temp file + rename)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.staging-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "r+b") as handle:
            for offset, data in patches:
                handle.seek(offset)
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if out.exists():
            raise InputError(f"--out {out}: appeared while the copy was written; nothing was replaced")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def tamper_gguf(
    src: str | Path,
    out: str | Path,
    targets,
    *,
    kind: str = "zero",
    scale: float = 0.3,
    noise: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write a sabotaged copy of a GGUF file with every target slice's blocks edited (see module docstring)."""
    src, out = Path(src), Path(out)
    if not targets:
        raise UsageError("no weight slice to tamper with")
    rng = np.random.default_rng(seed)
    patches = []
    with read_layout(src) as layout:
        for t, where in gguf_targets(layout, targets):
            raw = layout.read_blocks(where).copy()
            patches.extend(_tampered_runs(where, raw, kind, scale, noise, rng, t.null_value))
    return patched_copy(src, out, patches)


def _tampered_runs(where: SliceBlocks, raw: np.ndarray, kind: str, scale: float, noise: float, rng, null_value: float):
    info = where.tensor
    whole_blocks = len(where.positions) == raw.size // info.type_size * info.block_size  # the slice fills its blocks
    if (
        whole_blocks
        and info.qtype in SCALE_FIELDS
        and (kind in ("scale", "sign-flip") or (kind == "zero" and null_value == 0))
    ):
        blocks = raw.reshape(-1, info.type_size)  # (n_blocks, bytes)
        if kind == "zero":
            blocks[:] = 0
        else:
            factor = -1.0 if kind == "sign-flip" else scale
            for off in SCALE_FIELDS[info.qtype]:
                field = blocks[:, off : off + 2].copy().view(np.float16)  # (n_blocks, 1)
                blocks[:, off : off + 2] = (field.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
        return _runs(where, blocks.reshape(-1))
    return _runs(where, _requantized(where, raw, kind, scale, noise, rng, null_value))


def _requantized(
    where: SliceBlocks, raw: np.ndarray, kind: str, scale: float, noise: float, rng, null_value: float
) -> np.ndarray:
    """Dequantize the blocks, change the slice's elements, quantize back with gguf.quants (same bytes layout)."""
    import gguf

    from achilles_guard.formats.gguf import _dequantize

    info = where.tensor
    values = _dequantize(raw, info).astype(np.float64)  # every element of the blocks
    part = values[where.positions]
    if kind == "zero":
        part = np.full_like(part, null_value)
    elif kind == "scale":
        part = part * scale
    elif kind == "sign-flip":
        part = -part
    else:
        eps = rng.standard_normal(part.shape)
        part = part + eps * (noise * np.linalg.norm(part) / max(np.linalg.norm(eps), 1e-30))
    values[where.positions] = part
    qtype = gguf.GGMLQuantizationType[info.qtype]
    if info.qtype in FLOAT_TYPES:
        return values.astype(FLOAT_TYPES[info.qtype]).view(np.uint8).reshape(-1)
    try:
        packed = gguf.quants.quantize(values.astype(np.float32).reshape(-1, info.block_size), qtype)
    except NotImplementedError:
        raise UsageError(
            f"--kind {kind} on a {info.qtype} tensor ({info.name}): the gguf package cannot re-quantize "
            f"{info.qtype}; use --kind zero, scale or sign-flip on its rows"
        ) from None
    return np.asarray(packed).view(np.uint8).reshape(-1)


def _runs(where: SliceBlocks, data: np.ndarray) -> list[tuple[int, bytes]]:
    out, at = [], 0
    for start, n in where.runs:
        out.append((start, data[at : at + n].tobytes()))
        at += n
    return out


def repair_gguf(source: str | Path, fp, out: str | Path):
    """A copy of a GGUF with every tampered fingerprinted slice's raw blocks restored; re-verified, removed if
    that fails."""
    from achilles_guard.formats.gguf import BLOCKS_SUFFIX, gguf_records
    from achilles_guard.integrity.gguf_slices import judge_gguf_slice
    from achilles_guard.integrity.repair import RepairOutcome, SliceRepair
    from achilles_guard.integrity.verify import verify_slices

    source, out = Path(source), Path(out)
    if out.exists() or out.resolve() == source.resolve():
        raise UsageError(f"--out {out}: already exists; guard repair writes a new file (nothing was written)")
    meta = gguf_records(fp)
    results, patches = {}, []
    with read_layout(source) as layout:
        for key in fp.slices:
            verdict, found = judge_gguf_slice(layout, fp, key, (), meta)
            if verdict.ok:
                results[key] = SliceRepair(key, verdict.checkpoint_key or "", "intact")
                continue
            mine = (meta or {}).get("slices", {}).get(key)
            if found is None or mine is None or mine.get("qtype") != found.where.tensor.qtype:
                why = (
                    "tensor missing or reshaped"
                    if found is None
                    else "the fingerprint holds float values, not this file's quantized blocks "
                    "(take a fingerprint of the GGUF)"
                )
                results[key] = SliceRepair(key, verdict.checkpoint_key or "", "unrepairable", why)
                continue
            blocks = fp.tensors[key + BLOCKS_SUFFIX].numpy().astype(np.uint8)
            if blocks.size != found.where.n_bytes:
                results[key] = SliceRepair(
                    key, verdict.checkpoint_key, "unrepairable", "block layout differs from the fingerprint's"
                )
                continue
            patches.extend(_runs(found.where, blocks))
            results[key] = SliceRepair(key, verdict.checkpoint_key, "restored")
        config_matches = meta is not None and meta.get("config_sha256") == layout.config_sha256
    if out.parent and not out.parent.is_dir():
        raise UsageError(f"--out {out}: parent directory {out.parent} does not exist")
    patched_copy(source, out, patches)
    repaired = verify_slices(out, fp)
    fixable = {k for k, r in results.items() if r.status != "unrepairable"}
    verified = all(v.ok for v in repaired.slices if v.key in fixable)
    if not verified:
        out.unlink()
    return RepairOutcome(str(source), str(out), tuple(results[k] for k in fp.slices), config_matches, verified)
