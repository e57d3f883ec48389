"""Runtime protection: hold each critical neuron to its baseline profile from the fingerprint.

Massive activations are nearly input-independent (Sun et al. 2024): an "always-on" neuron has
mean |a| close to its max |a| and a stable sign. A weight tamper that zeroes it makes the value
vanish. The guard restores the fingerprinted mean wherever |a| falls below `floor` x mean |a|
(default 0.5) and clamps every guarded neuron to ±`ceiling` x max |a| (default 4) against blow-ups.
Neurons whose profile is input-dependent (mean |a| < `steady` x max |a|) are only clamped: their
expected value at a position is unknown, and the guard says so (`PinGuard.restorable`).

    guard = PinGuard.from_fingerprint(fp)
    with guard.installed(model):               # masking.hooks: removed on exit
        logits = model(input_ids).logits
    guard.interventions                         # positions x neurons changed so far

    pinned = PinnedModel(model, guard)         # installs the guard around every forward, *after*
                                               # any hook already on the model (a tamper simulated
                                               # by masking happens inside the module, before it)

With no attack nothing is triggered and the output is bit-identical (torch.where keeps the bits).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from achilles_guard.masking import hooks
from achilles_guard.neurons import Neuron

__all__ = ["PinProfile", "PinGuard", "PinnedModel"]


@dataclass(frozen=True)
class PinProfile:
    """What the guard holds one module's neurons to; tensors of shape (k,)."""

    module: str
    channels: torch.Tensor  # long
    mean: torch.Tensor  # restore value
    floor: torch.Tensor  # |a| below this is "vanished" (0 for neurons that cannot be restored)
    ceiling: torch.Tensor  # |a| above this is clamped


class PinGuard:
    """Forward-hook guard over a fixed set of neurons (see module docstring)."""

    def __init__(self, profiles: dict[str, PinProfile], restorable: tuple[Neuron, ...], clamp_only: tuple[Neuron, ...]):
        self.profiles = profiles
        self.restorable = restorable
        self.clamp_only = clamp_only
        # per device: (2,) long = [interventions, restorations]; summed on the device, read on demand,
        # so a forward never waits for the host
        self._counts: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def from_fingerprint(fp, *, neurons: str = "critical", floor: float = 0.5, ceiling: float = 4.0, steady: float = 0.5) -> "PinGuard":
        """Guard the fingerprint's critical neurons (`neurons="critical"`) or all it records (`"all"`)."""
        records = fp.critical_records if neurons == "critical" else fp.neurons
        by_module: dict[str, list] = {}
        for r in records:
            by_module.setdefault(r.neuron.module, []).append(r)
        profiles, restorable, clamp_only = {}, [], []
        for module, rs in by_module.items():
            rs = sorted(rs, key=lambda r: r.neuron.channel)
            mean = torch.tensor([r.baseline.mean for r in rs], dtype=torch.float32)
            mean_abs = torch.tensor([r.baseline.mean_abs for r in rs], dtype=torch.float32)
            max_abs = torch.tensor([r.baseline.max_abs for r in rs], dtype=torch.float32)
            # always-on: typical magnitude close to the peak, and a stable sign (|mean| ~ mean |a|)
            steady_mask = (mean_abs >= steady * max_abs) & (mean.abs() >= steady * mean_abs) & (max_abs > 0)
            for r, ok in zip(rs, steady_mask.tolist()):
                (restorable if ok else clamp_only).append(r.neuron)
            profiles[module] = PinProfile(
                module,
                torch.tensor([r.neuron.channel for r in rs], dtype=torch.long),
                mean,
                torch.where(steady_mask, floor * mean_abs, torch.zeros_like(mean_abs)),
                ceiling * max_abs,
            )
        return PinGuard(profiles, tuple(restorable), tuple(clamp_only))

    @property
    def interventions(self) -> int:
        """Activation values (positions x neurons) the guard has changed since creation or reset."""
        return self.counts()[0]

    @property
    def restorations(self) -> int:
        """The interventions that put back a vanished value (the others clamped a blow-up)."""
        return self.counts()[1]

    def counts(self) -> tuple[int, int]:
        """(interventions, restorations), read together (safe while another thread runs forwards)."""
        totals = [c.tolist() for c in list(self._counts.values())]  # each (2,) tensor is replaced, never mutated
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    def reset(self) -> None:
        self._counts = {}

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator["PinGuard"]:
        with hooks(model, {m: self._fn(p) for m, p in self.profiles.items()}):
            yield self

    def _fn(self, profile: PinProfile):
        cache: dict = {}

        def pin(output: torch.Tensor) -> torch.Tensor:
            key = (output.device, output.dtype)
            if key not in cache:
                cache[key] = (
                    profile.channels.to(output.device),
                    profile.mean.to(output.device, output.dtype),
                    profile.floor.to(output.device, torch.float32),
                    profile.ceiling.to(output.device, torch.float32),
                )
            idx, mean, floor, ceiling = cache[key]
            a = output[..., idx]  # (B, T, k)
            mag = a.float().abs()
            vanished = mag < floor  # (B, T, k)
            blown = ~(mag <= ceiling)  # also catches nan
            hit = vanished | blown
            # copysign: a NaN keeps its sign bit and becomes ±ceiling; untouched values keep their bits
            fixed = torch.where(hit, torch.where(vanished, mean, torch.copysign(ceiling.to(a.dtype), a)), a)
            hits = torch.stack([hit.sum(), vanished.sum()])  # (2,) on the output's device
            previous = self._counts.get(hits.device)
            self._counts[hits.device] = hits if previous is None else previous + hits
            if torch.is_grad_enabled() and output.requires_grad:
                output = output.clone()
            output[..., idx] = fixed
            return output

        return pin


class PinnedModel:
    """A model whose every forward runs with `guard` installed as the last hook on each module.

    Delegates everything else to the wrapped model, so scans (`run_scan`) accept it in place of a
    model: masks they install are registered first and act before the guard, like a weight tamper.
    """

    def __init__(self, model: nn.Module, guard: PinGuard):
        self._model = model
        self.guard = guard

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        with self.guard.installed(self._model):
            return self._model(*args, **kwargs)

    @property
    def base_model(self):
        return _PinnedBase(self._model.base_model, self._model, self.guard)


class _PinnedBase:
    def __init__(self, base, model, guard):
        self._base, self._model, self._guard = base, model, guard

    def __getattr__(self, name):
        return getattr(self._base, name)

    def __call__(self, *args, **kwargs):
        with self._guard.installed(self._model):
            return self._base(*args, **kwargs)
