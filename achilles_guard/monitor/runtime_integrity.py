"""Runtime (in-memory) weight integrity: re-hash the fingerprinted producing slices of a live model.

The model may run in another dtype than the checkpoint the fingerprint was taken from (float16 on
a GPU, float32 on a CPU). When the dtypes match, the live slice's bytes must hash to the recorded
sha256; otherwise the fingerprint slice is cast to the live dtype once (the same round-to-nearest
cast the loader applies) and the live bytes must hash to that — exact up to the dtype's rounding.

    checker = RuntimeIntegrityChecker(model, fingerprint)
    result = checker.check()          # RuntimeIntegrityResult(ok, checked, skipped, mismatched, ...)

A parameter a serving engine repacked into its kernels (its `weight` left empty) is read back
through the kernel when `served` (monitor.served.ServedWeights) holds it and has confirmed that
the kernel returns the verified weights; until then its slices count as skipped.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from achilles_guard.errors import InputError
from achilles_guard.formats.checkpoint import tensor_sha256

__all__ = ["RuntimeIntegrityChecker", "RuntimeIntegrityResult"]


@dataclass(frozen=True)
class RuntimeIntegrityResult:
    ok: bool
    checked: int  # slices actually hashed
    skipped: int  # slices not in memory (offloaded by accelerate) or in a kernel not (yet) confirmed: not checked
    mismatched: tuple[str, ...]  # SliceRecord keys whose live bytes differ
    seconds: float
    timestamp: float  # unix time of the check


@dataclass(frozen=True)
class _LiveSlice:
    key: str
    param: torch.nn.Parameter | None  # None: read back through `served`
    name: str
    axis: int
    index: int
    expected_sha256: str


class RuntimeIntegrityChecker:
    """Hashes the live producing slices of every fingerprinted neuron against the fingerprint."""

    def __init__(self, model, fingerprint, served=None):
        params = dict(model.named_parameters(remove_duplicate=False))
        self._served = served
        live = []
        for key, record in fingerprint.slices.items():
            param = params.get(record.param)
            if served is not None and record.param in served:
                shape, dtype, param = served.shape(record.param), served.dtype(record.param), None
            elif param is not None:
                shape, dtype = tuple(param.shape), param.dtype
            else:
                raise InputError(
                    f"fingerprint {fingerprint.path}: parameter {record.param} is not in this model; "
                    "the fingerprint belongs to another model (run guard scan on this one)"
                )
            if shape != tuple(record.shape):
                raise InputError(
                    f"fingerprint {fingerprint.path}: {record.param} has shape {shape} here but "
                    f"{tuple(record.shape)} in the fingerprint; it belongs to another model"
                )
            stored = fingerprint.tensors[key]
            expected = record.sha256 if stored.dtype == dtype else tensor_sha256(stored.to(dtype))
            live.append(_LiveSlice(key, param, record.param, record.axis, record.index, expected))
        self._slices = tuple(sorted(live, key=lambda s: s.name))  # a read-back layer's slices one after another

    @property
    def size(self) -> int:
        return len(self._slices)

    def check(self) -> RuntimeIntegrityResult:
        """Hash every live slice now (a few KB per neuron; safe while forwards run: read only)."""
        t0 = time.perf_counter()
        bad, checked, skipped = [], 0, 0
        served = self._served
        with torch.no_grad(), (served.session() if served is not None else nullcontext()):
            for s in self._slices:
                if s.param is not None and s.param.device.type == "meta":  # offloaded by accelerate: not in memory
                    skipped += 1
                    continue
                if s.param is None and not served.judged(s.name):  # not read back and confirmed (yet)
                    skipped += 1
                    continue
                checked += 1
                weight = s.param.detach() if s.param is not None else served.read(s.name)
                if tensor_sha256(weight.select(s.axis, s.index)) != s.expected_sha256:
                    bad.append(s.key)
        return RuntimeIntegrityResult(not bad, checked, skipped, tuple(bad), time.perf_counter() - t0, time.time())
