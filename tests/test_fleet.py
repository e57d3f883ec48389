"""`guard fleet scan|verify` through the real entry point on a registry of tiny models built here.

One planted model (n* = 3 by construction), one clean random one, one with a hostile config.json
(custom code it would have to run), and for `fleet verify` a copy with the planted critical rows
zeroed. Every run is a real `python -m achilles_guard fleet ...` subprocess; each model is scanned
by its own `guard scan` worker. The scan fixture is itself the resume test: the first run is
SIGKILLed (with its workers) right after the first model is published, the second run finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from achilles_guard.errors import InputError
from achilles_guard.fleet.inventory import discover, stable_id
from tests.builders import PROBE, REPO, edited, planted_model, run_guard, save_model, tiny_model

SCAN_OPTS = ["--samples", "4", "--max-neurons", "48", "--attacks", "pcicn", "--fingerprint-top", "8",
             "--text", PROBE]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def build_registry(root: Path) -> dict:
    """planted (n* 3), clean, hostile (auto_map): the fleet every test here gates."""
    planted, critical = planted_model(root / "team-a" / "planted", layers=2)
    clean = save_model(tiny_model("llama"), root / "team-a" / "clean")
    hostile = save_model(tiny_model("llama", seed=1), root / "team-b" / "hostile")
    config = json.loads((hostile / "config.json").read_text())
    (hostile / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.M"}}))
    return {"planted": planted, "clean": clean, "hostile": hostile, "critical": critical}


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def one_line(stderr: str) -> str:
    err = stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def published(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / "fleet-model.json").is_file()) if out.is_dir() else []


def finished_rows(out: Path) -> int:
    """How many rows fleet.json records as done (0 while it is absent; it is only ever renamed in whole)."""
    try:
        doc = json.loads((out / "fleet.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(r["verdict"] != "pending" for r in doc["models"])


def rows(out: Path) -> dict:
    doc = json.loads((out / "fleet.json").read_text())
    assert doc["schema"] == "achilles-guard/fleet/v1"
    return {Path(r["path"]).name: r for r in doc["models"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A registry, a fleet scan killed after its first model, and the rerun that finishes it."""
    root = tmp_path_factory.mktemp("registry")
    models = build_registry(root)
    out = tmp_path_factory.mktemp("fleet-out") / "out"
    cmd = [sys.executable, "-m", "achilles_guard", "fleet", "scan", str(root), "--out", str(out), *SCAN_OPTS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # kill once the first model is published AND fleet.json records it (the fleet publishes, then
        # rewrites fleet.json: a kill between the two leaves the result on disk and the row pending)
        while not (published(out) and finished_rows(out) >= 1) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.02)
        first = published(out)
        assert len(first) == 1, f"the first model was not published before the deadline: {first}"
        os.killpg(proc.pid, signal.SIGKILL)  # the fleet process and its worker: a lost job, no clean-up
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = {"published": first, "fleet": json.loads((out / "fleet.json").read_text()),
              "mtime": (first[0] / "report.json").stat().st_mtime_ns}
    rerun = run_guard(["fleet", "scan", str(root), "--out", str(out), *SCAN_OPTS, "--jobs", "2"])
    return root, models, out, killed, rerun


def test_discovery_walks_sorted_skips_hidden_and_lists_match(tmp_path):
    for rel in ("b/m2", "a/m1", "a/m1/inner", ".hidden/m3", "c/nested/deep/m4"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "config.json").write_text("{}")
        (tmp_path / rel / "model.safetensors").write_bytes(b"")
    (tmp_path / "c" / "x.gguf").write_bytes(b"GGUF")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")  # no weights: not a model
    found = discover(tmp_path)
    assert [e.rel for e in found] == ["a/m1", "b/m2", "c/nested/deep/m4", "c/x.gguf"]
    assert [e.kind for e in found] == ["dir", "dir", "dir", "gguf"]
    assert len({e.id for e in found}) == 4 and found[0].id == stable_id("a/m1") and found[0].id.startswith("a__m1-")
    assert stable_id("a/b_c") != stable_id("a_b/c") and stable_id("a b") != stable_id("a_b")
    listing = tmp_path / "models.txt"
    listing.write_text("# the registry\nb/m2\n\na/m1\n")
    assert [(e.id, e.path) for e in discover(listing)] == [(found[1].id, found[1].path), (found[0].id, found[0].path)]
    listing.write_text("a/m1\na/m1/\n")
    with pytest.raises(InputError, match="listed twice"):
        discover(listing)
    with pytest.raises(InputError, match="no model found"):
        discover(tmp_path / "d")


