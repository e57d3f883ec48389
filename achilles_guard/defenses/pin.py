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
says so (`PinGuard.clamp_only`).

- **exact** (weight-backed): a neuron whose producing weights the fingerprint stores is recomputed from
  the module's own input, in float32, whatever its shape: a Linear output channel (`down_proj`,
  `o_proj`, `q_proj`... row) as `x @ w (+ b)`; an RMSNorm / LayerNorm channel as `norm(x)[c] * (w + o)
  (+ b)` (o = 1 for Gemma's norms); an MLP unit (`act_fn[c]`) as `act(input[c])`, with exact rules on the
  `gate_proj` / `up_proj` rows that feed it too (a real tamper zeroes those rows, not the activation).
  Where the output differs from the recomputed value by more than its rounding bound `rtol x (|x| @ |w|
  + |b|)` (rtol 1e-4 in float32, 4e-3 in float16, 3e-2 in bfloat16), the recomputed value is put back:
  a zeroed, scaled, sign-flipped or perturbed neuron is restored exactly, at every position, with any
  input. This covers every fingerprinted neuron with stored weights, in both `neurons` modes: it cannot
  trigger on clean inputs beyond rounding, so it never changes an untampered output (`PinGuard.exact`).

Left-padded batches are not supported by the first-position rule
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
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn

from achilles_guard.engine.masking import hooks, reads_input
from achilles_guard.engine.neurons import Neuron

__all__ = ["ExactRule", "PinProfile", "PinGuard", "PinnedModel"]


@dataclass(frozen=True)
class ExactRule:
    """How one module's exact neurons are recomputed from its input (see the module docstring)."""

    kind: str  # "linear" | "norm" | "elementwise"
    positions: torch.Tensor  # long (j,): positions in the profile's `channels`
    weight: torch.Tensor | None = None  # linear: (j, d_in) rows; norm: (j,) gains (+ the offset o); float32
    bias: torch.Tensor | None = None  # (j,) float32, or None


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
    exact: ExactRule | None = None  # the neurons of this module recomputed from the module's input


class PinGuard:
    """Forward-hook guard over a fixed set of neurons (see module docstring)."""

    def __init__(
        self,
        profiles: dict[str, PinProfile],
        restorable: tuple[Neuron, ...],
        clamp_only: tuple[Neuron, ...],
        first_position: tuple[Neuron, ...] = (),
        exact: tuple[Neuron, ...] = (),
    ):
        self.profiles = profiles
        self.exact = exact  # recomputed from their fingerprinted weight rows (any shape, any input)
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
        recompute: bool = True,
    ) -> "PinGuard":
        """Guard every attack's set (`neurons="critical"`: the paper's sets and each portfolio attack's; what
        `guard monitor --protect` installs) or every neuron the fingerprint records (`"all"`: also the top-R of
        every ranking; what `guard harden --strategy pin` measures, see docs/defenses.md for its false triggers)
        with the profile rules; with `recompute`, every fingerprinted neuron whose producing Linear row is stored
        is guarded by the exact rule instead, in both modes."""
        ruled = [r for r in fp.neurons if r.critical or r.attacks] if neurons == "critical" else list(fp.neurons)
        specs = _exact_specs(fp) if recompute else {}
        ruled_set = {r.neuron for r in ruled}
        records = {r.neuron: r for r in ruled}
        for r in fp.neurons:
            if r.neuron in specs:
                records.setdefault(r.neuron, r)
        by_module: dict[str, list] = {}
        for n in dict.fromkeys([*records, *specs]):  # a fixed order: the fingerprint's, then the norms'
            by_module.setdefault(n.module, []).append(n)
        profiles, restorable, clamp_only, first_position, exact = {}, [], [], [], []
        for module, ns in by_module.items():
            ns = sorted(ns, key=lambda n: n.channel)
            rs = [records.get(n) or _no_record(n) for n in ns]
            mean = torch.tensor([r.baseline.mean for r in rs], dtype=torch.float32)
            mean_abs = torch.tensor([r.baseline.mean_abs for r in rs], dtype=torch.float32)
            max_abs = torch.tensor([r.baseline.max_abs for r in rs], dtype=torch.float32)
            # always-on: typical magnitude close to the peak, and a stable sign (|mean| ~ mean |a|); with the
            # smallest |a| seen (newer fingerprints) "vanished" means below floor x that, so no probe position triggers
            min_abs = torch.tensor([_or(r.baseline.min_abs, r.baseline.mean_abs) for r in rs], dtype=torch.float32)
            # the profile rules apply to the neurons `neurons` selects that have no exact rule
            profiled = torch.tensor([n in ruled_set and n not in specs for n in ns], dtype=torch.bool)
            steady_mask = (
                (mean_abs >= steady * max_abs) & (mean.abs() >= steady * mean_abs) & (max_abs > 0) & (min_abs > 0)
            ) & profiled
            vanish_below = floor * torch.minimum(mean_abs, min_abs)
            first, first_floor = _first_position(rs, steady=steady, sink_ratio=sink_ratio, floor=floor)
            sink_mask = (first_floor > 0) & ~steady_mask & profiled
            for n, ok, sink, ruled_here in zip(ns, steady_mask.tolist(), sink_mask.tolist(), profiled.tolist()):
                if n in specs:
                    exact.append(n)
                elif ok or sink:
                    restorable.append(n)
                    if sink:
                        first_position.append(n)
                elif ruled_here:
                    clamp_only.append(n)
            rule = _exact_rule([specs.get(n) for n in ns])
            profiles[module] = PinProfile(
                module,
                torch.tensor([r.neuron.channel for r in rs], dtype=torch.long),
                mean,
                torch.where(steady_mask, vanish_below, torch.zeros_like(mean_abs)),
                torch.where(
                    (max_abs > 0) & profiled, ceiling * max_abs, torch.full_like(max_abs, math.inf)
                ),  # never seen, or recomputed instead: no ceiling
                torch.where(sink_mask, first, mean),
                torch.where(sink_mask, first_floor, torch.zeros_like(first_floor)),
                rule,
            )
        return PinGuard(profiles, tuple(restorable), tuple(clamp_only), tuple(first_position), tuple(exact))

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

    @property
    def restored(self) -> tuple[Neuron, ...]:
        """Every neuron whose vanished value the guard puts back (exact, always-on, first-position)."""
        return (*self.exact, *self.restorable)

    @staticmethod
    def _prepare(profile: PinProfile, output: torch.Tensor):
        """Device copies for one output: (profile-rule tensors or None, exact rule or None, its channels, whether
        it covers every channel of the output in order)."""
        dev, dtype = output.device, output.dtype
        k = profile.channels.numel()
        exact_at = torch.zeros(k, dtype=torch.bool)
        rule = profile.exact
        if rule is not None:
            exact_at[rule.positions] = True
        # the profile rules act on the other channels; a channel with neither rule has floor 0 and no ceiling
        keep = ~exact_at & ((profile.floor > 0) | torch.isfinite(profile.ceiling) | (profile.first_floor > 0))
        profiled = None
        if bool(keep.any()):
            profiled = (
                profile.channels[keep].to(dev),
                profile.mean[keep].to(dev, dtype),
                profile.floor[keep].to(dev, torch.float32),
                profile.ceiling[keep].to(dev, torch.float32),
                profile.first[keep].to(dev, dtype),
                profile.first_floor[keep].to(dev, torch.float32),
            )
        if rule is None:
            return profiled, None, None, False
        channels = profile.channels[rule.positions]
        whole = channels.numel() == output.shape[-1] and bool((channels == torch.arange(channels.numel())).all())
        rule = replace(
            rule,
            positions=rule.positions.to(dev),
            weight=None if rule.weight is None else rule.weight.to(dev),
            bias=None if rule.bias is None else rule.bias.to(dev),
        )
        return profiled, rule, channels.to(dev), whole

    def _profile_rules(self, output, idx, mean, floor, ceiling, first, first_floor):
        """(fixed values, hit, vanished) of the profile-ruled channels `idx`, each (..., k)."""
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
        return fixed, hit, vanished

    def _fn(self, profile: PinProfile):
        cache: dict = {}

        @reads_input
        def pin(output, inputs: torch.Tensor | None, module: nn.Module):
            if isinstance(output, tuple):  # a serving engine's module: vLLM's linears return (output, bias), its
                # norms (output, residual) after adding the residual, which is not their first input: a norm's
                # value is then not recomputable from what the hook sees, and only its profile rules apply
                return (restore(output[0], inputs, module, fused=True), *output[1:])
            return restore(output, inputs, module)

        def restore(output: torch.Tensor, inputs: torch.Tensor | None, module: nn.Module, fused: bool = False):
            key = (output.device, output.dtype, output.shape[-1])
            if key not in cache:
                cache[key] = self._prepare(profile, output)
            profiled, rule, exact_channels, whole = cache[key]
            counts = []
            if torch.is_grad_enabled() and output.requires_grad:
                output = output.clone()
            if profiled is not None:
                fixed, hit, vanished = self._profile_rules(output, *profiled)
                output[..., profiled[0]] = fixed
                counts += [hit.sum(), vanished.sum()]
            recomputed = None
            if rule is not None and not (fused and rule.kind != "linear"):
                recomputed = _recompute(rule, exact_channels, inputs, module, output)
            if recomputed is not None:
                expected, tolerance = recomputed
                got = output if whole else output[..., exact_channels]
                wrong = ~((got.float() - expected).abs() <= tolerance)  # nan: wrong
                put = torch.where(wrong, expected.to(output.dtype), got)  # untouched values keep their bits
                if whole:
                    output = put
                else:
                    output[..., exact_channels] = put
                n = wrong.sum()
                counts += [n, n]
            if counts:
                hits = torch.stack([sum(counts[0::2]), sum(counts[1::2])])  # (2,) on the output's device
                previous = self._counts.get(hits.device)
                self._counts[hits.device] = hits if previous is None else previous + hits
            return output

        return pin


