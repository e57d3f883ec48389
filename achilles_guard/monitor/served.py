"""The weights a serving engine computes with, read back through its own kernels.

vLLM on a CPU repacks each linear layer's weight into a kernel's private format (oneDNN, sgl-kernel,
zentorch) and leaves an empty `weight` behind: the bytes it serves are no longer a tensor anyone can
hash. They can still be read exactly. A linear kernel computes y = x Wᵀ; with x the identity, every
output element is one product w·1 plus exact zeros, so the kernel returns Wᵀ bit for bit, whatever
its blocking or summation order (two exceptions: a -0.0 comes back as +0.0, and a kernel that
flushes subnormals returns 0 for them). `ServedWeights` does this for every layer the engine
repacked, a block of identity rows at a time. `confirm()` (the first thing the background thread
does once serving starts) checks that each read-back equals the weights that were verified just
before the engine packed them, by a checksum taken then (holding the weights themselves would
double the start's peak memory). A layer that does not (its weights hold -0.0 or subnormals, or
the kernel is not exact) is listed as not re-checkable, never judged.

    before = {name: Digest.of(m.weight) for ...}    # as verified, before the engine packs the weights
    served = ServedWeights(model, before, lock)
    served.confirm()                                 # the inexact layers' names
    served.guard_forwards(model)                    # forwards and read-backs never run at the same time
    with served.session():                          # one read-back per layer for the whole check
        w = served.read("model.layers.3.mlp.down_proj.weight")   # (N, K): what the kernel computes with

Concurrency matters: measured in vLLM 0.32, read-backs from another thread beside vLLM's step killed
the worker (even with the model's forward and its logits processor under `lock`), so the vLLM plugin
runs them in vLLM's own thread after a forward, and from its own thread (block by block under `lock`)
only when the server is idle.

Cost: one read-back is a GEMM of K identity rows, the work of a K-token forward through that layer;
all of them, about a forward of hidden-size tokens through the model (SmolLM2: 1.5-2 s for its 120
linears, fp32, inside vLLM on 2 CPU cores). Read-backs take the same lock as the
model's forward, one block at a time (≤ READ_ROWS rows), so they never run beside a forward (the
engine's kernels keep caches that are not meant for two threads) and delay one by a few ms at most.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["ServedWeights", "ServedTensor", "Digest", "READ_ROWS"]

READ_ROWS = 256  # identity rows per kernel call: bounds the probe's memory (256 x K) and each lock hold
_SUM_ROWS = 1024  # rows per block of the checksum: bounds its int64 temporary


@dataclass(frozen=True)
class Digest:
    """A weight's shape, dtype and a checksum of its bits: Σᵢ r[i]·(Σⱼ bits[i, j]·c[j] mod 2ʷ) mod 2⁶⁴, with
    fixed odd r, c (w: the element's width in bits, 32 for float32, 16 for bfloat16).

    An odd factor is invertible mod a power of two: a difference in any one element always changes the sum,
    and so does exchanging two rows or columns (one pass over the bits at their own width: ~0.1 s a GB). It
    compares a read-back with the weights verified moments before (nobody chooses what differs between the
    two), so it need not resist a forger; the fingerprint's sha256 records judge the weights themselves."""

    shape: tuple
    dtype: torch.dtype
    value: int

    @staticmethod
    def of(t: torch.Tensor) -> "Digest":
        t = t.detach()
        bits = _bits(t).reshape(t.shape[0], -1) if t.dim() else _bits(t).reshape(1, 1)
        n, k = bits.shape
        g = torch.Generator().manual_seed(0x5EED)
        half = 2 ** (8 * bits.element_size() - 2)  # odd column factors in the bits' own width: products wrap
        c = (torch.randint(-half, half, (k,), generator=g, dtype=torch.int64) * 2 + 1).to(bits.dtype).to(bits.device)
        r = (torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64) * 2 + 1).to(bits.device)
        total = torch.zeros((), dtype=torch.int64, device=bits.device)
        for i in range(0, n, _SUM_ROWS):
            rows = (bits[i: i + _SUM_ROWS] * c).sum(1, dtype=torch.int64)  # (rows,), products mod 2^width
            total += (rows * r[i: i + _SUM_ROWS]).sum()  # mod 2^64
        return Digest(tuple(t.shape), t.dtype, int(total))


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

    def __init__(self, model: torch.nn.Module, before: Mapping[str, Digest], lock=None):
        """`before`: module name -> the Digest of its 2-D weight as verified, before the engine processed it.
        Nothing is read yet: `confirm()` reads every layer back once and keeps the ones that match."""
        self.lock = lock or threading.RLock()
        self._modules: dict[str, torch.nn.Module] = {}
        self._digests: dict[str, Digest] = {}
        self._cache: dict | None = None
        self.confirmed = False
        self.inexact: tuple[str, ...] = ()
        for name, module in model.named_modules():
            digest = before.get(name)
            if digest is None or not callable(getattr(module, "cpu_linear", None)):
                continue
            now = getattr(module, "weight", None)
            if isinstance(now, torch.Tensor) and now.numel():
                continue  # the engine still computes with the tensor (F.linear): read directly
            self._modules[f"{name}.weight"] = module
            self._digests[f"{name}.weight"] = digest

    def confirm(self) -> tuple[str, ...]:
        """Read every layer back once; keep those whose read-back is the verified weight bit for bit (the others
        are `inexact`: never judged). From then on `judged` is true for the kept ones. The inexact names."""
        inexact = []
        for pname, digest in list(self._digests.items()):
            back = self.read(pname)
            if back.dtype != digest.dtype or Digest.of(back) != digest:
                inexact.append(pname)
                del self._modules[pname], self._digests[pname]
        self.inexact, self.confirmed = tuple(inexact), True
        return self.inexact

    def judged(self, pname: str) -> bool:
        """True once `confirm` found the layer's kernel returns its verified weight bit for bit."""
        return self.confirmed and pname in self._modules

    def __contains__(self, pname: object) -> bool:
        return pname in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def shape(self, pname: str) -> tuple:
        return self._digests[pname].shape

    def dtype(self, pname: str) -> torch.dtype:
        return self._digests[pname].dtype

    def tensor(self, pname: str) -> ServedTensor:
        return ServedTensor(self, pname, 0, self.shape(pname), self.dtype(pname))

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
        n, k = self.shape(pname)
        dtype = self.dtype(pname)
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

    def guard_forwards(self, *modules: torch.nn.Module) -> tuple:
        """Hold `lock` for the whole of each forward of every one of `modules` (the model, and what the engine
        calls outside the model's forward that runs one of its kernels: vLLM's logits processor); released even
        when a forward raises; re-entrant, so one may run inside another. The hook handles."""

        def enter(module, args):
            self.lock.acquire()

        def leave(module, args, output):
            self.lock.release()

        return tuple(h for m in modules for h in (m.register_forward_pre_hook(enter),
                                                   m.register_forward_hook(leave, always_call=True)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that equality is bitwise (NaN = NaN, -0.0 != +0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])
