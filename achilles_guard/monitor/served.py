"""The weights a serving engine computes with, read back through its own kernels.

vLLM on a CPU repacks each linear layer's weight into a kernel's private format (oneDNN, sgl-kernel,
zentorch) and leaves an empty `weight` behind: the bytes it serves are no longer a tensor anyone can
hash. They can still be read exactly. A linear kernel computes y = x Wᵀ; with x the identity, every
output element is one product w·1 plus exact zeros, so the kernel returns Wᵀ bit for bit, whatever
its blocking or summation order (two exceptions: a -0.0 comes back as +0.0, and a kernel that
flushes subnormals returns 0 for them). `ServedWeights` does this for every layer the engine
repacked, a block of identity rows at a time, and checks at start that each read-back equals the
weights that were verified just before the engine packed them. A layer that does not (its weights
hold -0.0 or subnormals, or the kernel is not exact) is listed as not re-checkable, never judged.

    served = ServedWeights(model, before, lock)    # before: module -> its weight as verified, pre-packing
    served.guard_forwards(model)                    # forwards and read-backs never run at the same time
    with served.session():                          # one read-back per layer for the whole check
        w = served.read("model.layers.3.mlp.down_proj.weight")   # (N, K): what the kernel computes with

Cost: one read-back is a GEMM of K identity rows, the work of a K-token forward through that layer
(SmolLM2: 0.75 s for all 210 linears, fp32, 2 CPU cores). Read-backs take the same lock as the
model's forward, one block at a time (≤ READ_ROWS rows), so they never run beside a forward (the
engine's kernels keep caches that are not meant for two threads) and delay one by a few ms at most.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["ServedWeights", "ServedTensor", "READ_ROWS"]

READ_ROWS = 256  # identity rows per kernel call: bounds the probe's memory (256 x K) and each lock hold


@dataclass(frozen=True)
class ServedTensor:
    """Rows [start, start + shape[0]) of a repacked weight; `read()` gives them as the kernel computes with them now."""

    served: "ServedWeights"
    param: str
    start: int
    shape: tuple
    dtype: torch.dtype

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "ServedTensor":
        if dim != 0:
            raise ValueError("a served weight is cut by rows only")
        return ServedTensor(self.served, self.param, self.start + start, (length, *self.shape[1:]), self.dtype)

    def read(self) -> torch.Tensor:
        return self.served.read(self.param).narrow(0, self.start, self.shape[0])


class ServedWeights:
    """Parameters the engine moved into its kernels, read back through those kernels."""

    def __init__(self, model: torch.nn.Module, before: Mapping[str, torch.Tensor], lock=None):
        """`before`: module name -> its 2-D weight as it was verified, before the engine processed the weights."""
        self.lock = lock or threading.Lock()
        self._modules: dict[str, torch.nn.Module] = {}
        self._shapes: dict[str, tuple] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._cache: dict | None = None
        inexact = []
        for name, module in model.named_modules():
            weight = before.get(name)
            if weight is None or not callable(getattr(module, "cpu_linear", None)):
                continue
            now = getattr(module, "weight", None)
            if isinstance(now, torch.Tensor) and now.numel() and now.data_ptr() == weight.data_ptr():
                continue  # still the tensor it computes with: read directly
            pname = f"{name}.weight"
            self._modules[pname] = module
            self._shapes[pname] = tuple(weight.shape)
            self._dtypes[pname] = weight.dtype
            back = self.read(pname)
            if back.dtype != weight.dtype or not torch.equal(_bits(back), _bits(weight.detach())):
                inexact.append(pname)
        for pname in inexact:
            del self._modules[pname], self._shapes[pname], self._dtypes[pname]
        self.inexact = tuple(inexact)

    def __contains__(self, pname: object) -> bool:
        return pname in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def shape(self, pname: str) -> tuple:
        return self._shapes[pname]

    def dtype(self, pname: str) -> torch.dtype:
        return self._dtypes[pname]

    def tensor(self, pname: str) -> ServedTensor:
        return ServedTensor(self, pname, 0, self._shapes[pname], self._dtypes[pname])

    def module(self, pname: str) -> torch.nn.Module:
        return self._modules[pname]

    @contextmanager
    def session(self):
        """Within it, each layer is read back once (the latest read is kept); outside, every read is fresh."""
        self._cache = {}
        try:
            yield self
        finally:
            self._cache = None

    def read(self, pname: str) -> torch.Tensor:
        """(N, K): the weight the layer's kernel computes with now."""
        cache = self._cache
        if cache is not None and pname in cache:
            return cache[pname]
        module = self._modules[pname]
        n, k = self._shapes[pname]
        dtype = self._dtypes[pname]
        out = torch.empty(n, k, dtype=dtype)
        with torch.no_grad():
            for i in range(0, k, READ_ROWS):
                rows = min(READ_ROWS, k - i)
                probe = torch.zeros(rows, k, dtype=dtype)
                probe.view(-1)[i: i + rows * (k + 1): k + 1] = 1  # probe[r, i + r] = 1
                with self.lock:
                    y = module.cpu_linear(probe, module.weight, None)  # (rows, N) = rows i.. of Wᵀ
                out[:, i: i + rows] = y.t()
        if cache is not None:
            cache.clear()  # one layer at a time: the checks read a layer's parts one after another
            cache[pname] = out
        return out

    def guard_forwards(self, model: torch.nn.Module) -> tuple:
        """Hold `lock` for the whole of each forward of `model` (released even when it raises); the handles."""

        def enter(module, args):
            self.lock.acquire()

        def leave(module, args, output):
            self.lock.release()

        return (model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that equality is bitwise (NaN = NaN, -0.0 != +0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])