# rounding bound of a recomputed dot product, relative to sum |x_i w_i|, per output dtype
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _recompute(rule: ExactRule, channels: torch.Tensor, inputs, module: nn.Module, output: torch.Tensor):
    """(expected, tolerance) of the rule's channels, float32 (..., j): the rounding bound rtol x (sum of |terms|),
    plus the output dtype's smallest normal number (x |gain| for a norm: float16 rounds a tiny normalized value
    to a subnormal before the gain); None when the input does not fit."""
    if inputs is None or not isinstance(inputs, torch.Tensor) or inputs.shape[:-1] != output.shape[:-1]:
        return None
    if rule.kind == "linear":
        if inputs.shape[-1] != rule.weight.shape[1]:
            return None
        x = inputs.float()
        expected, bound = x @ rule.weight.T, x.abs() @ rule.weight.abs().T  # sum |x_i w_i|: the rounding scale
    elif rule.kind == "norm":
        n = _normalized(module, inputs)
        if n is None:
            return None
        if channels.numel() != n.shape[-1]:
            n = n[..., channels]
        expected, bound = n * rule.weight, n.abs() * rule.weight.abs()
    else:  # elementwise activation of the same channel of its input
        if inputs.shape[-1] != output.shape[-1]:
            return None
        expected = module.forward(inputs[..., channels]).float()  # forward(): no hooks (no mask, no recursion)
        bound = expected.abs()
    if rule.bias is not None:
        expected, bound = expected + rule.bias, bound + rule.bias.abs()
    tiny = torch.finfo(output.dtype).tiny if output.dtype.is_floating_point else 0.0
    floor = tiny * rule.weight.abs() if rule.kind == "norm" else tiny
    return expected, _RTOL.get(output.dtype, 1e-2) * bound + floor


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The norm's input normalized (before its gain), float32; None for a norm class guard cannot recompute."""
    if isinstance(module, nn.LayerNorm):
        return torch.nn.functional.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if "RMSNorm" in type(module).__name__ and isinstance(eps, float):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return None


