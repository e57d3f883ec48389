"""Every Prometheus metric the monitor exports, on a registry the caller owns.

docs/design.md "Prometheus metrics": prefix `guard_`, base units, counters end in `_total`, bounded
labels (`model`; `neuron` only for the fixed critical set; `kind`, `endpoint`, `code` from fixed
sets), and a `guard_build_info`.

    registry = CollectorRegistry()              # never the global one in tests
    metrics = MonitorMetrics(registry, model="demo")
    metrics.forward_passes.inc()
    metrics.protect(guard)                      # guard monitor --protect: export the PinGuard's counts
"""

from __future__ import annotations

import platform

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from achilles_guard import __version__

__all__ = ["MonitorMetrics", "ANOMALY_KINDS", "ENDPOINTS", "PIN_ACTIONS", "EXPORTED_NAMES"]

ANOMALY_KINDS = ("collapse", "surge", "massive_missing")
PIN_ACTIONS = ("restore", "clamp")  # what the pin guard did to one activation value
ENDPOINTS = ("/metrics", "/healthz", "/v1/completions", "/v1/test", "other")

# Gauges in prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR: the vLLM plugin, whose worker writes
# them and whose API server serves them) aggregate over the live processes as each one's meaning asks: a health
# flag is the minimum (one unhealthy worker makes it 0), a score the maximum. Outside that mode they are ignored.
# Fine buckets: the per-forward monitor cost is tens of microseconds on CPU.
_OVERHEAD_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.05)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Sample names a scrape carries (histograms add _bucket/_sum/_count, counters _total/_created).
EXPORTED_NAMES = (
    "guard_build_info",
    "guard_forward_passes_total",
    "guard_monitored_neurons",
    "guard_critical_activation_ratio",
    "guard_activation_anomalies_total",
    "guard_anomaly_score",
    "guard_anomalous_neurons",
    "guard_weight_integrity_ok",
    "guard_weight_slices_mismatched",
    "guard_integrity_checks_total",
    "guard_integrity_last_check_timestamp_seconds",
    "guard_canary_delta_log10",
    "guard_canary_ok",
    "guard_canary_runs_total",
    "guard_monitor_overhead_seconds",
    "guard_http_requests_total",
    "guard_http_request_duration_seconds",
    "guard_http_in_flight_requests",
    "guard_completion_tokens_total",
    "guard_prompt_tokens_total",
    "guard_protection_enabled",
    "guard_pin_interventions_total",
)


