"""Live activation monitoring of the fingerprinted neurons, with Prometheus metrics.

    monitor = ActivationMonitor(lm.model, fingerprint, registry=CollectorRegistry(), tokenizer=lm.tokenizer)
    with monitor:                      # or monitor.attach() ... monitor.detach()
        model.generate(...)            # every forward updates the metrics
        monitor.check_integrity()      # re-hash the producing weight slices now
        monitor.run_canary()           # the probe text through the model: Δ vs baseline
        monitor.state()                # MonitorState snapshot (healthy, score, ...)

Per forward, a hook on each module holding fingerprinted neurons reads only those channels
(`output[..., idx]`, shape (B, T, k)) and keeps two numbers per neuron: mean |a| and max |a| over
the batch and positions. When the last monitored module has reported, the forward is scored
against the fingerprint's baselines, vectorised over all K monitored neurons:

- **collapse / surge**: a critical neuron that is on at every position in the baseline
  (mean |a| ≥ ½ max |a|) must keep mean |a| within a factor `drift_factor` of its baseline;
- **massive_missing**: a neuron whose baseline max |a| is massive (≥ `massive_factor` × the median
  of the monitored neurons) must keep max |a| above baseline / `drift_factor` — on every forward
  when it is always on, on prefill forwards (T ≥ 2) only when it fires on a few positions (a
  first-token attention sink is absent from single-token decode steps).

`guard_anomaly_score` is how many orders of magnitude the worst neuron lies beyond the drift factor
(0 = normal). Hooks enter the model only through `masking.hooks`.

**Protection** (`guard=PinGuard`, `guard monitor --protect`): `attach` installs the monitor's
read-only hooks first and the pin guard's hooks after them. PyTorch runs a module's forward
hooks in registration order, so on a module holding critical neurons the monitor copies the raw
activations (a tampered neuron still reads as collapsed: the score, the ratio gauges and the
alerts fire) and only then does the guard restore them for everything downstream (the served
logits, and the canary, which therefore measures what clients get). The other order would hide
the attack from the activation checks; only the weight integrity check would still see it.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np
import torch

from achilles_guard.engine.masking import hooks
from achilles_guard.errors import InputError, UsageError
from achilles_guard.monitor.canary import Canary, CanaryResult
from achilles_guard.monitor.metrics import MonitorMetrics
from achilles_guard.monitor.runtime_integrity import RuntimeIntegrityChecker, RuntimeIntegrityResult

__all__ = ["ActivationMonitor", "MonitorConfig", "ForwardReading", "MonitorState"]

_SCORE_CAP = 99.0  # orders of magnitude; a non-finite activation scores this


@dataclass(frozen=True)
class MonitorConfig:
    drift_factor: float = 10.0  # factor either way a neuron may drift before it is anomalous
    massive_factor: float = 20.0  # "massive": baseline max|a| >= this × median of the monitored set
    always_on_fraction: float = 0.5  # baseline mean|a| >= this × max|a|: present at every position
    integrity_interval_s: float = 30.0  # background re-hash period (0 = only on demand)
    canary_interval_s: float = 0.0  # background canary period (0 = only on demand)

    def validated(self) -> "MonitorConfig":
        if not self.drift_factor > 1.0:
            raise UsageError(f"--drift-factor must be > 1 (a factor; got {self.drift_factor})")
        if not self.massive_factor > 1.0:
            raise UsageError(f"--massive-factor must be > 1 (got {self.massive_factor})")
        if self.integrity_interval_s < 0 or self.canary_interval_s < 0:
            raise UsageError("check intervals must be >= 0 seconds (0 = only on demand)")
        return self


@dataclass(frozen=True)
class ForwardReading:
    """The scoring of one forward pass."""

    score: float  # orders of magnitude beyond tolerance, worst neuron (0 = normal)
    anomalous: tuple[str, ...]  # neurons out of tolerance, as "module[channel]"
    kinds: tuple[str, ...]  # anomaly kinds present
    positions: int  # T of this forward


@dataclass(frozen=True)
class MonitorState:
    forwards: int
    last: ForwardReading | None
    integrity: RuntimeIntegrityResult | None
    canary: CanaryResult | None
    interventions: int | None = None  # values the pin guard changed so far; None without protection

    @property
    def healthy(self) -> bool:
        """False when the weights differ from the fingerprint or the canary collapsed."""
        return (self.integrity is None or self.integrity.ok) and (self.canary is None or self.canary.ok)


class _NeuronTable:
    """The fingerprinted neurons grouped by module, baselines as (K,) tensors in module order."""

    def __init__(self, fingerprint, config: MonitorConfig):
        per_module: dict[str, list] = {}
        for record in fingerprint.neurons:
            per_module.setdefault(record.neuron.module, []).append(record)
        self.modules = tuple(per_module)
        self.channels = {
            m: torch.tensor([r.neuron.channel for r in rs], dtype=torch.long) for m, rs in per_module.items()
        }
        records = [r for m in self.modules for r in per_module[m]]
        self.names = tuple(str(r.neuron) for r in records)
        self.mean_abs = np.array([r.baseline.mean_abs for r in records], dtype=np.float64)  # (K,)
        self.max_abs = np.array([r.baseline.max_abs for r in records], dtype=np.float64)  # (K,)
        critical = np.array([r.critical for r in records], dtype=bool)
        always_on = (self.mean_abs >= config.always_on_fraction * self.max_abs) & (self.max_abs > 0)
        median = float(np.median(self.max_abs)) if records else 0.0
        massive = (self.max_abs >= config.massive_factor * median) & (self.max_abs > 0)
        self.ratio_checked = critical & always_on  # (K,)
        self.max_every = massive & always_on & ~critical  # (K,)
        self.max_prefill = (critical | massive) & ~always_on & (self.max_abs > 0)  # (K,)
        self.eps = 1e-6 * float(self.max_abs.max()) + 1e-12 if records else 1e-12
        self.critical_index = np.flatnonzero(critical)
        self.critical_names = tuple(self.names[i] for i in self.critical_index)


class ActivationMonitor:
    """Watches a model's fingerprinted neurons; see the module docstring.

    `registry` is where the metrics live (a fresh `CollectorRegistry()` in tests, never the global
    one by default). `lock` serialises the monitor's own forwards (canary) with the caller's;
    serving code should hold `monitor.lock` around its model calls. `served` (monitor.served.ServedWeights):
    the parameters a serving engine repacked into its kernels, which the integrity check reads back through them.
    """

    def __init__(self, model, fingerprint, *, registry, tokenizer=None, config: MonitorConfig | None = None,
                 model_name: str = "model", config_sha256: str | None = None, lock=None, guard=None,
                 positions=None, served=None):
        self.config = (config or MonitorConfig()).validated()
        if config_sha256 is not None and config_sha256 != fingerprint.config_sha256:
            raise InputError(
                f"fingerprint {fingerprint.path} was taken from another model (config sha256 "
                f"{fingerprint.config_sha256[:12]}…, this model {config_sha256[:12]}…); run guard scan on this model"
            )
        for module in {r.neuron.module for r in fingerprint.neurons}:
            try:
                model.get_submodule(module)
            except AttributeError:
                raise InputError(
                    f"fingerprint {fingerprint.path}: module {module} is not in this model; it belongs to another model"
                ) from None
        self.model = model
        self.fingerprint = fingerprint
        self.metrics = MonitorMetrics(registry, model=model_name)
        self.lock = lock or threading.RLock()
        self._table = _NeuronTable(fingerprint, self.config)
        self._integrity = RuntimeIntegrityChecker(model, fingerprint, served)
        self._canary = Canary(model, tokenizer, fingerprint) if tokenizer is not None else None
        self._local = threading.local()
        self._state_lock = threading.Lock()
        self._forwards = 0
        self._last: ForwardReading | None = None
        self._last_integrity: RuntimeIntegrityResult | None = None
        self._last_canary: CanaryResult | None = None
        self._stack: ExitStack | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # `positions(T)` -> the positions the scoring counts for a forward whose watched tensor has T rows. A
        # serving engine that flattens its batch into tokens (vLLM: (num_tokens, C)) passes one that says 1 for
        # a decode step however many sequences it batches, so prefill-only checks do not run on decode steps.
        self._positions = positions
        self.guard = guard
        if guard is not None:
            for module in guard.profiles:
                try:
                    model.get_submodule(module)
                except AttributeError:
                    raise InputError(f"pin guard: module {module} is not in this model") from None
            self.metrics.protect(guard)
        self.metrics.monitored.set(len(self._table.names))
        self._ratio_gauges = tuple(self.metrics.ratio(name) for name in self._table.critical_names)
        for gauge in self._ratio_gauges:
            gauge.set(1.0)

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self, *, background: bool = False) -> "ActivationMonitor":
        """Install the hooks (idempotent); `background=True` also starts the periodic checks."""
        if self._stack is None:
            stack = ExitStack()
            stack.enter_context(hooks(self.model, {m: self._hook(m) for m in self._table.modules}))
            if self.guard is not None:  # after the monitor's hooks: see the module docstring
                stack.enter_context(self.guard.installed(self.model))
            self._stack = stack
        if background and self._thread is None and (self.config.integrity_interval_s or self.config.canary_interval_s):
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="guard-monitor", daemon=True)
            self._thread.start()
        return self

    def detach(self) -> None:
        """Stop the periodic checks and remove every hook."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> "ActivationMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def has_canary(self) -> bool:
        return self._canary is not None

    @property
    def attached(self) -> bool:
        return self._stack is not None

    # -- checks ----------------------------------------------------------------------------

    def check_integrity(self) -> RuntimeIntegrityResult:
        """Re-hash the in-memory producing slices now and update the integrity metrics."""
        result = self._integrity.check()
        m = self.metrics
        m.integrity_checks.inc()
        m.integrity_ok.set(1 if result.ok else 0)
        m.mismatched.set(len(result.mismatched))
        m.integrity_time.set(result.timestamp)
        with self._state_lock:
            self._last_integrity = result
        return result

    def run_canary(self) -> CanaryResult:
        """Run the fingerprint's probe text through the model (holding `lock`) and compare its loss."""
        if self._canary is None:
            raise UsageError("the canary needs the model's tokenizer: pass tokenizer= to ActivationMonitor")
        with self.lock:
            result = self._canary.run()
        m = self.metrics
        m.canary_runs.inc()
        m.canary_delta.set(result.delta_log10)
        m.canary_ok.set(1 if result.ok else 0)
        with self._state_lock:
            self._last_canary = result
        return result

    def state(self) -> MonitorState:
        with self._state_lock:
            state = MonitorState(self._forwards, self._last, self._last_integrity, self._last_canary)
        return state if self.guard is None else replace(state, interventions=self.guard.interventions)

    # -- per-forward path ------------------------------------------------------------------

    def _hook(self, module: str):
        idx_cpu = self._table.channels[module]
        cache: dict = {}
        n_modules = len(self._table.modules)
        local = self._local

        def read(output):
            t0 = time.perf_counter()
            out = output if isinstance(output, torch.Tensor) else output[0]
            idx = cache.get(out.device)
            if idx is None:
                idx = cache[out.device] = idx_cpu.to(out.device)
            pending = getattr(local, "pending", None)
            if pending is None:
                pending = local.pending = {}
                local.spent = 0.0
            pending[module] = out.detach()[..., idx]  # (B, T, k): a copy of only the watched channels
            local.spent += time.perf_counter() - t0
            if len(pending) == n_modules:
                self._finish(pending)
            return None

        return read

    def _finish(self, pending: dict) -> None:
        t0 = time.perf_counter()
        table, local = self._table, self._local
        parts = [pending[m] for m in table.modules]
        pending.clear()
        device = parts[0].device
        watched = torch.cat([p.to(device).reshape(-1, p.shape[-1]) for p in parts], dim=-1).abs_()  # (B*T, K)
        stats = (
            torch.stack([watched.mean(0, dtype=torch.float32), watched.amax(0).float()]).cpu().double().numpy()
        )  # (2, K)
        positions = parts[0].shape[-2] if parts[0].dim() >= 2 else 1
        if self._positions is not None:
            positions = self._positions(positions)
        reading = _score(table, stats[0], stats[1], positions, math.log10(self.config.drift_factor))
        m = self.metrics
        m.forward_passes.inc()
        m.score.set(reading.score)
        m.anomalous.set(len(reading.anomalous))
        for kind in reading.kinds:
            m.anomalies[kind].inc()
        if len(table.critical_index):
            ratios = (
                (stats[0][table.critical_index] + table.eps) / (table.mean_abs[table.critical_index] + table.eps)
            ).tolist()
            for gauge, ratio in zip(self._ratio_gauges, ratios):
                gauge.set(ratio if ratio == ratio else math.inf)
        with self._state_lock:
            self._forwards += 1
            self._last = reading
        m.overhead.observe(local.spent + time.perf_counter() - t0)
        local.spent = 0.0

    def _loop(self) -> None:
        cfg = self.config
        next_integrity = time.monotonic() if cfg.integrity_interval_s else math.inf
        next_canary = time.monotonic() if cfg.canary_interval_s and self._canary is not None else math.inf
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_integrity:
                self.check_integrity()
                next_integrity = now + cfg.integrity_interval_s
            if now >= next_canary:
                self.run_canary()
                next_canary = now + cfg.canary_interval_s
            wait = min(next_integrity, next_canary) - time.monotonic()
            self._stop.wait(max(0.05, min(wait, 1.0)))