# rounding bound of a recomputed value, relative to its sum of |terms|, per output dtype
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _exact_specs(fp) -> dict:
    """{neuron: (kind, weight, bias)} for every neuron whose producing weights the fingerprint stores:
    a Linear row (also the gate/up rows of a fingerprinted MLP unit), a norm gain, an MLP unit."""
    specs: dict = {}
    for module, norm in getattr(fp, "norms", {}).items():  # every channel of every scanned norm
        gain = norm.weight.float() + norm.offset
        bias = None if norm.bias is None else norm.bias.float()
        if bool(torch.isfinite(gain).all()) and (bias is None or bool(torch.isfinite(bias).all())):
            for c in range(gain.numel()):
                specs[Neuron(module, c)] = ("norm", gain[c], None if bias is None else float(bias[c]))
    for record in fp.neurons:
        module, channel = record.neuron.module, record.neuron.channel
        parts = [(fp.slices.get(k), fp.tensors.get(k)) for k in record.slices]
        if not parts or any(sl is None or v is None or not bool(torch.isfinite(v.float()).all()) for sl, v in parts):
            continue
        if record.component.endswith("act") or record.component == "mlp_act":
            rows = [_linear_row(sl, v) for sl, v in parts]
            if all(row is not None for row in rows):
                for (sl, _), row in zip(parts, rows):
                    specs.setdefault(Neuron(sl.param[: -len(".weight")], sl.index), ("linear", row, None))
                specs[record.neuron] = ("elementwise", None, None)
            continue
        weight = bias = None
        kind = None
        for sl, v in parts:
            if sl.index != channel:
                break
            if sl.param == f"{module}.weight" and len(sl.shape) == 2:
                weight, kind = _linear_row(sl, v), "linear"
            elif sl.param == f"{module}.weight" and len(sl.shape) == 1 and v.numel() == 1:
                # a norm gain; its null value is -offset (Gemma computes x_hat * (1 + w))
                weight, kind = v.float().reshape(()) - float(sl.null_value), "norm"
            elif sl.param == f"{module}.bias" and v.numel() == 1:
                bias = float(v.float().reshape(()))
            else:
                break
        else:
            if weight is not None:
                specs[record.neuron] = (kind, weight, bias)
    return specs