class MonitorMetrics:
    """The monitor's metrics, all labelled with one `model` value, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, *, model: str = "model"):
        self.registry = registry
        self.model = model
        m = ("model",)
        kw = {"registry": registry}
        self.build_info = Info("guard_build", "achilles-guard build and runtime versions.", **kw)
        self.build_info.info({"version": __version__, "python": platform.python_version(), "torch": torch.__version__})
        self._forward_passes = Counter("guard_forward_passes_total", "Forward passes seen by the monitor.", m, **kw)
        self._monitored = Gauge(
            "guard_monitored_neurons", "Fingerprinted neurons the monitor reads on every forward.", m,
            multiprocess_mode="livemax", **kw
        )
        self._ratio = Gauge(
            "guard_critical_activation_ratio",
            "Mean |activation| of a critical neuron in the last forward over its baseline (1 = normal).",
            ("model", "neuron"), multiprocess_mode="livemostrecent", **kw,
        )
        self._anomalies = Counter(
            "guard_activation_anomalies_total",
            "Forward passes with at least one anomaly of this kind.",
            ("model", "kind"),
            **kw,
        )
        self._score = Gauge(
            "guard_anomaly_score",
            "Orders of magnitude beyond tolerance of the worst monitored neuron in the last forward (0 = normal).",
            m,
            multiprocess_mode="livemax", **kw,
        )
        self._anomalous = Gauge(
            "guard_anomalous_neurons", "Monitored neurons out of tolerance in the last forward.", m,
            multiprocess_mode="livemax", **kw
        )
        self._integrity_ok = Gauge(
            "guard_weight_integrity_ok", "1 when every fingerprinted weight slice in memory matches.", m,
            multiprocess_mode="livemin", **kw
        )
        self._mismatched = Gauge(
            "guard_weight_slices_mismatched", "Fingerprinted weight slices whose in-memory bytes differ.", m,
            multiprocess_mode="livemax", **kw
        )
        self._integrity_checks = Counter(
            "guard_integrity_checks_total", "In-memory weight integrity checks run.", m, **kw
        )
        self._integrity_time = Gauge(
            "guard_integrity_last_check_timestamp_seconds", "Unix time of the last integrity check.", m,
            multiprocess_mode="livemax", **kw
        )
        self._canary_delta = Gauge(
            "guard_canary_delta_log10",
            "Canary probe loss minus the fingerprint's baseline, in log10 perplexity.",
            m,
            multiprocess_mode="livemax", **kw,
        )
        self._canary_ok = Gauge(
            "guard_canary_ok", "1 when the last canary stayed below the collapse threshold.", m,
            multiprocess_mode="livemin", **kw
        )
        self._canary_runs = Counter("guard_canary_runs_total", "Canary probe runs.", m, **kw)
        self._overhead = Histogram(
            "guard_monitor_overhead_seconds",
            "Time the monitor adds to one forward pass.",
            m,
            buckets=_OVERHEAD_BUCKETS,
            **kw,
        )
        self._requests = Counter(
            "guard_http_requests_total",
            "HTTP requests by endpoint and status code.",
            ("model", "endpoint", "code"),
            **kw,
        )
        self._duration = Histogram(
            "guard_http_request_duration_seconds",
            "HTTP request latency.",
            ("model", "endpoint"),
            buckets=_REQUEST_BUCKETS,
            **kw,
        )
        self._in_flight = Gauge("guard_http_in_flight_requests", "Completion requests being served.", m,
        multiprocess_mode="livesum", **kw)
        self._completion_tokens = Counter(
            "guard_completion_tokens_total", "Tokens generated by /v1/completions.", m, **kw
        )
        self._prompt_tokens = Counter(
            "guard_prompt_tokens_total", "Prompt tokens processed by /v1/completions.", m, **kw
        )
        self._protection = Gauge(
            "guard_protection_enabled", "1 when the pin guard holds the critical neurons (--protect).", m,
            multiprocess_mode="livemax", **kw
        )
        self._pins = _PinCounts(model)
        self._pin_files = None  # export_pins: (restore child, clamp child, counts exported so far)
        registry.register(self._pins)
        # Bound children: one label value each, so hot paths skip the label lookup.
        self.forward_passes = self._forward_passes.labels(model)
        self.monitored = self._monitored.labels(model)
        self.anomalies = {k: self._anomalies.labels(model, k) for k in ANOMALY_KINDS}
        self.score = self._score.labels(model)
        self.anomalous = self._anomalous.labels(model)
        self.integrity_ok = self._integrity_ok.labels(model)
        self.mismatched = self._mismatched.labels(model)
        self.integrity_checks = self._integrity_checks.labels(model)
        self.integrity_time = self._integrity_time.labels(model)
        self.canary_delta = self._canary_delta.labels(model)
        self.canary_ok = self._canary_ok.labels(model)
        self.canary_runs = self._canary_runs.labels(model)
        self.overhead = self._overhead.labels(model)
        self.in_flight = self._in_flight.labels(model)
        self.completion_tokens = self._completion_tokens.labels(model)
        self.prompt_tokens = self._prompt_tokens.labels(model)
        self.protection = self._protection.labels(model)
        self.protection.set(0)
        self.integrity_ok.set(1)
        self.canary_ok.set(1)

    def protect(self, guard) -> None:
        """Export `guard`'s intervention counts (read at scrape time) and set guard_protection_enabled 1."""
        self._pins.guard = guard
        self.protection.set(1)

    def export_pins(self) -> None:
        """Move the pin guard's counts into a file-backed counter of the same family (prometheus-client's
        multiprocess mode): the scrape-time family below only reaches a /metrics served by the process that
        holds the guard, and vLLM's is served by another one. Call it from time to time; it adds the deltas."""
        guard = self._pins.guard
        if guard is None:
            return
        if self._pin_files is None:
            family = Counter(PIN_FAMILY, PIN_HELP, ("model", "action"), registry=CollectorRegistry())
            self._pin_files = (family.labels(self.model, "restore"), family.labels(self.model, "clamp"), [0, 0])
            for child in self._pin_files[:2]:
                child.inc(0)
        restore, clamp, seen = self._pin_files
        total, restored = guard.counts()
        clamped = total - restored
        restore.inc(max(0, restored - seen[0]))
        clamp.inc(max(0, clamped - seen[1]))
        seen[:] = [restored, clamped]

    def ratio(self, neuron: str):
        """The ratio gauge of one critical neuron (labels bounded by the fingerprint's critical set)."""
        return self._ratio.labels(self.model, neuron)

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        self._requests.labels(self.model, endpoint, str(code)).inc()
        self._duration.labels(self.model, endpoint).observe(seconds)


PIN_FAMILY = "guard_pin_interventions"
PIN_HELP = "Activation values (positions x neurons) the pin guard restored or clamped."


class _PinCounts(Collector):
    """guard_pin_interventions_total{model, action}: read from the PinGuard when scraped.

    The guard sums its counts on the model's device; reading them per forward would make every
    forward wait for the device, so the scrape reads them instead. Without a guard both are 0.
    """

    def __init__(self, model: str):
        self.model = model
        self.guard = None

    def collect(self):
        family = CounterMetricFamily(PIN_FAMILY, PIN_HELP, labels=("model", "action"))
        total, restored = self.guard.counts() if self.guard is not None else (0, 0)
        family.add_metric((self.model, "restore"), restored)
        family.add_metric((self.model, "clamp"), total - restored)
        yield family
