"""`guard fleet --ray local` on a real Ray instance the fleet process starts (2 CPUs), one task per model.

The same registry as tests/test_fleet.py plus a fourth model whose Ray worker process the test
SIGKILLs while it runs (its pid is in the model's staging directory): that row becomes a crash
(exit 3), its `guard scan` child dies with it, no half-written output stays, the other models
finish, and the next run re-does only that model. Marker `ray`: deselected by the README's test
command, run by .ci/run's own step (`python -m pytest -q -m ray tests/test_fleet_ray.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from tests.builders import run_guard, save_model, tiny_model
from tests.test_fleet import ENV, SCAN_OPTS, alive, build_registry, rows

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-registry")
    models = build_registry(root)
    save_model(tiny_model("llama", seed=2), root / "team-c" / "victim")
    out = tmp_path_factory.mktemp("ray-out") / "out"
    cmd = [sys.executable, "-m", "achilles_guard", "fleet", "scan", str(root), "--out", str(out), *SCAN_OPTS,
           "--ray", "local", "--jobs", "2", "--format", "json"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    task = child = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        staging = sorted(out.glob(".team-c__victim-*.staging-*")) if out.is_dir() else []
        if staging and (staging[0] / "task.pid").is_file() and (staging[0] / "worker.pid").is_file():
            try:
                task = int((staging[0] / "task.pid").read_text())
                child = int((staging[0] / "worker.pid").read_text())
            except ValueError:  # caught mid-write
                continue
            os.kill(task, signal.SIGKILL)  # the Ray worker running the victim's task
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert task is not None, f"the victim's task never started: {stderr}"
    return root, models, out, proc.returncode, stdout, stderr, child


def test_ray_rows_killed_worker_and_exit_code(ray_fleet):
    root, models, out, code, stdout, stderr, child = ray_fleet
    assert code == 3 and stdout.startswith("{"), (stdout[:800], stderr[-800:])  # crash: the worst; stdout: JSON only
    got = {Path(r["path"]).name: r for r in json.loads(stdout)["models"]}
    assert got["victim"]["verdict"] == "crashed" and got["victim"]["exit_code"] == 3
    assert "ray task failed" in got["victim"]["error"]
    assert got["planted"]["verdict"] == "ok" and got["planted"]["n_star"] == 3
    assert got["clean"]["verdict"] == "ok" and got["clean"]["exit_code"] == 0
    assert got["hostile"]["verdict"] == "bad input" and "--trust-remote-code" in got["hostile"]["error"]
    assert rows(out) == got
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the killed task's guard scan worker outlived it"
    assert not (out / got["victim"]["id"]).exists()
    assert not [p for p in out.iterdir() if ".staging-" in p.name]  # swept at the end of the run
    sarif = json.loads((out / "fleet.sarif").read_text())
    assert len(sarif["runs"]) == 4
    assert sum(1 for r in sarif["runs"] if r.get("invocations", [{}])[0].get("executionSuccessful") is False) == 2


def test_ray_rerun_does_only_the_crashed_model_then_verifies(ray_fleet, tmp_path):
    root, _, out, *_ = ray_fleet
    again = run_guard(["fleet", "scan", str(root), "--out", str(out), *SCAN_OPTS, "--ray", "local", "--jobs", "2",
                       "--format", "json"])
    assert again.returncode == 2, again.stderr
    got = {Path(r["path"]).name: r for r in json.loads(again.stdout)["models"]}
    assert {n: r["cached"] for n, r in got.items()} == {"planted": True, "clean": True, "hostile": False,
                                                        "victim": False}
    assert got["victim"]["verdict"] == "ok"
    verify = run_guard(["fleet", "verify", str(root), "--fingerprints", str(out), "--out", str(tmp_path / "v"),
                        "--ray", "local", "--jobs", "2", "--format", "json"])
    assert verify.returncode == 2, verify.stderr
    vrows = {Path(r["path"]).name: r for r in json.loads(verify.stdout)["models"]}
    assert {n: r["verdict"] for n, r in vrows.items()} == {"planted": "intact", "clean": "intact",
                                                          "victim": "intact", "hostile": "bad input"}
