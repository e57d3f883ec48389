"""Runtime protection: hold each guarded neuron to its baseline profile from the fingerprint.

Massive activations are nearly input-independent (Sun et al. 2024). Two shapes are restorable:

- **always-on**: mean |a| close to max |a| and a stable sign at every position. Wherever |a| falls
  below `floor` x mean |a| (default 0.5) the guard puts back the fingerprinted mean.
- **first position** (the attention-sink shape real LLMs show): |a| at the first position of every
  probe within a factor 1/`steady` of each other, with a stable sign, and at least `sink_ratio` x
  (default 10) larger than anywhere else. When a forward starts at position 0 (no KV cache yet) and
  |a[0]| falls below `floor` x the smallest first-position value seen, the guard puts back the
  fingerprinted first-position mean, at position 0 only.

Every guarded neuron is also clamped to ±`ceiling` x max |a| (default 4) against blow-ups. Neurons
of neither shape are only clamped: their expected value at a position is unknown, and the guard
says so (`PinGuard.clamp_only`). Left-padded batches are not supported by the first-position rule
(a padded row's position 0 is the pad).

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

import math
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
    mean: torch.Tensor  # restore value at any position (always-on neurons)
    floor: torch.Tensor  # |a| below this is "vanished" at any position (0: not restorable there)
    ceiling: torch.Tensor  # |a| above this is clamped
    first: torch.Tensor | None = None  # restore value at the first position (first-position neurons)
    first_floor: torch.Tensor | None = None  # |a[0]| below this is "vanished" (0: not restorable there)


class PinGuard:
    """Forward-hook guard over a fixed set of neurons (see module docstring)."""

    def __init__(
        self,
        profiles: dict[str, PinProfile],
        restorable: tuple[Neuron, ...],
        clamp_only: tuple[Neuron, ...],
        first_position: tuple[Neuron, ...] = (),
    ):
        self.profiles = profiles
        self.restorable = restorable  # always-on or first-position: a vanished value is put back
        self.clamp_only = clamp_only
        self.first_position = first_position  # the restorable ones restored at the first position only
        self._at_start = True  # the current forward begins at position 0 (set by a pre-hook)
        # per device: (2,) long = [interventions, restorations]; summed on the device, read on demand,
        # so a forward never waits for the host
        self._counts: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def from_fingerprint(
        fp,
        *,
        neurons: str = "critical",
        floor: float = 0.5,
        ceiling: float = 4.0,
        steady: float = 0.5,
        sink_ratio: float = 10.0,
    ) -> "PinGuard":
        """Guard every attack's set (`neurons="critical"`: the paper's sets and each portfolio attack's; what
        `guard monitor --protect` installs) or every neuron the fingerprint records (`"all"`: also the top-R of
        every ranking; what `guard harden --strategy pin` measures, see docs/defenses.md for its false triggers)."""
        records = [r for r in fp.neurons if r.critical or r.attacks] if neurons == "critical" else list(fp.neurons)
        by_module: dict[str, list] = {}
        for r in records:
            by_module.setdefault(r.neuron.module, []).append(r)
        profiles, restorable, clamp_only, first_position = {}, [], [], []
        for module, rs in by_module.items():
            rs = sorted(rs, key=lambda r: r.neuron.channel)
            mean = torch.tensor([r.baseline.mean for r in rs], dtype=torch.float32)
            mean_abs = torch.tensor([r.baseline.mean_abs for r in rs], dtype=torch.float32)
            max_abs = torch.tensor([r.baseline.max_abs for r in rs], dtype=torch.float32)
            # always-on: typical magnitude close to the peak, and a stable sign (|mean| ~ mean |a|); with the
            # smallest |a| seen (newer fingerprints) "vanished" means below floor x that, so no probe position triggers
            min_abs = torch.tensor([_or(r.baseline.min_abs, r.baseline.mean_abs) for r in rs], dtype=torch.float32)
            steady_mask = (
                (mean_abs >= steady * max_abs) & (mean.abs() >= steady * mean_abs) & (max_abs > 0) & (min_abs > 0)
            )
            vanish_below = floor * torch.minimum(mean_abs, min_abs)
            first, first_floor = _first_position(rs, steady=steady, sink_ratio=sink_ratio, floor=floor)
            sink_mask = (first_floor > 0) & ~steady_mask
            for r, ok, sink in zip(rs, steady_mask.tolist(), sink_mask.tolist()):
                (restorable if ok or sink else clamp_only).append(r.neuron)
                if sink:
                    first_position.append(r.neuron)
            profiles[module] = PinProfile(
                module,
                torch.tensor([r.neuron.channel for r in rs], dtype=torch.long),
                mean,
                torch.where(steady_mask, vanish_below, torch.zeros_like(mean_abs)),
                torch.where(
                    max_abs > 0, ceiling * max_abs, torch.full_like(max_abs, math.inf)
                ),  # never seen: no ceiling
                torch.where(sink_mask, first, mean),
                torch.where(sink_mask, first_floor, torch.zeros_like(first_floor)),
            )
        return PinGuard(profiles, tuple(restorable), tuple(clamp_only), tuple(first_position))

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
        root = getattr(model, "base_model", model)  # every forward (model() or model.base_model()) passes here
        handle = root.register_forward_pre_hook(self._note_start, with_kwargs=True)
        try:
            with hooks(model, {m: self._fn(p) for m, p in self.profiles.items()}):
                yield self
        finally:
            handle.remove()

    def _note_start(self, module, args, kwargs):
        """Pre-hook: does this forward begin at position 0 (no KV cache filled yet)?"""
        self._at_start = _starts_at_zero(kwargs)

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
                    profile.first.to(output.device, output.dtype),
                    profile.first_floor.to(output.device, torch.float32),
                )
            idx, mean, floor, ceiling, first, first_floor = cache[key]
            a = output[..., idx]  # (B, T, k)
            if self._at_start and a.dim() == 3 and a.shape[1] > 0 and bool((first_floor > 0).any()):
                T = a.shape[1]
                floor = floor.expand(T, -1).clone()  # (T, k): position 0 uses the first-position floor
                floor[0] = torch.maximum(floor[0], first_floor)
                restore = mean.expand(T, -1).clone()  # (T, k)
                restore[0] = torch.where(first_floor > 0, first, mean)
            else:
                restore = mean
            mag = a.float().abs()
            vanished = mag < floor  # (B, T, k)
            blown = ~(mag <= ceiling)  # also catches nan
            hit = vanished | blown
            # copysign: a NaN keeps its sign bit and becomes ±ceiling; untouched values keep their bits
            fixed = torch.where(hit, torch.where(vanished, restore, torch.copysign(ceiling.to(a.dtype), a)), a)
            hits = torch.stack([hit.sum(), vanished.sum()])  # (2,) on the output's device
            previous = self._counts.get(hits.device)
            self._counts[hits.device] = hits if previous is None else previous + hits
            if torch.is_grad_enabled() and output.requires_grad:
                output = output.clone()
            output[..., idx] = fixed
            return output

        return pin


def _or(value, default):
    return default if value is None else value


def _first_position(records, *, steady: float, sink_ratio: float, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-position mean, first-position floor) per record, (k,) each; floor 0 where the neuron has no
    stable, dominant first-position value (or the fingerprint predates the per-position profile)."""
    first, first_floor = [], []
    for r in records:
        b = r.baseline
        known = None not in (b.first_mean, b.first_min_abs, b.first_max_abs, b.rest_max_abs)
        ok = (
            known
            and b.first_max_abs > 0
            and b.first_min_abs >= steady * b.first_max_abs  # the same magnitude on every probe
            and abs(b.first_mean) >= steady * b.first_max_abs  # and the same sign
            and b.first_min_abs >= sink_ratio * b.rest_max_abs
        )  # far above every later position
        first.append(b.first_mean if known else b.mean)
        first_floor.append(floor * b.first_min_abs if ok else 0.0)
    return torch.tensor(first, dtype=torch.float32), torch.tensor(first_floor, dtype=torch.float32)


