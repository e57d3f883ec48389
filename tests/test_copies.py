"""Known copies (achilles_guard/engine/copies.py): the neurons a hardening step duplicated are found bit for bit,
an untouched model has none, grouped rankings keep copies together, and the copy-aware greedy tries one
member per group."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from achilles_guard.defenses.heads import duplicate_heads, plan_heads
from achilles_guard.defenses.redundancy import plan_redundancy, widen_residual
from achilles_guard.engine.copies import copy_groups, has_copies
from achilles_guard.engine.neurons import Neuron, discover
from achilles_guard.engine.pcicn import Ranking
from tests.builders import tiny_model


def _fp(*records):
    return SimpleNamespace(
        neurons=tuple(
            SimpleNamespace(neuron=Neuron(m, c), component=comp, layer=layer, critical=True, attacks=())
            for m, c, comp, layer in records
        )
    )


def _members(cands, groups, module, channel):
    """The (module, channel) copies of one neuron."""
    offsets = cands.offsets
    index = {c.name: i for i, c in enumerate(cands.candidates)}
    g = groups[int(offsets[index[module]]) + channel]
    return {str(n) for n in cands.neurons((groups == g).nonzero().flatten().tolist())}


def test_an_untouched_model_has_no_copies():
    model = tiny_model("llama")
    cands = discover(model, "all")
    groups = copy_groups(model, cands)
    assert groups.shape == (cands.total,) and not has_copies(groups)


def test_residual_carriers_and_duplicated_heads_are_copies():
    model = tiny_model("llama").double()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    plan = plan_redundancy(model, _fp(("model.layers.1.mlp.down_proj", 5, "mlp_out", 1)), [ids], copies=3)
    widen_residual(model, plan)
    head_dim = model.config.head_dim
    duplicate_heads(model, plan_heads(model, _fp(("model.layers.0.self_attn.v_proj", 1, "attn_in", 0)), copies=2))
    cands = discover(model, "all")
    groups = copy_groups(model, cands)
    assert has_copies(groups)
    for module in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.input_layernorm"):
        carriers = _members(cands, groups, module, 5)
        assert len(carriers) == 3 and f"{module}[5]" in carriers  # channel 5 and its two copies
        assert len(_members(cands, groups, module, 4)) == 1  # a channel that was not made redundant
    v = _members(cands, groups, "model.layers.0.self_attn.v_proj", 1)
    assert len(v) == 2  # the value row of the duplicated KV head, and its copy
    assert {int(s.split("[")[1][:-1]) % head_dim for s in v} == {1}  # the same row of two heads


def test_grouped_ranking_sums_copies_and_keeps_them_together():
    model = tiny_model("llama")
    cands = discover(model, "all")
    n = cands.total
    scores = torch.zeros(n)
    scores[[0, 1, 2, 3]] = torch.tensor([5.0, 3.0, 2.0, 4.0])
    plain = Ranking.from_scores("pcicn", cands, scores)
    assert plain.grouped(torch.arange(n)) is plain  # no copies: the same ranking
    groups = torch.arange(n)
    groups[2] = 1  # neurons 1 and 2 are copies: 3 + 2 = 5 ties neuron 0, whose best member ranks first
    grouped = plain.grouped(groups)
    assert grouped.order[:4].tolist() == [0, 1, 2, 3]
    assert grouped.importance[:4].tolist() == [5.0, 5.0, 5.0, 4.0]
    groups[3] = 1  # 3 + 2 + 4 = 9 now leads, members in their own order
    assert plain.grouped(groups).order[:4].tolist() == [3, 1, 2, 0]


def test_the_copy_aware_greedy_takes_a_split_unit_as_one_neuron(planted):
    """Known by construction: the plant's one MLP unit collapses the model alone (greedy n = 1). Split into
    4 copies (gate/up rows copied, down columns / 4), no single copy does; the copy-aware greedy adds the
    unit's whole group in one step and pruning keeps only copies of that one unit, whose Δ re-measures."""
    from achilles_guard.defenses.split import SplitPlan, split_model
    from achilles_guard.engine.demo import Plant
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from tests.builders import PROBE
    from tests.test_portfolio import independent_delta

    lm = load_model(planted[0])
    probe = tokenize_probe(lm, "probe", PROBE)
    unit = Plant().unit
    split_model(lm.model, SplitPlan(4, {0: (unit,)}, (), (), {}))
    width = lm.model.config.intermediate_size
    copies = {unit, *range(width - 3, width)}
    assert independent_delta(lm.model, probe.input_ids, [Neuron("model.layers.0.mlp.gate_proj", unit)]) < 1
    params = ScanParams(samples=3, attacks="greedy", greedy_pool=4, max_neurons=10)
    plain = run_scan(lm, [probe], params).primary.portfolio.attacks[0]
    assert plain.curve[0][0] == 1  # a plain scan does not look for copies: one neuron per step
    result = run_scan(lm, [probe], params, copy_aware=True)
    (greedy,) = result.primary.portfolio.attacks
    assert greedy.converged and greedy.curve[0][0] == 4  # the first step masked the 4 copies together
    modules = {n.module for n in greedy.critical_set}
    assert len(modules) == 1 and modules <= {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                            "model.layers.0.mlp.act_fn"}
    assert {n.channel for n in greedy.critical_set} <= copies and 2 <= greedy.n <= 4
    assert independent_delta(lm.model, probe.input_ids, greedy.critical_set) == pytest.approx(
        greedy.delta_log10, abs=1e-3
    )


