"""Runtime (in-memory) weight integrity: re-hash the fingerprinted producing slices of a live model.

The model may run in another dtype than the checkpoint the fingerprint was taken from (float16 on
a GPU, float32 on a CPU). When the dtypes match, the live slice's bytes must hash to the recorded
sha256; otherwise the fingerprint slice is cast to the live dtype once (the same round-to-nearest
cast the loader applies) and the live bytes must hash to that — exact up to the dtype's rounding.

    checker = RuntimeIntegrityChecker(model, fingerprint)
    result = checker.check()          # RuntimeIntegrityResult(ok, checked, skipped, mismatched, ...)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from achilles_guard.errors import InputError
from achilles_guard.formats.checkpoint import tensor_sha256

__all__ = ["RuntimeIntegrityChecker", "RuntimeIntegrityResult"]


@dataclass(frozen=True)
class RuntimeIntegrityResult:
    ok: bool
    checked: int  # slices actually hashed
    skipped: int  # slices offloaded by accelerate (on the meta device): nothing in memory, not checked
    mismatched: tuple[str, ...]  # SliceRecord keys whose live bytes differ
    seconds: float
    timestamp: float  # unix time of the check


@dataclass(frozen=True)
class _LiveSlice:
    key: str
    param: torch.nn.Parameter
    axis: int
    index: int
    expected_sha256: str


class RuntimeIntegrityChecker:
    """Hashes the live producing slices of every fingerprinted neuron against the fingerprint."""

    def __init__(self, model, fingerprint):
        params = dict(model.named_parameters(remove_duplicate=False))
        live = []
        for key, record in fingerprint.slices.items():
            param = params.get(record.param)
            if param is None:
                raise InputError(
                    f"fingerprint {fingerprint.path}: parameter {record.param} is not in this model; "
                    "the fingerprint belongs to another model (run guard scan on this one)"
                )
            if tuple(param.shape) != tuple(record.shape):
                raise InputError(
                    f"fingerprint {fingerprint.path}: {record.param} has shape {tuple(param.shape)} here but "
                    f"{tuple(record.shape)} in the fingerprint; it belongs to another model"
                )
            stored = fingerprint.tensors[key]
            expected = record.sha256 if stored.dtype == param.dtype else tensor_sha256(stored.to(param.dtype))
            live.append(_LiveSlice(key, param, record.axis, record.index, expected))
        self._slices = tuple(live)

    @property
    def size(self) -> int:
        return len(self._slices)

    def check(self) -> RuntimeIntegrityResult:
        """Hash every live slice now (a few KB per neuron; safe while forwards run: read only)."""
        t0 = time.perf_counter()
        bad, checked, skipped = [], 0, 0
        with torch.no_grad():
            for s in self._slices:
                if s.param.device.type == "meta":  # offloaded by accelerate: nothing in memory to check
                    skipped += 1
                    continue
                checked += 1
                if tensor_sha256(s.param.detach().select(s.axis, s.index)) != s.expected_sha256:
                    bad.append(s.key)
        return RuntimeIntegrityResult(not bad, checked, skipped, tuple(bad), time.perf_counter() - t0, time.time())