def test_killed_run_loses_nothing_and_the_rerun_does_only_the_rest(fleet):
    _, _, out, killed, rerun = fleet
    doc = killed["fleet"]  # fleet.json as the killed run left it: whole, with the rest pending
    assert not doc["complete"] and sum(r["verdict"] != "pending" for r in doc["models"]) == 1
    assert rerun.returncode == 2, rerun.stderr
    got = rows(out)
    first = killed["published"][0].name
    cached = {name for name, r in got.items() if r["cached"]}
    assert [r["id"] for r in got.values() if r["cached"]] == [first], got
    assert len(cached) == 1 and all(r["seconds"] > 0 for r in got.values() if not r["cached"])
    assert (out / first / "report.json").stat().st_mtime_ns == killed["mtime"]  # not re-run
    assert not [p for p in out.iterdir() if ".staging-" in p.name or ".old-" in p.name]  # swept


def test_scan_verdicts_files_and_exit_code(fleet):
    _, models, out, _, rerun = fleet
    got = rows(out)
    assert got["planted"]["verdict"] == "ok" and got["planted"]["n_star"] == 3 and got["planted"]["exit_code"] == 0
    assert got["clean"]["verdict"] == "ok" and got["clean"]["exit_code"] == 0 and got["clean"]["error"] is None
    h = got["hostile"]
    assert h["verdict"] == "bad input" and h["exit_code"] == 2 and "--trust-remote-code" in h["error"]
    assert not (out / h["id"]).exists()  # a failed model publishes nothing
    doc = json.loads((out / "fleet.json").read_text())
    assert doc["complete"] and doc["exit_code"] == 2 and doc["counts"] == {"ok": 2, "bad input": 1}
    for name in ("planted", "clean"):
        d = out / got[name]["id"]
        assert sorted(p.name for p in d.iterdir()) == ["fingerprint.safetensors", "fleet-model.json", "report.json",
                                                       "report.sarif"]
        report = json.loads((d / "report.json").read_text())
        assert report["schema"] == "achilles-guard/scan/v1" and report["params"]["samples"] == 4
    planted_report = json.loads((out / got["planted"]["id"] / "report.json").read_text())
    assert {(n["module"], n["channel"]) for n in planted_report["strongest"]["critical_set"]} == {
        (n.module, n.channel) for n in models["critical"]}
    sarif = json.loads((out / "fleet.sarif").read_text())
    assert sarif["version"] == "2.1.0" and len(sarif["runs"]) == 3
    by_id = {r["automationDetails"]["id"]: r for r in sarif["runs"]}
    own = json.loads((out / got["planted"]["id"] / "report.sarif").read_text())["runs"][0]
    assert {k: v for k, v in by_id[f"guard-fleet/{got['planted']['id']}/"].items() if k != "automationDetails"} == own
    assert sum(r["ruleId"] == "AG001" for r in own["results"]) == 3
    bad = by_id[f"guard-fleet/{h['id']}/"]
    assert bad["results"] == [] and bad["invocations"][0]["exitCode"] == 2
    assert not bad["invocations"][0]["executionSuccessful"]
    # the console table: model, n*, verdict, seconds
    assert "team-a/planted" in rerun.stdout and "bad input" in rerun.stdout and "n*" in rerun.stdout


