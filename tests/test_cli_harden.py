"""`guard harden` and `guard repair` through the CLI: CliRunner and real subprocesses, exit codes, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.integrity.fingerprint import load_fingerprint
from tests.builders import run_guard, scanned

runner = CliRunner()


@pytest.fixture(scope="module")
def scan_dir(planted, tmp_path_factory):
    """Budget 10 = 10 x n0 (greedy's one unit) and a greedy pool of 8: harden re-attacks with these params and
    searches to the ceiling 10 x 10 x n0 = 100 (reattack.search_ceiling), not the scan default 1000."""
    return scanned(planted[0], tmp_path_factory.mktemp("scan"), max_neurons=10, greedy_pool=8)


def test_pin_mitigates_through_cli_runner(planted, scan_dir, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                              "--strategy", "pin", "--out", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "harden-report.json").read_text())
    assert doc["verdict"] == "mitigated" and doc["attempts"][0]["clean_cost_probe"] == 0.0
    assert (out / "report.json").is_file()


def test_split_on_residual_set_exits_1_in_a_subprocess(planted, scan_dir, tmp_path):
    proc = run_guard(["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                      "--strategy", "split", "--copies", "2", "--out", str(tmp_path / "out")])
    assert proc.returncode == 1, proc.stderr
    assert "residual-stream channels" in proc.stdout and "not mitigated" in proc.stdout
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_a_chain_that_repeats_a_defence_keeps_every_step(planted, scan_dir, tmp_path):
    """`rotate+rotate`: each step has its own directory (rotate/, rotate-2/), checkpoint, re-scan and details."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                              "--strategy", "rotate+rotate", "--out", str(out), "--format", "json"])
    assert res.exit_code in (0, 1), res.output
    attempt = json.loads((out / "harden-report.json").read_text())["attempts"][0]
    assert [s["defense"] for s in attempt["steps"]] == ["rotate", "rotate"]
    assert set(attempt["details"]) == {"rotate", "rotate-2"} and attempt["hardened_model"] == "rotate-2/model"
    for step in ("rotate", "rotate-2"):
        assert (out / step / "model" / "config.json").is_file() and (out / step / "report.json").is_file()
    assert (out / "rotate" / "fingerprint.safetensors").read_bytes() != (
        out / "rotate-2" / "fingerprint.safetensors"
    ).read_bytes()


def test_auto_tries_the_cheapest_first_and_says_why_it_stopped(planted, scan_dir, tmp_path):
    res = runner.invoke(app, ["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                              "--strategy", "auto", "--out", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / "harden-report.json").read_text())
    assert [a["strategy"] for a in doc["attempts"]] == ["pin"]  # the runtime guard mitigates: auto stops there
    assert doc["verdict"] == "mitigated" and res.exit_code == 0
    assert doc["stopped"].startswith("pin is mitigated") and doc["tried"][0].startswith("pin: mitigated")
    attempt = doc["attempts"][0]
    assert "hardened_model" not in attempt  # a runtime guard writes no checkpoint
    assert attempt["margin"] is None and attempt["margin_text"].startswith("none within budget")
    assert {a["attack"] for a in attempt["attacks"]} == {"pcicn", "activation", "gradient", "greedy", "known"}
    known = next(a for a in attempt["attacks"] if a["attack"] == "known")  # the scan's own sets, re-tried
    assert known["n_after"] is None and known["note_after"].startswith("none of ")
    assert all(a["delta_at_n0_after"] is None or a["delta_at_n0_after"] < 1 for a in attempt["attacks"])
    assert attempt["table"][0]["metric"].startswith("margin")  # the margin comes first


def test_unknown_strategy_and_runtime_guard_not_last_exit_2(planted, scan_dir, tmp_path):
    for strategy in ("bogus", "pin+redundancy"):
        res = runner.invoke(app, ["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                                  "--strategy", strategy, "--out", str(tmp_path / "out")])
        assert res.exit_code == 2 and not (tmp_path / "out").exists(), res.output


def test_repair_subprocess_restores_a_zeroed_slice(planted, scan_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    fp = load_fingerprint(scan_dir / "fingerprint.safetensors")
    bad = tmp_path / "bad"
    shutil.copytree(planted[0], bad)
    rec = fp.slices[fp.critical_records[0].slices[0]]
    with safe_open(str(bad / rec.shard), framework="pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    tensors[rec.checkpoint_key].select(rec.axis, rec.index).zero_()
    save_file(tensors, str(bad / rec.shard), metadata=meta)
    proc = run_guard(["repair", str(bad), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                      "--out", str(tmp_path / "fixed"), "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["counts"]["restored"] == 1 and doc["verified"]


@pytest.mark.parametrize(
    "case",
    [
        "no-fingerprint",
        "no-report",
        "copies-0",
        "out-is-input",
        "rotate-gpt2",
        "empty-data",
        "repair-in-place",
        "unloadable-model",
        "model-of-another-fingerprint",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, planted, scan_dir, tmp_path, random_gpt2):
    model, fp = str(planted[0]), str(scan_dir / "fingerprint.safetensors")
    out = tmp_path / "out"
    args = ["harden", model, "--fingerprint", fp, "--strategy", "pin", "--out", str(out)]
    if case == "no-fingerprint":
        args[3] = str(tmp_path / "missing.safetensors")
    elif case == "no-report":
        lonely = tmp_path / "lonely"
        lonely.mkdir()
        shutil.copy(fp, lonely / "fingerprint.safetensors")
        args[3] = str(lonely / "fingerprint.safetensors")
    elif case == "copies-0":
        args[5:6] = ["split", "--copies", "0"]
    elif case == "out-is-input":
        args[-1] = model
    elif case == "rotate-gpt2":
        args[1], args[3] = str(random_gpt2[0]), str(random_gpt2[1] / "fingerprint.safetensors")
        args[5] = "rotate"
    elif case == "empty-data":
        (tmp_path / "empty").mkdir()
        args[5:6] = ["finetune", "--data", str(tmp_path / "empty")]
    elif case == "repair-in-place":
        args = ["repair", model, "--fingerprint", fp, "--out", model]
    elif case == "unloadable-model":  # fails only when the model loads, after OUT was created
        (tmp_path / "no-model").mkdir()
        args[1] = str(tmp_path / "no-model")
        args[-1] = str(out / "nested" / "deeper")
    elif case == "model-of-another-fingerprint":  # the model loads; its config hash differs from the fingerprint's
        args[1] = str(random_gpt2[0])
    before = sorted(p.name for p in planted[0].iterdir())
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert len([line for line in res.output.strip().splitlines() if line.strip()]) == 1, res.output
    assert not out.exists()
    assert sorted(p.name for p in planted[0].iterdir()) == before


@pytest.fixture(scope="module")
def random_gpt2(tmp_path_factory):
    from tests.builders import save_model, tiny_model

    root = tmp_path_factory.mktemp("gpt2")
    path = save_model(tiny_model("gpt2"), root / "m")
    return path, scanned(path, root / "scan", max_neurons=5)


MALFORMED = '{"schema": "achilles-guard/scan/v1", "texts": [{"converged": true, "critical_set": [{"module": 3}]}]}'


@pytest.mark.parametrize("content", [None, "{not json", MALFORMED])
def test_a_bad_known_sets_report_exits_2_before_writing(content, planted, scan_dir, tmp_path):
    bad = tmp_path / "known.json"
    if content is not None:
        bad.write_text(content)
    res = runner.invoke(app, ["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                              "--strategy", "pin", "--known-sets", str(bad), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and not (tmp_path / "out").exists(), res.output
    assert len([line for line in res.output.strip().splitlines() if line.strip()]) == 1, res.output
    assert str(bad) in res.output


@pytest.mark.parametrize("flag", ["--head-copies", "--redundancy-wide"])
def test_one_copy_exits_2_before_writing(flag, planted, scan_dir, tmp_path):
    res = runner.invoke(app, ["harden", str(planted[0]), "--fingerprint", str(scan_dir / "fingerprint.safetensors"),
                              "--strategy", "redundancy+heads", flag, "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and not (tmp_path / "out").exists(), res.output
    assert f"{flag} must be >= 2" in res.output