def _linear_row(sl, value: torch.Tensor) -> torch.Tensor | None:
    """A Linear (out, in) row on axis 0, or GPT-2's Conv1D (in, out) column on axis 1: (d_in,) float32."""
    if not sl.param.endswith(".weight") or len(sl.shape) != 2 or value.dim() != 1:
        return None
    if (sl.axis, value.numel()) not in ((0, sl.shape[1]), (1, sl.shape[0])):
        return None
    return value.float()


def _exact_rule(specs: list) -> ExactRule | None:
    """One module's exact neurons (None entries: not exact) as one rule; a module has one kind."""
    at = [i for i, sp in enumerate(specs) if sp is not None]
    if not at:
        return None
    kinds = {specs[i][0] for i in at}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    weight = None if kind == "elementwise" else torch.stack([torch.as_tensor(specs[i][1]).float() for i in at])
    bias = None
    if any(specs[i][2] is not None for i in at):
        bias = torch.tensor([float(_or(specs[i][2], 0.0)) for i in at], dtype=torch.float32)
    return ExactRule(kind, torch.tensor(at, dtype=torch.long), weight, bias)


def _no_record(neuron: Neuron):
    """A stand-in record for a neuron guarded only through another's stored weights (an MLP unit's gate row)."""
    from achilles_guard.integrity.fingerprint import ActivationBaseline, NeuronRecord

    return NeuronRecord(neuron, -1, "", 0, 0.0, False, (), ActivationBaseline(0.0, 0.0, 0.0, 0.0))


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
    past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x names it `cache`
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
        from achilles_guard.defenses.base import Applied

        guard = PinGuard.from_fingerprint(step.fp, neurons="all")
        recorded = {r.neuron for r in step.fp.neurons}
        details = {
            "neurons": "all",
            "runtime_guard": True,
            "exact": [str(n) for n in guard.exact if n in recorded],  # fingerprinted neurons recomputed
            "exact_norms": sorted(getattr(step.fp, "norms", {})),  # and every channel of these norms
            "restorable": [str(n) for n in guard.restorable],
            "first_position": [str(n) for n in guard.first_position],
            "clamp_only": [str(n) for n in guard.clamp_only],
            "note": "pin is a runtime guard: load the model and install "
            "achilles_guard.defenses.pin.PinGuard.from_fingerprint(fp) (or guard monitor --protect)",
        }
        return Applied(replace(step.lm, model=PinnedModel(step.lm.model, guard)), None, True, details, guard.restored)


DEFENSE = PinDefense()