def test_unchanged_rerun_is_cached_and_force_reruns(fleet, tmp_path):
    root, models, out, _, _ = fleet
    # the state a kill between publishing a model and rewriting fleet.json leaves: results on disk, every
    # row pending; the cache is each model's own published folder, so nothing finished is lost or re-run
    summary = json.loads((out / "fleet.json").read_text())
    for r in summary["models"]:
        r["verdict"] = "pending"
    (out / "fleet.json").write_text(json.dumps(summary))
    again = run_guard(["fleet", "scan", str(root), "--out", str(out), *SCAN_OPTS, "--format", "json"])
    assert again.returncode == 2, again.stderr
    doc = json.loads(again.stdout)
    assert {Path(r["path"]).name: r["cached"] for r in doc["models"]} == {"planted": True, "clean": True,
                                                                          "hostile": False}  # errors are retried
    assert doc["cached"] == 2
    # other options are another result: not cached
    forced_out = tmp_path / "forced"
    shutil.copytree(out, forced_out)
    listing = root / "clean-only.txt"
    listing.write_text("team-a/clean\n")
    before = (forced_out / rows(out)["clean"]["id"] / "report.json").stat().st_mtime_ns
    forced = run_guard(["fleet", "scan", str(listing), "--out", str(forced_out), *SCAN_OPTS, "--force",
                        "--format", "json"])
    assert forced.returncode == 0, forced.stderr
    (row,) = json.loads(forced.stdout)["models"]
    assert row["id"] == rows(out)["clean"]["id"] and not row["cached"] and row["verdict"] == "ok"
    assert (forced_out / row["id"] / "report.json").stat().st_mtime_ns != before


@pytest.fixture(scope="module")
def verified(fleet, tmp_path_factory):
    """A copy of the registry with the planted critical rows zeroed, verified against the fleet scan."""
    root, models, out, _, _ = fleet
    vroot = tmp_path_factory.mktemp("verify-root")
    critical = models["critical"]

    def zero(t):
        for n in critical:
            t[f"{n.module}.weight"][n.channel] = 0

    edited(models["planted"], vroot / "team-a" / "planted", zero)
    shutil.copytree(models["clean"], vroot / "team-a" / "clean")
    shutil.copytree(models["hostile"], vroot / "team-b" / "hostile")  # its scan failed: no fingerprint
    vout = tmp_path_factory.mktemp("verify-out") / "out"
    result = run_guard(["fleet", "verify", str(vroot), "--fingerprints", str(out), "--out", str(vout),
                        "--jobs", "2", "--format", "json"])
    return vroot, out, vout, result


def test_fleet_verify_tampered_intact_and_missing(verified):
    vroot, out, vout, result = verified
    assert result.returncode == 2, result.stderr
    got = {Path(r["path"]).name: r for r in json.loads(result.stdout)["models"]}
    assert got["planted"]["verdict"] == "tampered" and got["planted"]["exit_code"] == 1
    assert got["planted"]["n_star"] == 3
    assert got["clean"]["verdict"] == "intact" and got["clean"]["exit_code"] == 0
    assert got["hostile"]["exit_code"] == 2 and "no fingerprint" in got["hostile"]["error"]
    doc = json.loads((vout / got["planted"]["id"] / "verify.json").read_text())
    assert doc["schema"] == "achilles-guard/verify/v1" and len(doc["tampered_neurons"]) == 3
    # verify.sarif is what `guard verify-checkpoint --format sarif` prints for the same model
    direct = run_guard(["verify-checkpoint", str(vroot / "team-a" / "planted"), "--fingerprint",
                        str(out / got["planted"]["id"] / "fingerprint.safetensors"), "--format", "sarif"])
    assert direct.returncode == 1
    mine = json.loads((vout / got["planted"]["id"] / "verify.sarif").read_text())
    assert mine == json.loads(direct.stdout)
    # only the models that have a fingerprint: the worst is the finding
    listing = vroot / "fingerprinted.txt"
    listing.write_text("team-a/planted\nteam-a/clean\n")
    gate = run_guard(["fleet", "verify", str(listing), "--fingerprints", str(out), "--out", str(vout),
                      "--quick", "--format", "json"])
    assert gate.returncode == 1, gate.stderr
    assert [r["exit_code"] for r in json.loads(gate.stdout)["models"]] == [1, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("prometheus-pushgateway"),
                    reason="no prometheus-pushgateway binary (Debian package of that name; .ci/run installs it)")
