"""guard inside vLLM: a `vllm.general_plugins` entry point (pyproject), off unless ACHILLES_GUARD_FINGERPRINT is set.

vLLM calls `register()` in each of its processes (API server, engine core, worker). vLLM has no
"model loaded" hook; the plugin wraps one function, `base_loader.process_weights_after_loading`,
which every model runner (V1 and V2: vLLM 0.32 picks the V2 CPU runner for bfloat16, V1 for
float32) reaches through `BaseModelLoader.load_model` once the checkpoint is in memory and before
vLLM repacks it. In the worker (docs/monitor.md "Production path: the vLLM plugin"):

1. verifies the weights vLLM actually loaded, in memory: every tensor against the fingerprint's
   records (records.check_tensors over a LiveSource: sha256 of the exact bytes when the dtype is the
   checkpoint's, else the row sketch within rounding) and every fingerprinted slice
   (RuntimeIntegrityChecker), through vLLM's fused parameters (vllm_map, from the model class's
   `packed_modules_mapping`). A finding, or a fingerprint that cannot be used, stops the server with
   one line on stderr (fail closed, exit 1 for a finding, 2 for bad input); ACHILLES_GUARD_FAIL_OPEN=1
   serves anyway with guard_weight_integrity_ok 0;
2. watches the fingerprinted neurons on every prefill and decode batch (ActivationMonitor: same
   thresholds and anomaly score as `guard monitor`; a batch counts as a prefill when it holds a token
   at position 0, read from the rotary embedding's input);
3. re-checks in a background thread: the slices every ACHILLES_GUARD_INTEGRITY_INTERVAL seconds, the
   whole model every ACHILLES_GUARD_FULL_INTERVAL seconds. vLLM packs the linear weights into its
   kernels (oneDNN on a CPU) and leaves `weight` empty; those are read back through the kernels
   themselves (monitor.served: the identity through a linear kernel returns its weights bit for bit),
   so the bytes that are served are the bytes re-checked, at vLLM's full speed;
4. with ACHILLES_GUARD_PROTECT=1, protects: the pin guard (defenses.pin) recomputes every fingerprinted
   neuron with stored weights from the fingerprint's own weights and the module's input, on vLLM's
   flattened (tokens, channels) batches, so a zeroed or flipped critical weight serves the intact
   values while the integrity and activation alarms still fire (guard_pin_interventions_total counts);
5. exports the guard's metric families through prometheus-client's multiprocess mode: with
   PROMETHEUS_MULTIPROC_DIR exported before vLLM starts, they appear on vLLM's own /metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["register", "Settings", "KNOWN_VLLM_VERSIONS"]

KNOWN_VLLM_VERSIONS = ("0.32.0",)  # versions whose loader this wrapper was written against
PREFIX = "achilles-guard:"
_ENV = "ACHILLES_GUARD_"
_registered = False


def _say(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(_ENV + name, "").strip().lower() in ("1", "true", "yes", "on")


def _seconds(name: str, default: float) -> float:
    from achilles_guard.errors import UsageError

    raw = os.environ.get(_ENV + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{_ENV}{name}={raw!r}: not a number of seconds") from None
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"{_ENV}{name}={raw!r}: must be >= 0 seconds (0 = off)")
    return value


@dataclass(frozen=True)
class Settings:
    fingerprint: str
    fail_open: bool = False
    verify_key: str | None = None  # file or env:VAR, as guard's --verify-key
    integrity_interval_s: float = 30.0  # fingerprinted slices (a few KB a neuron)
    full_interval_s: float = 300.0  # every tensor (the whole model: ~0.5 s a GB of hashing); 0 = at start only
    drift_factor: float = 10.0
    massive_factor: float = 20.0
    model_name: str | None = None
    protect: bool = False  # the pin guard: fingerprinted neurons recomputed from their fingerprinted weights
    test_flip_file: str | None = None  # TEST ONLY: negate one critical weight in memory once this file exists

    @staticmethod
    def from_env() -> "Settings":
        from achilles_guard.monitor.activation import MonitorConfig

        d = MonitorConfig()
        return Settings(
            fingerprint=os.environ[_ENV + "FINGERPRINT"],
            fail_open=_flag("FAIL_OPEN"),
            verify_key=os.environ.get(_ENV + "VERIFY_KEY") or None,
            integrity_interval_s=_seconds("INTEGRITY_INTERVAL", 30.0),
            full_interval_s=_seconds("FULL_INTERVAL", 300.0),
            drift_factor=_seconds("DRIFT_FACTOR", d.drift_factor),
            massive_factor=_seconds("MASSIVE_FACTOR", d.massive_factor),
            model_name=os.environ.get(_ENV + "MODEL_NAME") or None,
            protect=_flag("PROTECT"),
            test_flip_file=os.environ.get(_ENV + "TEST_FLIP_FILE") or None,
        )


def register() -> None:
    """vLLM's general-plugin entry point: wrap the weight loader's post-processing step (once per process)."""
    global _registered
    if _registered or not os.environ.get(_ENV + "FINGERPRINT"):
        return  # unconfigured: vLLM runs exactly as without guard
    _registered = True
    _join_lineage()
    try:
        import vllm
        import vllm.model_executor.model_loader.base_loader as base_loader
    except Exception as err:  # any import failure: one line, fail closed
        _refuse(f"cannot hook vLLM's model loader ({type(err).__name__}: {str(err).splitlines()[0][:200]})", 3)
        return
    version = getattr(vllm, "__version__", "?")
    if version not in KNOWN_VLLM_VERSIONS:
        _say(f"vLLM {version} is not a version this plugin knows ({', '.join(KNOWN_VLLM_VERSIONS)}); wrapping "
             "base_loader.process_weights_after_loading anyway - check that the guard's start-up line appears")
    original = getattr(base_loader, "process_weights_after_loading", None)
    if original is None:
        _refuse(f"vLLM {version} has no base_loader.process_weights_after_loading: the loaded weights cannot be "
                "verified", 3)
        return
    if getattr(original, "_achilles_guard", False):
        return

    def process_weights_after_loading(model, model_config, *args, **kwargs):
        # every model runner (V1 and V2, CPU and GPU) loads through BaseModelLoader.load_model, which calls this
        # once the checkpoint's tensors are in `model` and before vLLM repacks them into its kernels' formats
        guard = None if _guards else _new_guard(model_config)
        if guard is None:
            return original(model, model_config, *args, **kwargs)
        _run(guard.verify_loaded, model)
        t = time.perf_counter()
        result = original(model, model_config, *args, **kwargs)
        guard.vllm_s = time.perf_counter() - t  # vLLM's own processing: not the guard's time
        _run(guard.start, model)
        return result

    process_weights_after_loading._achilles_guard = True  # type: ignore[attr-defined]
    process_weights_after_loading.__wrapped__ = original  # type: ignore[attr-defined]
    base_loader.process_weights_after_loading = process_weights_after_loading


def _join_lineage() -> None:
    """Each vLLM process that loads the plugin appends its pid (children inherit the environment); the first one
    (the API server) names the refusal file and, at exit, prints a worker's refusal instead of vLLM's traceback."""
    pids = os.environ.get(_ENV + "PIDS", "")
    os.environ[_ENV + "PIDS"] = f"{pids},{os.getpid()}" if pids else str(os.getpid())
    if pids:
        return
    import atexit
    import secrets
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"achilles-guard-refusal-{os.getpid()}-{secrets.token_hex(4)}")
    os.environ[_ENV + "REFUSAL_FILE"] = path
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        try:
            with open(path, encoding="utf-8") as f:
                line = f.read().strip()
        except OSError:
            line = ""
        if not line:  # not guard's refusal: vLLM's own error, shown as vLLM shows it
            return previous(kind, value, tb)
        print(line, file=sys.stderr, flush=True)  # the cause, as the last line; Python then exits 1

    sys.excepthook = excepthook
    atexit.register(lambda: os.path.exists(path) and os.remove(path))


def _refuse(message: str, code: int) -> None:
    """Fail closed: one line, then end this process at once, and the engine process between it and the API server
    (whose death the API server then reports with the guard's line alone, exit 1)."""
    if _flag("FAIL_OPEN"):
        _say(f"FAIL-OPEN, serving anyway: {message}")
        return
    line = f"{PREFIX} REFUSED to serve: {message} (set {_ENV}FAIL_OPEN=1 to serve anyway)"
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get(_ENV + "REFUSAL_FILE")
    pids = [int(p) for p in os.environ.get(_ENV + "PIDS", "").split(",") if p.isdigit()]
    try:
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(line + "\n")
        # the engine-core process between this worker and the API server would print vLLM's tracebacks; it is a
        # process of this same vLLM (its pid is in the lineage) and nothing has been served yet
        parent = os.getppid()
        if len(pids) >= 2 and parent in pids[1:] and parent != os.getpid():
            import signal

            os.kill(parent, signal.SIGKILL)
    except OSError:
        pass
    os._exit(code)


_guards: list = []  # keeps the running guard (and its thread) alive


def _new_guard(model_config):
    """The guard of the first model this process loads (a draft model loaded later is not this fingerprint's)."""
    from achilles_guard.errors import GuardError, first_line

    try:
        guard = _Guard(model_config, Settings.from_env())
    except GuardError as err:
        _refuse(first_line(err), err.exit_code)  # fail-open: serve unguarded, and say so on /metrics
        from prometheus_client import CollectorRegistry

        from achilles_guard.monitor.metrics import MonitorMetrics

        metrics = MonitorMetrics(CollectorRegistry(), model=os.environ.get(_ENV + "MODEL_NAME") or "model")
        metrics.integrity_ok.set(0)
        _guards.append(metrics)
        return None
    _guards.append(guard)
    return guard


def _run(step, model) -> None:
    """One step of the guard: a finding or an error is one line, then fail closed (or open)."""
    from achilles_guard.errors import EXIT_FINDING, EXIT_RUNTIME, GuardError, first_line

    try:
        problem = step(model)
    except GuardError as err:
        _refuse(first_line(err), err.exit_code)
        return
    except Exception as err:  # a bug must not let an unchecked model serve
        _refuse(f"internal error while checking the loaded model: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''}", EXIT_RUNTIME)
        return
    if problem is not None:
        _refuse(problem, EXIT_FINDING)


class _Guard:
    def __init__(self, model_config, settings: Settings):
        self.model_config = model_config
        self.settings = settings
        self._full_ok = True
        self._full_bad = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.monitor = None

    # -- start-up --------------------------------------------------------------------------

    def verify_loaded(self, model) -> str | None:
        """The weights as vLLM loaded them (before it packs them): every tensor and every fingerprinted slice.
        The finding's one line, or None when they are the fingerprinted ones."""
        import torch

        from achilles_guard.errors import InputError
        from achilles_guard.formats.load import config_sha256
        from achilles_guard.integrity.files import check_loader_files
        from achilles_guard.integrity.fingerprint import load_fingerprint, read_key
        from achilles_guard.monitor.runtime_integrity import RuntimeIntegrityChecker
        from achilles_guard.monitor.served import Digest
        from achilles_guard.monitor.vllm_map import live_tensors, packed_layout, remap_fingerprint

        s = self.settings
        self.t0 = time.perf_counter()
        mc = self.model_config
        model_path = str(getattr(mc, "model", "") or "")
        fp = load_fingerprint(s.fingerprint, verify_key=read_key(s.verify_key) if s.verify_key else None)
        if model_path and os.path.isfile(os.path.join(model_path, "config.json")):
            here = config_sha256(model_path)
            if here != fp.config_sha256:
                raise InputError(f"fingerprint {s.fingerprint} was taken from another model (config sha256 "
                                 f"{fp.config_sha256[:12]}..., {model_path}: {here[:12]}...); run guard scan on it")
        # what vLLM reads beside the weights: the tokenizer, chat template and generation config of the directory
        self.files = check_loader_files(model_path, fp.files) if model_path and os.path.isdir(model_path) else None
        self.elsewhere = _read_elsewhere(mc, model_path)
        layout = packed_layout(model, getattr(mc, "hf_config", None))
        self.fp = fp
        self.live = live_tensors(model, layout, {r.name for r in fp.records.records} if fp.records else frozenset())
        self.fp_live, self.dropped = remap_fingerprint(fp, layout, model)
        self.critical_rows: dict[str, set] = {}
        for rec in fp.slices.values():
            if rec.axis == 0:
                self.critical_rows.setdefault(rec.checkpoint_key, set()).add(rec.index)
        self.full = self.check_full()
        self.slices = RuntimeIntegrityChecker(model, self.fp_live).check()
        # the linear weights' checksums as verified, before vLLM packs them into its kernels (which leave `weight`
        # empty): each kernel's first read-back must match them; from then on it is re-checked against the fingerprint.
        # Only vLLM's CPU backend packs (a GPU keeps `weight` and is read directly): no checksum work on a GPU.
        self._before = {name: Digest.of(module.weight) for name, module in model.named_modules()
                        if getattr(module, "quant_method", None) is not None
                        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
                        and module.weight.device.type == "cpu"}
        self.layout = layout
        self._finding = self._finding_line(self.full, self.slices)
        return self._finding

    def start(self, model) -> None:
        """After vLLM processed the weights: attach the monitor and start the background re-checks."""
        from dataclasses import replace

        import torch
        from prometheus_client import CollectorRegistry

        from achilles_guard.errors import InputError
        from achilles_guard.monitor.activation import ActivationMonitor, MonitorConfig
        from achilles_guard.monitor.served import ServedWeights
        from achilles_guard.monitor.vllm_map import live_tensors

        if not hasattr(self, "fp_live"):
            from achilles_guard.monitor.metrics import MonitorMetrics

            MonitorMetrics(CollectorRegistry(), model=self.settings.model_name or "model").integrity_ok.set(0)
            raise InputError("the weights vLLM loaded were not verified (the fingerprint could not be used, or this "
                             "vLLM's loader did not pass them through process_weights_after_loading)")
        self.model = model
        s, fp_live, mc = self.settings, self.fp_live, self.model_config
        model_path = str(getattr(mc, "model", "") or "")
        # what is still the verified tensor after vLLM's processing is re-checked in memory; what vLLM packed into
        # its kernels is read back through them (monitor.served); anything else it repacked is not re-checked
        before, self._before = self._before, None
        self.served = ServedWeights(model, before)
        del before
        recorded = {r.name for r in self.fp.records.records} if self.fp.records else frozenset()
        ptrs = {n: t.data_ptr() for n, t in self.live.items()}
        after = live_tensors(model, self.layout, recorded, served=self.served)
        self.live = {n: t for n, t in after.items() if not isinstance(t, torch.Tensor) or ptrs.get(n) == t.data_ptr()}
        self.repacked = len(set(ptrs) - set(self.live))
        params = dict(model.named_parameters(remove_duplicate=False))
        kept = {k: r for k, r in fp_live.slices.items() if r.param in self.served
                or (r.param in params and tuple(params[r.param].shape) == tuple(r.shape))}
        fp_live = replace(fp_live, slices=kept)
        name = s.model_name or getattr(mc, "served_model_name", None) or os.path.basename(model_path.rstrip("/"))
        name = name[0] if isinstance(name, (list, tuple)) else name
        name = os.path.basename(str(name).rstrip("/")) if name and os.path.isdir(str(name)) else name
        config = MonitorConfig(drift_factor=s.drift_factor, massive_factor=s.massive_factor,
                               integrity_interval_s=0.0, canary_interval_s=0.0).validated()
        self._positions_seen = None
        self.fp_watch = fp_live
        guard = None
        if s.protect:  # from the whole remapped fingerprint: its weights are the fingerprint's, not the live ones
            from achilles_guard.defenses.pin import PinGuard

            guard = PinGuard.from_fingerprint(self.fp_live)
        self.monitor = ActivationMonitor(model, fp_live, registry=CollectorRegistry(), config=config,
                                         model_name=str(name or "model"), positions=self._positions, guard=guard,
                                         served=self.served)
        self._export_build_info(str(name or "model"))
        m = self.monitor.metrics
        m.integrity_checks.inc()
        m.integrity_time.set(self.slices.timestamp)
        self._publish(self.slices)
        self._attach_positions(model)
        self.monitor.attach()
        # no read-back beside any of vLLM's kernels: the model's forward, and the LM head, which vLLM runs outside it
        logits = [m for n, m in model.named_modules() if n.rpartition(".")[2] == "logits_processor"]
        self._job, self._job_lock = None, threading.Lock()
        self._forward_hooks = self.served.guard_forwards(model, *logits) if len(self.served) else ()
        if len(self.served):  # after the lock's own post-hook: runs with the lock released, in vLLM's thread
            self._forward_hooks += (model.register_forward_hook(self._after_forward),)
        dropped = self.dropped
        spent = time.perf_counter() - self.t0 - getattr(self, "vllm_s", 0.0)  # the guard's own start-up time
        _say(f"{'UNHEALTHY, ' if self._finding else ''}watching {len(fp_live.neurons)} neuron(s) of {name} "
             f"({len(fp_live.critical_set)} critical"
             + (f"; {len(dropped)} not watchable in vLLM: {dropped[0][1]}" if dropped else "")
             + f"); {self._checked_said()} in {spent:.1f} s; re-checked every {s.integrity_interval_s:g} s (slices) / "
             + f"{s.full_interval_s:g} s (all)"
             + (f"; {len(self.served)} linear weight(s) in vLLM's kernels, read back through them" if len(self.served)
                else "")
             + (f", {self.repacked} tensor(s) repacked by vLLM not re-checked" if self.repacked else "")
             + (f"; protecting {len(guard.exact)} neuron(s) exactly from their fingerprinted weights"
                if guard is not None else "")
             + "; metrics "
             + ("on vLLM's /metrics" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else
                "NOT exported: export PROMETHEUS_MULTIPROC_DIR before starting vLLM"))
        self._start_thread()
        return None

    def _checked_said(self) -> str:
        """What the start-up line says was verified as loaded, and what was not."""
        full, files = self.full, self.files
        checked = [f"{self.slices.checked} slice(s)"]
        if full is not None:
            checked.append(f"{full.tensors} tensor(s)")
        if files is not None and files.recorded:
            checked.append(f"{len(files.compared)} loader file(s)")
        said = f"{', '.join(checked[:-1])} and {checked[-1]}" if len(checked) > 1 else checked[0]
        said += " verified as loaded"
        if full is None:
            said += " (no tensor records: the fingerprint is older than whole-model records, slices only)"
        if files is not None and not files.recorded:
            said += f"; loader files NOT checked (the fingerprint has no record of them: {', '.join(files.unchecked)})"
        if self.elsewhere:
            said += "; NOT checked: " + ", ".join(self.elsewhere)
        return said

    def _export_build_info(self, name: str) -> None:
        """guard_build_info as a gauge: prometheus-client's Info does not work in multiprocess mode."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        import platform

        import torch
        from prometheus_client import CollectorRegistry, Gauge

        from achilles_guard import __version__

        try:
            import vllm

            vllm_version = vllm.__version__
        except Exception:
            vllm_version = "?"
        g = Gauge("guard_build_info", "achilles-guard build and runtime versions.",
                  ("version", "python", "torch", "vllm", "model"), registry=CollectorRegistry(),
                  multiprocess_mode="livemax")
        g.labels(__version__, platform.python_version(), torch.__version__, vllm_version, name).set(1)

    def _attach_positions(self, model) -> None:
        """Read the batch's token positions from the rotary embedding's first argument (a reference, no copy)."""
        from achilles_guard.engine.masking import hooks, reads_input

        rotary = next((n for n, _ in model.named_modules() if n.endswith("rotary_emb")), None)
        if rotary is None:
            _say("no rotary embedding module found: every multi-token batch counts as a prefill")
            return

        @reads_input
        def keep(output, positions, module):
            self._positions_seen = positions
            return None

        self._rotary_hooks = hooks(model, {rotary: keep})
        self._rotary_hooks.__enter__()

    def _positions(self, rows: int) -> int:
        """vLLM flattens a batch into (num_tokens, C): a prefill holds a token at position 0, a decode step not."""
        pos = self._positions_seen
        if pos is None or rows < 2:
            return rows
        return rows if bool((pos == 0).any()) else 1

    # -- checks ----------------------------------------------------------------------------

    def check_full(self):
        """Every tensor in memory against the fingerprint's records (None: the fingerprint has none)."""
        from achilles_guard.integrity.fingerprint import read_key
        from achilles_guard.integrity.records import check_tensors
        from achilles_guard.monitor.vllm_map import LiveSource

        fp = self.fp
        if fp.records is None:
            return None
        files = {r.name: r.file for r in fp.records.records}
        src = LiveSource(self.live, fp.records.files, files)
        key = read_key(self.settings.verify_key) if self.settings.verify_key else None
        served = getattr(self, "served", None)
        with served.session() if served is not None else contextlib.nullcontext():
            check = check_tensors(src, fp.records, sign_key=key, critical_rows=self.critical_rows)
        with self._lock:
            self._full_ok = check.ok
            self._full_bad = len(check.findings)
        self.last_full = check
        return check

    def _publish(self, slices) -> None:
        """integrity_ok is 0 when the slices or the last whole-model check found a change."""
        m = self.monitor.metrics
        with self._lock:
            ok = slices.ok and self._full_ok
            bad = max(len(slices.mismatched), self._full_bad)
        m.integrity_ok.set(1 if ok else 0)
        m.mismatched.set(bad)

    def _finding_line(self, full, slices) -> str | None:
        parts = []
        files = getattr(self, "files", None)
        if files is not None and files.findings:
            f = files.findings[0]
            more = len(files.findings) - 1
            parts.append(f"{f.name} ({f.role}) {f.detail}" + (f"; {more} more loader file(s) differ" if more else ""))
        if full is not None and not full.ok:
            f = sorted(full.findings, key=lambda f: (not f.critical_hits, f.tensor))[0]
            where = f" (rows {', '.join(map(str, f.rows[:4]))}" if f.rows else ""
            if where:
                where += "; fingerprinted slice" if f.critical_hits else ""
                where += ")"
            parts.append(f"{f.tensor}: {f.detail}{where}"
                         + (f"; {len(full.findings) - 1} more tensor(s) differ" if len(full.findings) > 1 else ""))
        if not slices.ok:
            parts.append(f"{len(slices.mismatched)} fingerprinted slice(s) differ in memory ({slices.mismatched[0]})")
        if not parts:
            return None
        return f"the weights vLLM loaded differ from fingerprint {self.settings.fingerprint}: " + "; ".join(parts)

    # -- background ------------------------------------------------------------------------

    def _start_thread(self) -> None:
        s = self.settings
        if not (s.integrity_interval_s or s.full_interval_s or s.test_flip_file or s.protect):
            return
        self._thread = threading.Thread(target=self._loop, name="achilles-guard", daemon=True)
        self._thread.start()

    def _confirm_served(self) -> None:
        """Read vLLM's kernels back once (with the first re-check, once vLLM serves: it costs about a forward of
        hidden-size tokens) and keep re-checking only the layers whose kernel returns the weights verified before
        vLLM packed them."""
        import torch

        t = time.perf_counter()
        try:
            inexact = set(self.served.confirm())
        except Exception as err:  # the layers stay unconfirmed: their slices are skipped, and the line says so
            self.live = {n: v for n, v in self.live.items() if isinstance(v, torch.Tensor)}
            _say(f"reading vLLM's kernels back failed ({type(err).__name__}: {str(err)[:200]}): the "
                 f"{len(self.served)} linear weight(s) packed into them are NOT re-checked")
            return
        self.live = {n: v for n, v in self.live.items() if isinstance(v, torch.Tensor) or v.param not in inexact}
        _say(f"vLLM's kernels read back in {time.perf_counter() - t:.1f} s: {len(self.served)} linear weight(s) "
             "compute with the verified weights bit for bit"
             + (f"; {len(inexact)} do not (e.g. {sorted(inexact)[0]}: a -0.0 or subnormal weight, or an inexact "
                "kernel) and are not re-checked" if inexact else ""))

    def _loop(self) -> None:
        s = self.settings
        confirm = len(self.served) > 0  # with the first re-check: vLLM is serving by then, its start not slowed
        now = time.monotonic()
        next_slices = now + s.integrity_interval_s if s.integrity_interval_s else math.inf
        next_full = now + s.full_interval_s if s.full_interval_s else math.inf
        flip = s.test_flip_file
        if flip:
            _say(f"TEST SWITCH {_ENV}TEST_FLIP_FILE is set: a critical weight will be negated in memory when "
                 f"{flip} appears. Never in production.")
        while True:
            self._export_pins()
            wait = min(next_slices, next_full) - time.monotonic()
            if wait > 0 and not (flip and os.path.exists(flip)):
                time.sleep(min(wait, 0.5))
                continue
            now = time.monotonic()
            try:
                if confirm:
                    confirm = False
                    self._in_serving_thread(self._confirm_served)
                if flip and os.path.exists(flip):
                    self._in_serving_thread(self._test_flip)
                    flip = None
                if now >= next_full:
                    self._in_serving_thread(self.check_full)
                    next_full = now + s.full_interval_s
                if now >= next_slices or not self._full_ok:
                    self._publish(self._in_serving_thread(self.monitor.check_integrity))
                    next_slices = now + s.integrity_interval_s if s.integrity_interval_s else math.inf
            except Exception as err:  # the thread must not die silently
                _say(f"background check failed: {type(err).__name__}: {err}")
                self.monitor.metrics.integrity_ok.set(0)
                time.sleep(1.0)

    def _in_serving_thread(self, fn):
        """Run a check that reads vLLM's kernels back in vLLM's own thread, right after a forward (so that nothing
        of vLLM runs beside it: measured, read-backs from this thread beside vLLM's step killed the worker); when
        no forward comes within a second (an idle server), here, holding the lock forwards take."""
        if not len(self.served):
            return fn()
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = fn()
            except BaseException as err:
                box["error"] = err
            finally:
                done.set()

        self._job = job
        if not done.wait(1.0):
            with self._job_lock:
                mine = self._job is job  # no forward took it: the server is idle
                if mine:
                    self._job = None
            if mine:
                job()  # kernel calls still take the lock block by block (check_tensors hashes in a thread pool)
            done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _after_forward(self, module, args, output):
        if self._job is None:
            return
        with self._job_lock:  # taken once, here or by the background thread
            job, self._job = self._job, None
        if job is not None:
            job()

    def _export_pins(self) -> None:
        """guard_pin_interventions_total on vLLM's /metrics (served by another process): see export_pins."""
        if self.monitor is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.monitor.metrics.export_pins()

    def _test_flip(self) -> None:
        import torch

        fp_live = self.fp_watch
        critical = {str(n) for n in fp_live.critical_set}
        record = next((r for r in fp_live.neurons if str(r.neuron) in critical), None) or fp_live.neurons[0]
        rec = fp_live.slices.get(record.slices[0])
        if rec is None:
            _say("TEST SWITCH: the critical slice is not re-checkable in this vLLM; nothing flipped")
            return
        if rec.param in self.served:  # in vLLM's kernel: repack the read-back weight with the one value negated
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            module = self.served.module(rec.param)
            weight = self.served.read(rec.param)
            weight.select(rec.axis, rec.index)[0].neg_()
            with self.served.lock:
                module.weight = torch.nn.Parameter(weight, requires_grad=False)
                dispatch_cpu_unquantized_gemm(module, remove_weight=True)
        else:
            param = dict(self.model.named_parameters(remove_duplicate=False))[rec.param]
            with torch.no_grad():
                param.data.select(rec.axis, rec.index)[0].neg_()
        _say(f"TEST SWITCH: negated {rec.param}[{rec.index}, 0] in memory (slice {rec.key})")


def _read_elsewhere(model_config, model_path: str) -> list[str]:
    """What vLLM was told to read from outside the fingerprinted directory (--tokenizer, --generation-config)."""
    out = []
    here = os.path.realpath(model_path) if model_path else None
    tokenizer = str(getattr(model_config, "tokenizer", "") or "")
    if tokenizer and os.path.realpath(tokenizer) != here:
        out.append(f"the tokenizer from {tokenizer}")
    generation = str(getattr(model_config, "generation_config", "") or "")
    if generation not in ("", "auto", "vllm") and os.path.realpath(generation) != here:
        out.append(f"the generation config from {generation}")
    return out