def _starts_at_zero(kwargs: dict) -> bool:
    """From the cache's length (a host-side int: no device sync); cache_position only without a cache."""
    past = kwargs.get("past_key_values")
    if past is not None:
        length = getattr(past, "get_seq_length", None)
        return (length() == 0) if length is not None else len(past) == 0
    position = kwargs.get("cache_position")
    if position is not None and position.numel():
        return int(position.reshape(-1)[0]) == 0
    return True


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


class PinDefense:
    """`--strategy pin`: the runtime guard (what `guard monitor --protect` installs); no checkpoint."""

    name = "pin"
    kind = "runtime"

    def check(self, request, fp) -> None:
        pass

    def apply(self, step):
        from dataclasses import replace

        from achilles_guard.defenses.base import Applied

        guard = PinGuard.from_fingerprint(step.fp, neurons="all")
        details = {
            "neurons": "all",
            "runtime_guard": True,
            "restorable": [str(n) for n in guard.restorable],
            "first_position": [str(n) for n in guard.first_position],
            "clamp_only": [str(n) for n in guard.clamp_only],
            "note": "pin is a runtime guard: load the model and install "
            "achilles_guard.defenses.pin.PinGuard.from_fingerprint(fp) (or guard monitor --protect)",
        }
        return Applied(replace(step.lm, model=PinnedModel(step.lm.model, guard)), None, True, details)


DEFENSE = PinDefense()
