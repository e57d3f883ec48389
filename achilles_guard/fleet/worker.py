"""One model of a fleet: the single-model command in a subprocess, its output published atomically.

`run_one(entry, job)` is the whole unit of work every backend runs (in a thread of the fleet
process, or inside a Ray task on another node):

1. digest the model's files (SHA-256, 1 MiB reads) and, for verify, its fingerprint;
2. when OUT/<id>/fleet-model.json records the same digests and the same options and every output is
   there, return its stored row marked `cached` (unless `force`);
3. otherwise run `python -m achilles_guard scan MODEL --out STAGING --format sarif ...` (or
   `verify-checkpoint MODEL --fingerprint FP --format json ...`) with STAGING a fresh hidden
   directory beside OUT/<id>; the worker's pid is in STAGING/worker.pid while it runs;
4. exit 0 or 1 (a result, possibly a finding): STAGING becomes OUT/<id> in one rename, replacing the
   previous output; anything else (bad input, runtime failure, a crash, a signal, a time-out):
   STAGING is removed, the previous output (if any) stays as it was, and the row carries the
   worker's last stderr line and its exit code.

The digests are taken before the worker starts: a file that changes while it is scanned no longer
matches them, so the next run scans it again.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from achilles_guard import __version__
from achilles_guard.errors import EXIT_FINDING, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, first_line
from achilles_guard.fleet.inventory import ModelEntry, model_files
from achilles_guard.formats.staging import staged_dir
from achilles_guard.report.documents import atomic_write_bytes, dumps, gate_size, verify_sarif

__all__ = ["Job", "ModelResult", "run_one", "terminate_all", "reset_stop", "OUTPUTS", "MODEL_FILE"]

MODEL_FILE = "fleet-model.json"
MODEL_SCHEMA = "achilles-guard/fleet-model/v1"
OUTPUTS = {
    "scan": ("report.json", "fingerprint.safetensors", "report.sarif"),
    "verify": ("verify.json", "verify.sarif"),
}
_CHUNK = 1 << 20

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()
_stopping = threading.Event()  # set by terminate_all: no new worker starts after a Ctrl-C
try:  # Linux: a worker dies with the fleet process (or Ray task) that started it, never an orphan
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover
    _prctl = None


@dataclass(frozen=True)
class Job:
    """What every model of one fleet run gets."""

    command: str  # "scan" or "verify"
    out: Path  # OUT, absolute
    args: tuple[str, ...] = ()  # options forwarded to the single-model command
    cache_key: str = ""  # JSON of the options (and text/key digests) that decide a model's result
    fingerprints: Path | None = None  # verify: a previous `fleet scan` OUT
    force: bool = False
    timeout_s: float | None = None
    threads: int | None = None  # --jobs N: each worker's torch threads (cores / N), unless OMP_NUM_THREADS is set


@dataclass(frozen=True)
class ModelResult:
    """One row of fleet.json."""

    id: str
    path: str
    verdict: str
    exit_code: int
    n_star: int | None = None
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


class _Failed(Exception):
    def __init__(self, result: ModelResult):
        super().__init__(result.error)
        self.result = result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def reset_stop() -> None:
    _stopping.clear()


def terminate_all() -> None:
    """Stop every worker this process started (Ctrl-C) and start no new one: their staging goes."""
    with _live_lock:
        _stopping.set()
        procs = list(_live)
    for proc in procs:
        try:
            proc.terminate()
        except OSError:
            pass


def _verdict(command: str, code: int, doc: dict | None) -> str:
    if code == EXIT_OK:
        return "intact" if command == "verify" else "ok"
    if code == EXIT_FINDING:
        return str(doc.get("verdict", "finding")) if (command == "verify" and doc) else "gate failed"
    return {EXIT_USAGE: "bad input", EXIT_RUNTIME: "runtime failure"}.get(code, "failed")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return (line[len("error: "):] if line.startswith("error: ") else line)[:500]


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _cached(entry: ModelEntry, job: Job, manifest: dict) -> ModelResult | None:
    target = job.out / entry.id
    stored = _read_json(target / MODEL_FILE)
    if not stored or stored.get("input") != manifest or not isinstance(stored.get("result"), dict):
        return None
    if not all((target / name).is_file() for name in OUTPUTS[job.command]):
        return None
    try:
        row = ModelResult(**stored["result"])
    except TypeError:
        return None
    return replace(row, path=str(entry.path), cached=True)


def _fingerprint_n_star(job: Job, entry: ModelEntry) -> int | None:
    doc = _read_json(job.fingerprints / entry.id / "report.json") if job.fingerprints else None
    try:
        return gate_size(doc) if doc else None
    except (KeyError, TypeError):
        return None


def _command(entry: ModelEntry, job: Job, staging: Path, fingerprint: Path | None) -> list[str]:
    base = [sys.executable, "-m", "achilles_guard"]
    if job.command == "scan":
        return [*base, "scan", str(entry.path), "--out", str(staging), "--format", "sarif", *job.args]
    return [*base, "verify-checkpoint", str(entry.path), "--fingerprint", str(fingerprint), "--format", "json",
            *job.args]


def _run_worker(cmd: list[str], staging: Path, job: Job) -> tuple[int, str]:
    """(exit code, last stderr line); a signal or a time-out is a runtime failure (exit 3)."""
    stdout_path = staging / ("verify.json" if job.command == "verify" else ".stdout")
    err_path = staging / ".stderr"
    (staging / "task.pid").write_text(f"{os.getpid()}\n")
    with open(stdout_path, "wb") as out, open(err_path, "wb") as err:
        env = None
        if job.threads and "OMP_NUM_THREADS" not in os.environ:  # N workers x all cores each: oversubscribed
            env = {**os.environ, "OMP_NUM_THREADS": str(job.threads)}
        with _live_lock:
            if _stopping.is_set():
                return 130, "interrupted before it started"
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                    preexec_fn=_die_with_parent if _prctl else None)
            _live.add(proc)
        try:
            (staging / "worker.pid").write_text(f"{proc.pid}\n")
            try:
                code = proc.wait(timeout=job.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return EXIT_RUNTIME, f"timed out after {job.timeout_s:g} s (--model-timeout); worker killed"
            except BaseException:  # Ctrl-C in the fleet process: the worker goes with it
                proc.kill()
                proc.wait()
                raise
        finally:
            with _live_lock:
                _live.discard(proc)
    last = _last_line(err_path)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return EXIT_RUNTIME, f"worker killed by {name}" + (f"; last line: {last}" if last else "")
    return code, last


def run_one(entry: ModelEntry, job: Job) -> ModelResult:
    """Scan or verify one model (see the module docstring); never raises for a model's own failure."""
    t0 = time.perf_counter()

    def failed(code: int, error: str, n_star: int | None = None) -> ModelResult:
        return ModelResult(entry.id, str(entry.path), _verdict(job.command, code, None), code, n_star,
                           round(time.perf_counter() - t0, 3), False, error)

    fingerprint = None
    n_star = None
    if job.command == "verify":
        fingerprint = job.fingerprints / entry.id / "fingerprint.safetensors"
        if not fingerprint.is_file():
            return failed(EXIT_USAGE, f"no fingerprint for this model: {fingerprint} (run guard fleet scan first)")
        n_star = _fingerprint_n_star(job, entry)
    try:
        if not entry.path.exists():
            return failed(EXIT_USAGE, f"{entry.path}: no such directory or file")
        files = {p.name: _sha256(p) for p in model_files(entry)}
        manifest = {"tool_version": __version__, "command": job.command, "options": job.cache_key,
                    "files": files, "fingerprint": _sha256(fingerprint) if fingerprint else None}
    except OSError as err:
        return failed(EXIT_USAGE, f"{entry.path}: cannot read ({err.strerror or first_line(err)})")
    if not job.force and (hit := _cached(entry, job, manifest)) is not None:
        return hit
    target = job.out / entry.id
    try:
        with staged_dir(target, mode="replace") as staging:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; OUT/<id> gets the usual permissions
            code, last = _run_worker(_command(entry, job, staging, fingerprint), staging, job)
            if code not in (EXIT_OK, EXIT_FINDING):
                raise _Failed(failed(code, last or f"worker exited {code}", n_star))
            doc = None
            if job.command == "verify":
                doc = _read_json(staging / "verify.json")
                if doc is None:
                    raise _Failed(failed(EXIT_RUNTIME, "the worker wrote no verification document", n_star))
                # the file SARIF is the single-model command's own rendering of the same document
                atomic_write_bytes(staging / "verify.sarif", dumps(verify_sarif(doc)).encode())
            else:
                report = _read_json(staging / "report.json")
                if report is None or not all((staging / n).is_file() for n in OUTPUTS["scan"]):
                    raise _Failed(failed(EXIT_RUNTIME, "the worker exited without writing its outputs"))
                n_star = gate_size(report)
            for scratch in ("task.pid", "worker.pid", ".stderr", ".stdout"):
                (staging / scratch).unlink(missing_ok=True)
            row = ModelResult(entry.id, str(entry.path), _verdict(job.command, code, doc), code, n_star,
                              round(time.perf_counter() - t0, 3), False, None)
            atomic_write_bytes(staging / MODEL_FILE, dumps(
                {"schema": MODEL_SCHEMA, "input": manifest, "result": row.to_json()}).encode())
    except _Failed as failure:
        return failure.result
    except OSError as err:
        return failed(EXIT_RUNTIME, f"{target}: {err.strerror or first_line(err)}", n_star)
    return row