def test_pushgateway_receives_every_model(verified, tmp_path):
    vroot, out, vout, _ = verified
    port = _free_port()
    gw = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        result = run_guard(["fleet", "verify", str(vroot), "--fingerprints", str(out), "--out", str(vout),
                            "--pushgateway", url, "--format", "json"])
        assert result.returncode == 2 and "warning" not in result.stderr, result.stderr
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    finally:
        gw.terminate()
        gw.wait(10)
    samples = {(s.name, s.labels.get("model")): s for f in text_string_to_metric_families(text) for s in f.samples
               if s.labels.get("job") == "achilles_guard_fleet"}
    got = {Path(r["path"]).name: r for r in json.loads(result.stdout)["models"]}
    for name, code in (("planted", 1), ("clean", 0), ("hostile", 2)):
        assert samples[("guard_fleet_exit_code", got[name]["id"])].value == code
    assert samples[("guard_weight_integrity_ok", got["clean"]["id"])].value == 1
    assert samples[("guard_weight_integrity_ok", got["planted"]["id"])].value == 0
    assert samples[("guard_fleet_critical_neurons", got["planted"]["id"])].value == 3
    for name in got:  # the --quick run of the test above changed the options: these rows ran again
        assert samples[("guard_fleet_model_cached", got[name]["id"])].value == int(got[name]["cached"])


def test_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, fragment in ((["fleet", "scan", str(tmp_path / "absent")], "no such directory"),
                           (["fleet", "scan", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "no model found"),
                           (["fleet", "verify", str(tmp_path / "empty"), "--fingerprints", str(tmp_path / "nope")],
                            "--fingerprints")):
        result = run_guard(args)
        assert result.returncode == 2 and fragment in one_line(result.stderr), result.stderr
    assert not (tmp_path / "o").exists()


def test_ray_missing_says_how_to_install(tmp_path):
    """Without Ray (import blocked the way Python documents: sys.modules[name] = None), one line, exit 2."""
    code = ("import sys; sys.modules['ray'] = None; from achilles_guard.cli import main; "
            f"sys.exit(main(['fleet', 'scan', {str(tmp_path)!r}, '--ray', 'local']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2 and "pip install 'achilles-guard[ray]'" in one_line(result.stderr)


def test_help_documents_the_exit_order():
    result = run_guard(["fleet", "scan", "--help"])
    assert result.returncode == 0 and "worst over the models" in " ".join(result.stdout.split())


def test_ctrl_c_stops_the_workers_and_keeps_what_is_done(fleet, tmp_path):
    """SIGINT to the fleet process alone (not its group): it stops its own workers, removes their staging,
    writes fleet.json with the rest pending, exits 130; the previous results stay."""
    root, _, out, _, _ = fleet
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {p.name: (p / "report.json").stat().st_mtime_ns for p in published(copy)}
    proc = subprocess.Popen([sys.executable, "-m", "achilles_guard", "fleet", "scan", str(root), "--out", str(copy),
                             *SCAN_OPTS, "--force", "--jobs", "2"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    pids = []
    deadline = time.monotonic() + 60
    while not pids and time.monotonic() < deadline and proc.poll() is None:
        for f in copy.glob(".*.staging-*/worker.pid"):
            try:
                pids.append(int(f.read_text()))
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    assert pids, "no worker started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a worker outlived the interrupted fleet"
    assert not [p for p in copy.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    doc = json.loads((copy / "fleet.json").read_text())
    assert not doc["complete"] and any(r["verdict"] == "pending" for r in doc["models"])
    assert {p.name: (p / "report.json").stat().st_mtime_ns for p in published(copy)} == before
