"""The fleet's own outputs: OUT/fleet.json (schema achilles-guard/fleet/v1), OUT/fleet.sarif, the exit code.

fleet.json lists every model in discovery order: the finished ones with their row, the ones not
run yet (an interrupted run) as `pending`. It is rewritten (temporary file + rename) after each
model, so it is never half-written and always says how far the run got.

fleet.sarif is one SARIF 2.1.0 log holding each model's own run unchanged (read from its
report.sarif or verify.sarif), with `automationDetails.id` set to `guard-fleet/<id>/` so a
code-scanning upload keeps the runs apart; a model that failed is a run with no results and an
unsuccessful invocation carrying its exit code and error line.

The exit code is the worst over the models: 3 (runtime failure, crashed worker, time-out) > 2 (bad
input, unsafe model, missing fingerprint) > 1 (finding: gate failed, tampered) > 0.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from achilles_guard.errors import EXIT_OK
from achilles_guard.fleet.inventory import ModelEntry
from achilles_guard.fleet.worker import Job, ModelResult
from achilles_guard.report.documents import SARIF_SCHEMA, TOOL, atomic_write_bytes, dumps

__all__ = ["FLEET_SCHEMA", "fleet_document", "fleet_sarif", "exit_code", "write"]

FLEET_SCHEMA = "achilles-guard/fleet/v1"
_SARIF_FILE = {"scan": "report.sarif", "verify": "verify.sarif"}


def exit_code(results: list[ModelResult]) -> int:
    return max((r.exit_code for r in results), default=EXIT_OK)


def fleet_document(job: Job, source: str, models: list[ModelEntry], results: dict[str, ModelResult],
                   seconds: float) -> dict:
    rows = []
    for e in models:
        r = results.get(e.id)
        rows.append(r.to_json() if r else {"id": e.id, "path": str(e.path), "verdict": "pending", "exit_code": None,
                                           "n_star": None, "seconds": None, "cached": False, "error": None})
    done = [results[e.id] for e in models if e.id in results]
    return {
        "schema": FLEET_SCHEMA,
        "tool": dict(TOOL),
        "command": job.command,
        "source": source,
        "out": str(job.out),
        "fingerprints": str(job.fingerprints) if job.fingerprints else None,
        "options": list(job.args),
        "complete": len(done) == len(models),
        "exit_code": exit_code(done),
        "counts": dict(Counter(r["verdict"] for r in rows)),
        "cached": sum(1 for r in done if r.cached),
        "seconds": round(seconds, 3),
        "models": rows,
    }


def fleet_sarif(job: Job, models: list[ModelEntry], results: dict[str, ModelResult]) -> dict:
    runs = []
    for e in models:
        r = results.get(e.id)
        if r is None:
            continue
        model_runs = None
        if r.error is None:
            try:
                model_runs = json.loads((job.out / e.id / _SARIF_FILE[job.command]).read_text())["runs"]
            except (OSError, ValueError, KeyError):
                model_runs = None
        if model_runs is None:
            model_runs = [{
                "tool": {"driver": {"name": TOOL["name"], "version": TOOL["version"], "rules": []}},
                "invocations": [{"executionSuccessful": False, "exitCode": r.exit_code,
                                 "toolExecutionNotifications": [{"level": "error", "message": {
                                     "text": f"{e.path}: {r.error or 'no SARIF output'}"}}]}],
                "results": [],
            }]
        for run in model_runs:
            runs.append({**run, "automationDetails": {"id": f"guard-fleet/{e.id}/"}})
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": runs}


def write(job: Job, source: str, models: list[ModelEntry], results: dict[str, ModelResult], seconds: float,
          *, sarif: bool = True) -> dict:
    doc = fleet_document(job, source, models, results, seconds)
    atomic_write_bytes(Path(job.out) / "fleet.json", dumps(doc).encode())
    if sarif:
        atomic_write_bytes(Path(job.out) / "fleet.sarif", dumps(fleet_sarif(job, models, results)).encode())
    return doc
