"""`guard monitor`: watch a model's critical neurons live; `--serve` adds an HTTP server (Starlette on uvicorn).

    guard monitor MODEL_DIR --fingerprint guard-out/fingerprint.safetensors --serve --port 9464
    curl localhost:9464/metrics; curl localhost:9464/healthz
    curl localhost:9464/v1/completions -d '{"prompt": "Hello", "max_tokens": 8}'

--protect also installs the pin guard (achilles_guard.defenses.pin): the fingerprint's critical
neurons are held to their baseline, after the monitor has read them, so a tamper still alarms
while the served outputs stay intact; guard_pin_interventions_total counts what it changed.

Without --serve: a live status table (integrity, canary, anomaly score) refreshed every
--interval seconds until Ctrl-C (or --iterations N); exit 1 when the last check was unhealthy.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from achilles_guard.cli.app import app
from achilles_guard.cli.common import (
    AllowPickleOption,
    DeprecatedOption,
    DeviceOption,
    DtypeOption,
    TrustRemoteCodeOption,
    deprecated_alias,
    guarded,
    stderr,
    stdout,
)
from achilles_guard.errors import EXIT_FINDING, EXIT_OK, UsageError

__all__ = ["monitor_command", "status_table"]


@app.command("monitor")
@guarded
def monitor_command(
    model_dir: Optional[str] = typer.Argument(
        None, help="Local Hugging Face model directory to monitor.", show_default=False
    ),
    demo: bool = typer.Option(
        False,
        "--demo",
        help="Monitor the built-in synthetic demonstration model (fingerprint it with guard scan --demo).",
    ),
    fingerprint: Path = typer.Option(
        ..., "--fingerprint", help="fingerprint.safetensors written by guard scan for this model."
    ),
    serve: bool = typer.Option(False, "--serve", help="Serve /metrics, /healthz and /v1/completions over HTTP."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (--serve)."),
    port: int = typer.Option(9464, help="Port to listen on (--serve); 0 picks a free one."),
    interval: float = typer.Option(5.0, help="Seconds between status refreshes (without --serve)."),
    iterations: Optional[int] = typer.Option(
        None, help="Stop after N refreshes (without --serve); default: until Ctrl-C."
    ),
    integrity_interval: float = typer.Option(
        30.0, help="Seconds between in-memory weight re-hashes (--serve; 0 = at start only)."
    ),
    canary_interval: float = typer.Option(
        300.0, help="Seconds between canary probe runs (--serve; 0 = at start only)."
    ),
    drift_factor: float = typer.Option(
        10.0, help="Factor a critical activation may drift from its baseline before it is anomalous."
    ),
    tolerance: Optional[float] = DeprecatedOption("--tolerance", "--drift-factor"),
    massive_factor: float = typer.Option(
        20.0, help="A baseline max |a| this many times the median counts as a massive activation."
    ),
    max_body_bytes: int = typer.Option(65536, help="Largest accepted request body (--serve)."),
    max_prompt_tokens: int = typer.Option(2048, help="Longest accepted prompt in tokens (--serve)."),
    max_new_tokens: int = typer.Option(256, help="Largest accepted max_tokens (--serve)."),
    max_in_flight: int = typer.Option(4, help="Completion requests served at once; more get HTTP 429 (--serve)."),
    request_timeout: float = typer.Option(
        10.0,
        help="Seconds a client has to send a whole request (line, headers, body); slower ones get 408 and are closed "
             "(--serve).",
    ),
    max_connections: int = typer.Option(
        64, help="Connections served at once; the next ones get a fast HTTP 429 and are closed (--serve)."
    ),
    model_name: Optional[str] = typer.Option(
        None, help="The `model` label on every metric (default: the directory name)."
    ),
    enable_test_endpoints: bool = typer.Option(
        False,
        "--enable-test-endpoints",
        help="Expose POST /v1/test/disrupt and /v1/test/restore, which zero a fingerprinted neuron's weights in "
             "memory. Never in production.",
    ),
    verify_key: Optional[str] = typer.Option(
        None, help="Refuse a fingerprint whose HMAC does not verify with this key (file or env:VAR)."
    ),
    protect: bool = typer.Option(
        False,
        "--protect",
        help="Hold the critical neurons to their fingerprinted baseline (pin guard) on every forward; the monitor "
             "still sees the raw values.",
    ),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
) -> None:
    """Monitor the critical neurons of a served model against its fingerprint.

    Exit 0 on a clean stop (healthy), 1 when the last watch check was unhealthy, 2 bad input
    (fingerprint of another model, port in use...), 3 runtime failure.
    """
    from prometheus_client import CollectorRegistry

    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import load_fingerprint, read_key
    from achilles_guard.monitor import ActivationMonitor, MonitorConfig
    from achilles_guard.monitor.server import ServeContext, ServerLimits, build_server

    if demo == (model_dir is not None):
        raise UsageError("give either MODEL_DIR or --demo (exactly one)")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0-65535 (got {port})")
    if interval <= 0:
        raise UsageError(f"--interval must be > 0 seconds (got {interval})")
    if iterations is not None and iterations < 1:
        raise UsageError(f"--iterations must be >= 1 (got {iterations})")
    if min(max_body_bytes, max_prompt_tokens, max_new_tokens, max_in_flight) < 1:
        raise UsageError("--max-body-bytes, --max-prompt-tokens, --max-new-tokens and --max-in-flight must be >= 1")
    if not 0 < request_timeout <= 3600:  # also false for NaN
        raise UsageError(f"--request-timeout must be > 0 and <= 3600 seconds (got {request_timeout})")
    if not 1 <= max_connections <= 10000:
        raise UsageError(f"--max-connections must be 1-10000 (got {max_connections})")
    limits = ServerLimits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                          max_new_tokens=max_new_tokens, max_in_flight=max_in_flight,
                          request_timeout_s=request_timeout, max_connections=max_connections)
    drift_factor = deprecated_alias(drift_factor, tolerance, old="--tolerance", new="--drift-factor")
    config = MonitorConfig(drift_factor=drift_factor, massive_factor=massive_factor,
                           integrity_interval_s=integrity_interval, canary_interval_s=canary_interval).validated()
    fp = load_fingerprint(fingerprint, verify_key=read_key(verify_key) if verify_key else None)
    if protect and not fp.critical_set:
        raise UsageError(
            f"--protect: fingerprint {fingerprint} has no critical set to protect (its scan did not converge)"
        )
    log = stderr()
    server = None
    if serve:  # bind before the slow model load: a taken port fails at once
        server = build_server(None, host=host, port=port, limits=limits)
    try:
        if demo:
            from achilles_guard.engine.demo import demo_model_dir

            model_dir = str(demo_model_dir())
        lm = load_model(
            model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        name = model_name or ("demo" if demo else Path(lm.directory).name or "model")
        guard = _pin_guard(fp, log) if protect else None
        monitor = ActivationMonitor(lm.model, fp, registry=CollectorRegistry(), tokenizer=lm.tokenizer, config=config,
                                    model_name=name, config_sha256=lm.config_sha256, guard=guard)
        if serve:
            return _serve(server, ServeContext(lm, monitor, limits, enable_test_endpoints, name), log)
        return _watch(monitor, name, interval, iterations)
    finally:
        if server is not None:
            server.server_close()


def _pin_guard(fp, log):
    from achilles_guard.defenses.pin import PinGuard

    guard = PinGuard.from_fingerprint(fp)
    critical = {r.neuron for r in fp.neurons if r.critical or r.attacks}
    log.print(f"guard monitor: protection on: {len(guard.exact)} neuron(s) recomputed from their fingerprinted "
              f"weights ({len(critical & set(guard.exact))} critical), {len(guard.restorable)} critical neuron(s) "
              f"pinned to their baseline, {len(guard.clamp_only)} clamped only (input-dependent)", soft_wrap=True)
    return guard


def _serve(server, ctx, log) -> None:
    from achilles_guard.monitor.server import bind_context

    monitor = ctx.monitor
    bind_context(server, ctx)
    monitor.attach(background=True)
    monitor.check_integrity()
    canary = monitor.run_canary()
    stop = threading.Event()

    def on_signal(signum, frame):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    host, port = server.server_address[:2]
    log.print(f"guard monitor: {len(monitor.fingerprint.neurons)} neurons watched "
              f"({len(monitor.fingerprint.critical_set)} critical), canary delta {canary.delta_log10:.3f} log10 PPL")
    log.print(f"guard monitor: listening on http://{host}:{port}", soft_wrap=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        monitor.detach()
    log.print("guard monitor: stopped")
    raise typer.Exit(EXIT_OK)


def _watch(monitor, name: str, interval: float, iterations: int | None) -> None:
    from rich.live import Live

    console = stdout()
    done = 0
    monitor.attach()
    try:
        with Live(status_table(monitor.state(), name), console=console, auto_refresh=False) as live:
            while True:
                monitor.check_integrity()
                monitor.run_canary()
                done += 1
                live.update(status_table(monitor.state(), name), refresh=True)
                if iterations is not None and done >= iterations:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        monitor.detach()
    raise typer.Exit(EXIT_OK if monitor.state().healthy else EXIT_FINDING)


def status_table(state, name: str):
    """A Rich table of one MonitorState."""
    from rich.table import Table

    table = Table(title=f"guard monitor · {name}", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    ok, bad = "[green]ok[/]", "[bold red]ALERT[/]"
    integ = state.integrity
    table.add_row("weight integrity", "-" if integ is None else ok if integ.ok else bad,
                  "" if integ is None else f"{integ.checked} slices hashed, {len(integ.mismatched)} changed"
                  + (f", {integ.skipped} offloaded (not checked)" if integ.skipped else "")
                  + (f": {', '.join(integ.mismatched[:3])}" if integ.mismatched else ""))
    can = state.canary
    table.add_row("canary", "-" if can is None else ok if can.ok else bad,
                  "" if can is None else f"delta {can.delta_log10:.3f} log10 PPL (loss {can.loss:.4f})")
    last = state.last
    score = last.score if last else 0.0
    table.add_row("activations", ok if score == 0 else bad,
                  f"anomaly score {score:.3f}, {state.forwards} forwards"
                  + (f"; {', '.join(last.kinds)}: {', '.join(last.anomalous[:3])}" if last and last.anomalous else ""))
    if state.interventions is not None:
        table.add_row("protection", "[yellow]active[/]" if state.interventions else ok,
                      f"pin guard on, {state.interventions} activation values restored or clamped")
    table.add_row("overall", ok if state.healthy and score == 0 else bad, "")
    return table