def test_the_known_attack_retries_a_set_with_every_copy(planted):
    """The plant's unit collapses the original alone; split into 4 copies, the `known` attack re-tries
    {gate_proj[unit]} as all 4 copies and prunes to the copies the collapse needs."""
    from achilles_guard.defenses.split import SplitPlan, split_model
    from achilles_guard.engine.demo import Plant
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from tests.builders import PROBE
    from tests.test_portfolio import independent_delta

    unit = Plant().unit
    known = ((Neuron("model.layers.0.mlp.gate_proj", unit), Neuron("model.layers.7.mlp.gate_proj", 0)),)  # 7: none
    lm = load_model(planted[0])
    probe = tokenize_probe(lm, "probe", PROBE)
    params = ScanParams(samples=3, attacks="pcicn", max_neurons=10)
    (_, before) = run_scan(lm, [probe], params, known_sets=known).primary.portfolio.attacks
    assert before.attack == "known" and before.n == 1
    split_model(lm.model, SplitPlan(4, {0: (unit,)}, (), (), {}))
    width = lm.model.config.intermediate_size
    (_, after) = run_scan(lm, [probe], params, known_sets=known, copy_aware=True).primary.portfolio.attacks
    assert after.attack == "known" and after.converged and after.n_found == 4 and 2 <= after.n <= 4
    assert {n.channel for n in after.critical_set} <= {unit, *range(width - 3, width)}
    measured = independent_delta(lm.model, probe.input_ids, after.critical_set)
    assert measured == pytest.approx(after.delta_log10, abs=1e-3)
    none = ((Neuron("model.layers.1.mlp.gate_proj", 0),),)
    (_, nothing) = run_scan(lm, [probe], params, known_sets=none, copy_aware=True).primary.portfolio.attacks
    assert not nothing.converged and nothing.note == "none of 1 known set(s) collapses it"


def test_pruning_cuts_copy_groups_in_one_batched_pass_and_stays_1_minimal(planted, monkeypatch):
    """The plant's unit and an ordinary unit, each split into 32 copies: pruning the 64 copies with the copy
    groups drops the ordinary unit's copies in one pass and keeps as many of the plant's as plain leave-one-out
    does; the result is 1-minimal (re-measured with plain hooks) at a fraction of the masked forwards (rows)."""
    from achilles_guard.defenses.split import SplitPlan, split_model
    from achilles_guard.engine import portfolio
    from achilles_guard.engine.demo import Plant
    from achilles_guard.engine.scan import tokenize_probe
    from achilles_guard.formats.load import load_model
    from tests.builders import PROBE
    from tests.test_portfolio import independent_delta

    lm = load_model(planted[0])
    ids = tokenize_probe(lm, "probe", PROBE).input_ids
    unit, other = Plant().unit, Plant().unit + 6
    width = lm.model.config.intermediate_size
    split_model(lm.model, SplitPlan(32, {0: (unit, other)}, (), (), {}))
    cands = discover(lm.model, "all")
    groups = copy_groups(lm.model, cands)
    gate = next(i for i, c in enumerate(cands.candidates) if c.name == "model.layers.0.mlp.gate_proj")
    start = int(cands.offsets[gate])
    members = sorted(start + c for c in (unit, other, *range(width, width + 62)))
    plant = set(groups[start + unit].eq(groups).nonzero().flatten().tolist())
    assert len(plant) == 32 and len(set(groups[members].tolist())) == 2
    baseline = portfolio.clean_loss(lm.model, ids)
    rows = []
    real = portfolio.set_losses

    def counting(*args, **kw):
        rows.append(int(args[4].shape[0]))
        return real(*args, **kw)

    monkeypatch.setattr(portfolio, "set_losses", counting)
    plain, plain_delta = portfolio.prune(lm.model, ids, cands, members, baseline=baseline, epsilon=1.0)
    plain_rows, rows[:] = sum(rows), []
    kept, delta = portfolio.prune(lm.model, ids, cands, members, baseline=baseline, epsilon=1.0, groups=groups)
    assert set(kept) <= plant and set(plain) <= plant and len(kept) == len(plain) and min(delta, plain_delta) >= 1
    assert sum(rows) * 5 < plain_rows, (sum(rows), plain_rows)
    neurons = cands.neurons(kept)
    assert independent_delta(lm.model, ids, neurons) == pytest.approx(delta, abs=1e-3)
    for drop in range(len(neurons)):
        assert independent_delta(lm.model, ids, neurons[:drop] + neurons[drop + 1:]) < 1.0
