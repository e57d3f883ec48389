"""Requests per second of `guard monitor --serve`'s server: the old stdlib server vs Starlette on uvicorn.

The tiny planted Llama of the tests (tests/builders.planted_model, its fingerprint from
tests/builders.planted_fingerprint), monitored (forward hooks attached, no background re-checks),
served by each implementation in its own subprocess on 127.0.0.1 (so the clients do not share its
GIL): the stdlib server as it was at `--baseline-rev` (its server.py from git, imported from a
temporary file; the rest of the package is this checkout's) and achilles_guard.monitor.server.
`--clients` client threads, each a new connection per request (as the tests' clients do), for
`--seconds` per endpoint after a short warm-up:

- `GET /metrics`;
- `POST /v1/completions` with `{"prompt": "The river rose", "max_tokens": 1}`.

    PYTHONPATH=. python benchmarks/monitor_server.py [--seconds 5] [--clients 4] [--baseline-rev b18ec2c]

Prints requests/s of each, the ratio new/old, and the count of non-200 answers and client errors.
CPU-only (CUDA hidden); one torch thread per server (OMP_NUM_THREADS=1), as the tests run it.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPLETION = json.dumps({"prompt": "The river rose", "max_tokens": 1}).encode()


def serve(module_path: str, model_dir: str, fp_path: str) -> None:
    """The child: load, monitor, serve on a free port; print it; serve until killed."""
    from prometheus_client import CollectorRegistry

    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.monitor import ActivationMonitor

    if module_path == "new":
        from achilles_guard.monitor import server as mod
    else:
        spec = importlib.util.spec_from_file_location("baseline_server", module_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["baseline_server"] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    lm = load_model(model_dir)
    monitor = ActivationMonitor(lm.model, load_fingerprint(fp_path), registry=CollectorRegistry(),
                                tokenizer=lm.tokenizer)
    monitor.attach()
    monitor.check_integrity()
    srv = mod.build_server(mod.ServeContext(lm, monitor, mod.ServerLimits()), host="127.0.0.1", port=0)
    print(f"port {srv.server_address[1]}", flush=True)
    srv.serve_forever()


def start(module_path: str, model_dir: Path, fp: Path, log: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--_serve", module_path, str(model_dir), str(fp)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("port "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, int(line.split()[1])


def one(port: int, method: str, path: str, body: bytes | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def load(port: int, method: str, path: str, body: bytes | None, clients: int, seconds: float) -> dict:
    counts: dict = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        mine: dict = {}
        while time.monotonic() < stop:
            try:
                outcome = one(port, method, path, body)
            except Exception as err:  # counted, reported
                outcome = type(err).__name__
            mine[outcome] = mine.get(outcome, 0) + 1
        with lock:
            for k, v in mine.items():
                counts[k] = counts.get(k, 0) + v

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    return {"rps": counts.get(200, 0) / took, "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per endpoint and server")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--baseline-rev", default="b18ec2c", help="git revision with the stdlib server.py")
    parser.add_argument("--_serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        serve(*args._serve)
        return

    from tests.builders import planted_fingerprint, planted_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, _ = planted_model(tmp / "model")
        fp = planted_fingerprint(model_dir, tmp / "fingerprint.safetensors")
        old = tmp / "stdlib_server.py"
        source = f"{args.baseline_rev}:achilles_guard/monitor/server.py"
        git = subprocess.run(["git", "-C", str(REPO), "show", source], check=True, capture_output=True)
        old.write_bytes(git.stdout)
        endpoints = [("GET /metrics", "GET", "/metrics", None),
                     ("POST /v1/completions (max_tokens 1)", "POST", "/v1/completions", COMPLETION)]
        results = {}
        for name, module in (("stdlib", str(old)), ("uvicorn", "new")):
            proc, port = start(module, model_dir, fp, tmp / f"{name}.log")
            try:
                for label, method, path, body in endpoints:
                    load(port, method, path, body, args.clients, min(1.0, args.seconds))  # warm-up
                    results[(name, label)] = load(port, method, path, body, args.clients, args.seconds)
            finally:
                proc.kill()
                proc.wait()
        print(f"{args.clients} clients, a new connection per request, {args.seconds:g} s per endpoint; "
              f"baseline: server.py at {args.baseline_rev}")
        for label, *_ in endpoints:
            old_r, new_r = results[("stdlib", label)], results[("uvicorn", label)]
            print(f"{label:38s} stdlib {old_r['rps']:8.1f} req/s   Starlette/uvicorn {new_r['rps']:8.1f} req/s   "
                  f"ratio {new_r['rps'] / max(old_r['rps'], 1e-9):.2f}")
            for name, r in (("stdlib", old_r), ("uvicorn", new_r)):
                other = {k: v for k, v in r["counts"].items() if k != 200}
                if other:
                    print(f"    {name}: other outcomes {other}")


if __name__ == "__main__":
    main()
