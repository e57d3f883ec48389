"""Push each model's verdict of a fleet run to a Prometheus Pushgateway (`--pushgateway URL`).

One push per model, job `achilles_guard_fleet`, grouping key `model=<id>`, so a later run replaces
that model's series and a removed model's series can be deleted by id. Names follow the house rule
(docs/design.md, "Prometheus metrics") and reuse the monitor's where the meaning is the same:

| metric | value |
|---|---|
| `guard_weight_integrity_ok` | verify: 1 intact, 0 otherwise (the monitor's name: every fingerprinted slice matches) |
| `guard_build_info` | version labels (the monitor's) |
| `guard_fleet_exit_code` | the model's exit code (0 ok, 1 finding, 2 bad input, 3 runtime failure) |
| `guard_fleet_critical_neurons` | n*, the size of the smallest collapsing set (absent when none was found) |
| `guard_fleet_model_seconds` | seconds the model took in this run (0 for a cached one) |
| `guard_fleet_model_cached` | 1 when the model was skipped as unchanged |
| `guard_fleet_last_run_timestamp_seconds` | when this row was pushed |
"""

from __future__ import annotations

import platform
import time

from prometheus_client import CollectorRegistry, Gauge, Info, push_to_gateway

from achilles_guard import __version__
from achilles_guard.errors import first_line
from achilles_guard.fleet.worker import ModelResult

__all__ = ["push_results", "PUSH_JOB", "PUSHED_NAMES"]

PUSH_JOB = "achilles_guard_fleet"
PUSHED_NAMES = ("guard_weight_integrity_ok", "guard_build_info", "guard_fleet_exit_code",
                "guard_fleet_critical_neurons", "guard_fleet_model_seconds", "guard_fleet_model_cached",
                "guard_fleet_last_run_timestamp_seconds")


def _registry(command: str, r: ModelResult) -> CollectorRegistry:
    reg = CollectorRegistry()
    labels = ("command",)
    Info("guard_build", "achilles-guard build and runtime versions.", registry=reg).info(
        {"version": __version__, "python": platform.python_version()})
    Gauge("guard_fleet_exit_code", "Exit code of the model's scan or verification.", labels,
          registry=reg).labels(command).set(r.exit_code)
    if r.n_star is not None:
        Gauge("guard_fleet_critical_neurons", "n*: neurons in the smallest collapsing set found.", labels,
              registry=reg).labels(command).set(r.n_star)
    Gauge("guard_fleet_model_seconds", "Seconds the model took in this fleet run.", labels,
          registry=reg).labels(command).set(0.0 if r.cached else r.seconds)
    Gauge("guard_fleet_model_cached", "1 when the model was unchanged and skipped.", labels,
          registry=reg).labels(command).set(1 if r.cached else 0)
    if command == "verify":
        Gauge("guard_weight_integrity_ok", "1 when every fingerprinted weight slice matches.",
              registry=reg).set(1 if r.exit_code == 0 else 0)
    Gauge("guard_fleet_last_run_timestamp_seconds", "When the fleet pushed this model's row.", labels,
          registry=reg).labels(command).set(time.time())
    return reg


def push_results(url: str, command: str, results: list[ModelResult], *, timeout: float = 10.0) -> list[str]:
    """Push every row; returns one error line per model whose push failed (the run's verdict stands)."""
    errors = []
    for r in results:
        try:
            push_to_gateway(url, job=PUSH_JOB, registry=_registry(command, r), grouping_key={"model": r.id},
                            timeout=timeout)
        except Exception as err:  # URLError, HTTPError, socket errors: reported, not fatal
            errors.append(f"{r.id}: {first_line(err)}")
    return errors
