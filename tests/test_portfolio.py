"""The attack portfolio (achilles_guard/engine/portfolio.py) on the planted fixture, where the sets are known
by construction: the three layer-0 down_proj channels (cooperative) and, upstream, the single MLP
unit that writes them (gate_proj[Plant.unit])."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from achilles_guard.cli import app, main
from achilles_guard.engine.demo import Plant
from achilles_guard.engine.neurons import Neuron, discover
from achilles_guard.engine.pcicn import clean_loss, masked_losses, rank
from achilles_guard.engine.portfolio import ATTACKS, parse_attacks, prune, set_losses
from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.errors import UsageError
from achilles_guard.formats.load import load_model
from achilles_guard.report.documents import scan_report
from tests.builders import PROBE

UNIT = Neuron("model.layers.0.mlp.gate_proj", Plant().unit)


def independent_delta(model, input_ids, neurons) -> float:
    """Δ log10 PPL of zeroing `neurons` with plain forward hooks and plain cross-entropy."""
    def loss():
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        return float(F.cross_entropy(logits, input_ids[0, 1:]))

    clean = loss()
    handles = []
    for n in neurons:
        def zero(mod, args, out, c=n.channel):
            out = out.clone()
            out[..., c] = 0.0
            return out
        handles.append(model.get_submodule(n.module).register_forward_hook(zero))
    try:
        return (loss() - clean) / math.log(10)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def lm(planted):
    return load_model(planted[0])


@pytest.fixture(scope="module")
def probe(lm):
    return tokenize_probe(lm, "probe", PROBE)


def test_parse_attacks():
    assert parse_attacks("all") == ATTACKS
    assert parse_attacks("greedy, pcicn") == ("pcicn", "greedy")
    for bad in ("", " , ", "pcicn,magic"):
        with pytest.raises(UsageError):
            parse_attacks(bad)


def test_greedy_finds_the_planted_set(lm, probe, planted):
    result = run_scan(lm, [probe], ScanParams(samples=3, attacks="greedy", components="mlp-out"))
    (greedy,) = result.primary.portfolio.attacks
    assert greedy.attack == "greedy" and greedy.converged
    assert set(greedy.critical_set) == planted[1] and greedy.n == 3
    assert [n for n, _ in greedy.curve] == [1, 2, 3] and greedy.curve[1][1] < 0.01 <= 1 <= greedy.curve[2][1]
    assert independent_delta(lm.model, probe.input_ids, greedy.critical_set) == pytest.approx(
        greedy.delta_log10, abs=1e-3
    )


def test_portfolio_beats_the_paper_on_the_plant(lm, probe, planted):
    """All candidates: PCICN finds the 3 channels; greedy finds the one upstream unit that writes them."""
    result = run_scan(lm, [probe], ScanParams(samples=5))
    doc = scan_report(result)
    assert {(n["module"], n["channel"]) for n in doc["critical_set"]} == {(n.module, n.channel) for n in planted[1]}
    by = {a["attack"]: a for a in doc["attacks"]}
    assert list(by) == list(ATTACKS)
    assert by["pcicn"]["n"] == 3 and by["greedy"]["n"] == 1
    assert by["activation"]["note"] == "none below 3" and by["gradient"]["note"] == "none below 3"
    assert doc["strongest"]["attack"] == "greedy" and doc["strongest"]["n"] == 1
    assert (
        doc["strongest"]["critical_set"][0]["module"] == UNIT.module
        and doc["strongest"]["critical_set"][0]["channel"] == UNIT.channel
    )
    for a in (by["pcicn"], by["greedy"]):
        got = independent_delta(
            lm.model, probe.input_ids, [Neuron(n["module"], n["channel"]) for n in a["critical_set"]]
        )
        assert got == pytest.approx(a["delta_log10"], abs=1e-3) and got >= 1
    assert "seconds" not in by["pcicn"] and set(doc["timings"]["attacks"]) == set(ATTACKS)


def test_pruning_drops_a_redundant_neuron(lm, probe, planted):
    candidates = discover(lm.model, "all")
    by_name = {c.name: i for i, c in enumerate(candidates.candidates)}
    index = lambda n: int(candidates.offsets[by_name[n.module]]) + n.channel  # noqa: E731
    extra = Neuron("model.layers.2.mlp.down_proj", 5)  # not part of the construction
    members = [index(n) for n in sorted(planted[1])] + [index(extra)]
    baseline = clean_loss(lm.model, probe.input_ids)
    kept, delta = prune(lm.model, probe.input_ids, candidates, members, baseline=baseline, epsilon=1.0)
    assert set(candidates.neurons(kept)) == planted[1] and delta >= 1.0
    # 1-minimal: no single neuron of the result can go
    for drop in planted[1]:
        assert independent_delta(lm.model, probe.input_ids, planted[1] - {drop}) < 1.0


def test_set_losses_match_the_ranked_search(lm, probe):
    """Per-row sets through MaskPlan.per_row equal the top-n plans of pcicn.search."""
    candidates = discover(lm.model, "all")
    ranking = rank(lm.model, probe.input_ids, candidates, method="activation")
    ns = [1, 2, 5, 9]
    pool = ranking.order[:9]
    hit = torch.arange(9)[None, :] < torch.tensor(ns)[:, None]
    got = set_losses(lm.model, probe.input_ids, candidates, pool, hit, batch_size=3)
    want = masked_losses(lm.model, probe.input_ids, ranking, ns)
    assert torch.allclose(got, want, atol=1e-5)


def test_pcicn_only_keeps_the_papers_result(lm, probe):
    full = scan_report(run_scan(lm, [probe], ScanParams(samples=4)))
    paper = scan_report(run_scan(lm, [probe], ScanParams(samples=4, attacks="pcicn")))
    for key in ("critical_set", "n_star", "delta_log10", "curve", "ranking", "converged", "baseline"):
        assert full[key] == paper[key], key
    assert [a["attack"] for a in paper["attacks"]] == ["pcicn"] and paper["strongest"]["attack"] == "pcicn"


def _scan(args, tmp_path):
    return CliRunner().invoke(app, ["scan", *args, "--samples", "3", "--out", str(tmp_path)])


def test_gate_and_sarif_follow_the_strongest_attack(planted, tmp_path):
    path, _ = planted
    result = _scan([str(path), "--text", PROBE, "--fail-under", "1"], tmp_path / "a")
    assert result.exit_code == 1 and "Strongest attack: greedy" in result.output
    result = _scan([str(path), "--text", PROBE, "--fail-under", "1", "--attacks", "pcicn"], tmp_path / "b")
    assert result.exit_code == 0
    result = _scan([str(path), "--text", PROBE, "--fail-under", "1", "--format", "sarif"], tmp_path / "c")
    gate = [r for r in json.loads(result.stdout)["runs"][0]["results"] if r["ruleId"] == "AG002"]
    assert result.exit_code == 1 and len(gate) == 1 and gate[0]["properties"]["attack"] == "greedy"


def test_fingerprint_covers_every_attack(planted, tmp_path):
    from achilles_guard.integrity.fingerprint import load_fingerprint

    path, critical = planted
    assert _scan([str(path), "--text", PROBE], tmp_path).exit_code == 0
    fp = load_fingerprint(tmp_path / "fingerprint.safetensors")
    watched = {r.neuron for r in fp.neurons}  # the monitor watches every fingerprinted neuron
    assert critical | {UNIT} <= watched
    found = {n["module"]: n["attacks"] for n in json.loads(fp.metadata["neurons"]) if n["attacks"]}
    assert found[UNIT.module] == ["greedy"]
    assert {r.neuron for r in fp.neurons if r.critical} == critical  # `critical` stays the paper's set
    assert set(fp.critical_set) == critical  # the paper's set, as before


@pytest.mark.parametrize("args,fragment", [
    (["--attacks", "magic"], "unknown attack 'magic'"),
    (["--attacks", ""], "--attacks"),
    (["--attacks", "greedy", "--greedy-pool", "100000"], "larger than the model's"),
    (["--greedy-pool", "0"], "--greedy-pool must be >= 1"),
])
def test_bad_attack_options_exit_2(args, fragment, planted, tmp_path, capsys):
    code = main(["scan", str(planted[0]), "--text", PROBE, "--samples", "2", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
