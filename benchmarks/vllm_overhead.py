"""vLLM with and without the guard plugin, in one run: start-up time and throughput (issue 24).

Configurations, each a fresh `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1:

  bare     no ACHILLES_GUARD_FINGERPRINT: the plugin is installed but does nothing
  guard    the plugin's default: weights verified as loaded, vLLM's kernels read back at start and re-checked
           in the background (slices every 30 s, all every 300 s), the activation hooks
  busy     the same with re-checks far more often than the defaults (slices every 1 s, all every 10 s), so
           that read-backs run during the measurement
  protect  the default plus ACHILLES_GUARD_PROTECT=1 (the pin guard recomputes the fingerprinted neurons)

Per configuration: seconds from the process start to /health 200, then (guard configurations) the wait
for the guard's one-time read-back of vLLM's kernels, which it prints with its duration, then throughput:
--rounds rounds of 4 concurrent prompts x 64 tokens (ignore_eos), tokens/s of the best round, and the
median latency of one 64-token completion alone. Run in the vLLM venv (ci/vllm-venv.sh):

    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model DIR --fingerprint FP [--dtype float32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["The history of the city begins", "Write a short story about a robot", "def quicksort(xs):",
           "The main causes of the First World War were"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, model: str, prompt: str, tokens: int) -> int:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    req = urllib.request.Request(url, body.encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def run(name: str, args, env_extra: dict) -> dict:
    port = _port()
    prom = tempfile.mkdtemp(prefix="prom-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": prom, "VLLM_CPU_KVCACHE_SPACE": "1", **env_extra}
    if name == "bare":
        env.pop("ACHILLES_GUARD_FINGERPRINT", None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--enforce-eager",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--dtype", args.dtype]
    log = open(os.path.join(prom, "server.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name}: vLLM exited {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        start = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}/v1/completions"
        _post(url, args.model, "warm up", 8)
        confirmed = None  # the guard's one-time read-back of vLLM's kernels: waited for, so that what follows is
        if name != "bare":  # the steady state (its cost is the seconds it prints, once per start)
            while confirmed is None and time.monotonic() - t0 < 600:
                log.flush()
                with open(log.name, encoding="utf-8", errors="replace") as f:
                    confirmed = next((line.strip() for line in f if "kernels read back" in line), None)
                if confirmed is None:
                    time.sleep(0.5)
        rates = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                tokens = sum(pool.map(lambda p: _post(url, args.model, p, 64), PROMPTS))
            rates.append(tokens / (time.perf_counter() - t))
        single = []
        for p in PROMPTS:
            t = time.perf_counter()
            _post(url, args.model, p, 64)
            single.append(time.perf_counter() - t)
        hooks_ms = _hook_share(port) if name != "bare" else None
        log.flush()
        with open(log.name, encoding="utf-8", errors="replace") as f:
            said = [line.strip() for line in f if line.startswith("achilles-guard: ")]
        return {"config": name, "startup_s": round(start, 1), "tokens_per_s": round(max(rates), 1),
                "rates": [round(r, 1) for r in rates], "latency_64_s": round(statistics.median(single), 3),
                "guard": said[0][:400] if said else None, "read_back": confirmed, "hooks": hooks_ms}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        _wait_gone(proc.pid)  # the engine and worker processes too: the next start must not share the cores


def _hook_share(port: int) -> str | None:
    """The guard's own time per forward (guard_monitor_overhead_seconds, measured inside the worker) against
    vLLM's mean inter-token latency over the same run: an overhead figure the machine's drift does not blur."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    sums = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("guard_monitor_overhead_seconds_sum", "guard_monitor_overhead_seconds_count",
                               "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    try:
        hook = sums["guard_monitor_overhead_seconds_sum"] / sums["guard_monitor_overhead_seconds_count"]
        step = sums["vllm:inter_token_latency_seconds_sum"] / sums["vllm:inter_token_latency_seconds_count"]
    except (KeyError, ZeroDivisionError):
        return None
    return f"{hook * 1e3:.2f} ms per forward, {100 * hook / step:.1f} % of a {step * 1e3:.0f} ms inter-token latency"


def _wait_gone(pgid: int, timeout: float = 60.0) -> None:
    """Until no process of the server's process group is left (then SIGKILL), and a moment for the memory."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pgid, signal.SIGKILL)
    time.sleep(2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--fingerprint", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="bare,guard,busy,protect")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all configurations, in alternation")
    args = ap.parse_args()
    guard = {"ACHILLES_GUARD_FINGERPRINT": args.fingerprint}
    envs = {"bare": {}, "guard": guard,
            "busy": {**guard, "ACHILLES_GUARD_INTEGRITY_INTERVAL": "1", "ACHILLES_GUARD_FULL_INTERVAL": "10"},
            "protect": {**guard, "ACHILLES_GUARD_PROTECT": "1"}}
    names = args.configs.split(",")
    rounds = []  # all configurations per round, in a rotating order; each compared with the first name in its round
    for i in range(args.repeat):
        order = names[i % len(names):] + names[:i % len(names)]  # each round starts with the next configuration
        got = {name: run(name, args, envs[name]) for name in order}
        rows = [got[name] for name in names]
        for r in rows:
            r["throughput_vs_first"] = f"{100 * (r['tokens_per_s'] / rows[0]['tokens_per_s'] - 1):+.1f} %"
            r["startup_vs_first"] = f"{100 * (r['startup_s'] / rows[0]['startup_s'] - 1):+.1f} %"
            print(json.dumps(r), flush=True)
        rounds.append(rows)
    if args.repeat > 1:  # the machine drifts between starts: the median of each round's own ratio
        for i, name in enumerate(names[1:], 1):
            tput = statistics.median(r[i]["tokens_per_s"] / r[0]["tokens_per_s"] - 1 for r in rounds)
            start = statistics.median(r[i]["startup_s"] / r[0]["startup_s"] - 1 for r in rounds)
            print(f"{name} vs {names[0]}, median of {args.repeat} rounds: throughput {100 * tput:+.1f} %, "
                  f"start-up {100 * start:+.1f} %")


if __name__ == "__main__":
    main()