def _score(table: _NeuronTable, mean: np.ndarray, peak: np.ndarray, positions: int, log_tol: float) -> ForwardReading:
    """Score one forward: mean and peak |a| are (K,) float64 in the table's order (numpy: tiny arrays)."""
    eps = table.eps
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.nan_to_num(np.log10((mean + eps) / (table.mean_abs + eps)), nan=np.inf)  # (K,)
        log_peak = np.nan_to_num(np.log10((peak + eps) / (table.max_abs + eps)), nan=-np.inf)  # (K,)
    collapse = table.ratio_checked & (log_ratio < -log_tol)
    surge = table.ratio_checked & (log_ratio > log_tol)
    peak_checked = table.max_every | table.max_prefill if positions >= 2 else table.max_every
    missing = peak_checked & (log_peak < -log_tol)
    excess = np.concatenate([
        np.where(table.ratio_checked, np.abs(log_ratio) - log_tol, 0.0),
        np.where(peak_checked, -log_peak - log_tol, 0.0),
    ]).clip(0.0, _SCORE_CAP)  # (2K,)
    kinds = tuple(k for k, hit in (("collapse", collapse), ("surge", surge), ("massive_missing", missing)) if hit.any())
    names = tuple(table.names[i] for i in np.flatnonzero(collapse | surge | missing)) if kinds else ()
    return ForwardReading(float(excess.max()) if excess.size else 0.0, names, kinds, positions)
