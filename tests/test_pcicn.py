"""PCICN: stage 1 against a per-sample reference loop, batched stage 2 against sequential evaluation,
ties, planted sets (Llama and GPT-2, several layers and sizes), budgets, other rankings, determinism."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from achilles_guard.engine import pcicn
from achilles_guard.engine.demo import Plant, plant_massive
from achilles_guard.engine.masking import MaskPlan, hooks, masked
from achilles_guard.engine.neurons import discover
from achilles_guard.engine.perplexity import LN10
from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.formats.load import load_model
from achilles_guard.report.documents import scan_report
from tests.builders import PROBE, tiny_model, tokenizer
from tests.plants import plant_gpt2


@pytest.fixture(scope="module")
def ids():
    return tokenizer()(PROBE, return_tensors="pt")["input_ids"]  # (1, T)


def reference_importance(model, ids, candidates, *, alpha, samples, seed) -> torch.Tensor:
    """docs/design.md stage 1 written plainly: K forwards one at a time, (N,) importance in forward order."""
    names = [c.name for c in candidates.candidates]
    T = ids.shape[1]
    acts: dict[str, torch.Tensor] = {}
    grab = {
        n: (lambda out, n=n: acts.__setitem__(n, out.reshape(-1, T, out.shape[-1])[0].float().clone())) for n in names
    }
    with torch.no_grad(), hooks(model, grab):
        embeds = model.get_input_embeddings()(ids)  # (1, T, d)
        model.base_model(inputs_embeds=embeds, use_cache=False)
        clean = dict(acts)
        total = {n: torch.zeros_like(clean[n]) for n in names}
        generator = torch.Generator().manual_seed(seed)
        for _ in range(samples):
            noise = torch.randn(T, embeds.shape[2], generator=generator)  # (T, d)
            model.base_model(inputs_embeds=embeds + alpha * noise[None], use_cache=False)
            for n in names:
                total[n] += (clean[n] - acts[n]).abs()
    return torch.cat([(total[n] / samples).amax(dim=0) for n in names])


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_stage1_equals_per_sample_reference(family, ids):
    model = tiny_model(family)
    cands = discover(model, "all")
    ref = reference_importance(model, ids, cands, alpha=5.0, samples=7, seed=3)
    ref_importance, ref_order = torch.sort(ref, descending=True, stable=True)
    for batch_size in (None, 3):
        got = pcicn.rank(model, ids, cands, alpha=5.0, samples=7, seed=3, batch_size=batch_size)
        assert len(got) == cands.total
        torch.testing.assert_close(got.importance, ref_importance, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref[got.order], got.importance, rtol=1e-5, atol=1e-6)
        # same order, except where two neurons' importances are equal to float tolerance
        gaps = (ref_importance[:-1] - ref_importance[1:]).abs() > 1e-5 * ref_importance[:-1].abs().clamp_min(1e-6)
        clear = torch.cat([gaps, torch.tensor([True])]) & torch.cat([torch.tensor([True]), gaps])
        assert torch.equal(got.order[clear], ref_order[clear])
        assert clear.float().mean() > 0.95
        # module_index/channels describe order
        assert [str(n) for n in got.top(5)] == [str(n) for n in cands.neurons(got.order[:5].tolist())]


def test_ties_break_by_forward_order_then_channel(ids):
    model = tiny_model("llama")
    with torch.no_grad():  # layer 1's q and k projections output 0 whatever the input
        model.model.layers[1].self_attn.q_proj.weight.zero_()
        model.model.layers[1].self_attn.k_proj.weight.zero_()
    cands = discover(model, "all")
    ranking = pcicn.rank(model, ids, cands, samples=4)
    zero = ranking.importance == 0
    tail = ranking.order[zero]
    assert tail.numel() >= 32 + 16
    assert torch.all(tail[1:] > tail[:-1]), "tied neurons must come in forward order, then channel"
    names = [n.module for n in ranking.top(len(ranking))[-tail.numel():]]
    assert names.index("model.layers.1.self_attn.q_proj") < names.index("model.layers.1.self_attn.k_proj")
    # the same rule for any scores: stable sort over the forward layout
    scores = torch.zeros(cands.total)
    scores[[5, 9, 2]] = 1.0
    r = pcicn.Ranking.from_scores("pcicn", cands, scores)
    assert r.order[:4].tolist() == [2, 5, 9, 0]


def sequential_search(model, ids, ranking, *, epsilon, step, max_neurons):
    """Stage 2 written plainly: one masked forward per n, stop at the first Δ >= ε."""
    base = pcicn.clean_loss(model, ids)
    curve = []
    for n in range(step, min(max_neurons, len(ranking)) + 1, step):
        with masked(model, MaskPlan.fixed(ranking.top(n))):
            delta = (pcicn.clean_loss(model, ids) - base) / LN10
        curve.append((n, delta))
        if delta >= epsilon:
            return n, curve
    return None, curve


@pytest.fixture(scope="module")
def planted_llama():
    model = tiny_model("llama", hidden=64, layers=4, intermediate=128)
    return model, plant_massive(model, Plant(layer=0, channels=(11, 29, 47)))


@pytest.mark.parametrize("ranking_method", ["pcicn", "random"])
def test_batched_stage2_equals_sequential(planted_llama, ids, ranking_method):
    model, critical = planted_llama
    cands = discover(model, "all")
    ranking = pcicn.rank(model, ids, cands, method=ranking_method, samples=5, seed=1)
    epsilon, step, budget = (1.0, 1, 40) if ranking_method == "pcicn" else (1.0, 7, 120)
    n_ref, curve_ref = sequential_search(model, ids, ranking, epsilon=epsilon, step=step, max_neurons=budget)
    for batch_size in (None, 1, 3, 64):
        got = pcicn.search(model, ids, ranking, epsilon=epsilon, step=step, max_neurons=budget, batch_size=batch_size)
        assert got.n_star == n_ref
        assert got.converged == (n_ref is not None)
        assert [n for n, _ in got.curve] == [n for n, _ in curve_ref]
        for (_, a), (_, b) in zip(got.curve, curve_ref):
            assert abs(a - b) < 1e-4
    if ranking_method == "pcicn":
        assert n_ref == 3
    # masked_losses gives the same numbers whatever the batch
    ns = list(range(1, 12))
    a = pcicn.masked_losses(model, ids, ranking, ns, batch_size=1)
    b = pcicn.masked_losses(model, ids, ranking, ns, batch_size=5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def _model_with_plant(family, plant):
    model = tiny_model(family, hidden=64, layers=4, intermediate=128)
    critical = plant_gpt2(model, plant) if family == "gpt2" else plant_massive(model, plant)
    return model, critical


PLANTS = [
    ("llama", Plant(layer=0, channels=(11,))),
    ("llama", Plant(layer=1, channels=(11, 29, 47))),
    ("llama", Plant(layer=2, channels=(5, 11, 29, 47))),
    ("llama", Plant(layer=0, channels=(5, 11, 29, 47, 60))),
    ("gpt2", Plant(layer=0, channels=(11, 29))),
    ("gpt2", Plant(layer=1, channels=(7,))),
    ("gpt2", Plant(layer=2, channels=(5, 11, 29, 47))),
    ("gpt2", Plant(layer=0, channels=(5, 11, 29, 47, 60))),
]


@pytest.mark.parametrize("family,plant", PLANTS, ids=[f"{f}-L{p.layer}-k{len(p.channels)}" for f, p in PLANTS])
def test_planted_set_found_exactly(family, plant, ids):
    model, critical = _model_with_plant(family, plant)
    assert len(critical) == len(plant.channels)
    cands = discover(model, "all")
    ranking = pcicn.rank(model, ids, cands, samples=8, seed=42)
    result = pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=60)
    assert result.converged and result.n_star == len(critical)
    assert set(result.critical_set) == critical
    assert result.delta_log10 >= 1.0
    # cooperative: every proper subset leaves the model intact (Δ < ε), in one batched forward
    subsets = [s for r in range(1, len(critical)) for s in itertools.combinations(sorted(critical), r)]
    if subsets:
        base = pcicn.clean_loss(model, ids)
        for subset in subsets:
            with masked(model, MaskPlan.fixed(subset)):
                delta = (pcicn.clean_loss(model, ids) - base) / LN10
            assert delta < 1.0, f"subset {subset} alone collapses the model (Δ={delta:.2f})"
    # a budget below the set size cannot converge
    if len(critical) > 1:
        short = pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=len(critical) - 1)
        assert not short.converged and short.n_star is None and short.critical_set == ()
        assert [n for n, _ in short.curve] == list(range(1, len(critical)))
        assert math.isfinite(short.delta_log10) and short.delta_log10 < 1.0


def test_other_rankings(planted_llama, ids):
    model, critical = planted_llama
    cands = discover(model, "all")
    activation = pcicn.rank(model, ids, cands, method="activation")
    assert set(activation.top(3)) == critical  # the massive channels are the largest activations
    gradient = pcicn.rank(model, ids, cands, method="gradient")
    assert gradient.method == "gradient" and torch.isfinite(gradient.importance).all()
    assert gradient.importance.max() > 0
    for r in (activation, gradient):
        assert torch.equal(torch.sort(r.order).values, torch.arange(cands.total))
    a = pcicn.rank(model, ids, cands, method="random", seed=7)
    b = pcicn.rank(model, ids, cands, method="random", seed=7)
    c = pcicn.rank(model, ids, cands, method="random", seed=8)
    assert torch.equal(a.order, b.order) and not torch.equal(a.order, c.order)
    assert torch.equal(torch.sort(a.order).values, torch.arange(cands.total))
    with pytest.raises(Exception, match="--ranking"):
        pcicn.rank(model, ids, cands, method="magic")


def _without_timings(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k != "timings"}
    doc["texts"] = [{k: v for k, v in t.items() if k != "timings"} for t in doc["texts"]]
    return doc


def test_same_seed_same_report(planted):
    path, critical = planted
    lm = load_model(path)
    probes = [tokenize_probe(lm, "a", PROBE), tokenize_probe(lm, "b", PROBE.upper())]
    params = ScanParams(samples=6, seed=5, max_neurons=50)
    first = scan_report(run_scan(lm, probes, params))
    second = scan_report(run_scan(lm, probes, params))
    assert first["timings"] and _without_timings(first) == _without_timings(second)
    assert {(n["module"], n["channel"]) for n in first["critical_set"]} == {(n.module, n.channel) for n in critical}
    other = scan_report(run_scan(lm, probes, ScanParams(samples=6, seed=6, max_neurons=50)))
    assert other["ranking"] != first["ranking"]  # the seed does reach the noise


def _plain_batched_importance(model, ids, candidates, *, alpha, samples, seed, batch_size) -> torch.Tensor:
    """Stage 1 as it was written before the in-place accumulate and the one-call noise draw: a fresh
    (out - clean).abs().sum(0) per module and forward, and b separate (T, d) draws stacked."""
    names = [c.name for c in candidates.candidates]
    T = ids.shape[1]
    clean, sums = {}, {}

    def keep(n):
        def fn(out):
            clean[n] = out.reshape(-1, T, out.shape[-1])[0].float().clone()
            sums[n] = torch.zeros_like(clean[n])
        return fn

    def acc(n):
        def fn(out):
            sums[n] += (out.reshape(-1, T, out.shape[-1]).float() - clean[n]).abs().sum(0)
        return fn

    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        with hooks(model, {n: keep(n) for n in names}):
            model.base_model(inputs_embeds=embeds, use_cache=False)
        generator = torch.Generator().manual_seed(seed)
        with hooks(model, {n: acc(n) for n in names}):
            for start in range(0, samples, batch_size):
                b = min(batch_size, samples - start)
                noise = torch.stack([torch.randn(T, embeds.shape[2], generator=generator) for _ in range(b)])
                model.base_model(inputs_embeds=(embeds.float() + alpha * noise).to(embeds.dtype), use_cache=False)
    return torch.cat([(sums[n] / samples).amax(dim=0) for n in names])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stage1_is_bit_identical_to_the_plain_batched_form(family, ids):
    model = tiny_model(family)
    cands = discover(model, "all")
    for batch_size in (4, 7):
        ref = _plain_batched_importance(model, ids, cands, alpha=5.0, samples=9, seed=42, batch_size=batch_size)
        got = pcicn._pcicn_scores(model, model.get_input_embeddings()(ids).detach(), cands, 5.0, 9, 42, batch_size,
                                  None)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("T, d", [(16, 96), (13, 64), (5, 20), (3, 5)])
def test_noise_in_one_draw_equals_one_draw_per_sample(T, d):
    g = torch.Generator().manual_seed(42)
    one = torch.stack([torch.randn(T, d, generator=g) for _ in range(5)])
    assert torch.equal(pcicn._noise(torch.Generator().manual_seed(42), 5, T, d), one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_nll_in_chunks_equals_one_row_at_a_time(dtype, monkeypatch):
    """The batched (chunked) next-token NLL is bit-identical to the row-by-row form it replaced, in every
    chunking: one chunk, several, and one row per chunk."""
    import torch.nn.functional as F

    from achilles_guard.engine import perplexity

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(13, 21, 517, generator=g) * 7).to(dtype)
    ids = torch.randint(0, 517, (13, 21), generator=g)

    def by_row(logits, ids):
        rows = []
        for b in range(logits.shape[0]):
            lp = F.log_softmax(logits[b, :-1].float(), dim=-1)
            rows.append(-lp.gather(-1, ids[b if ids.shape[0] > 1 else 0, 1:, None]).squeeze(-1))
        return torch.stack(rows)

    want = by_row(logits, ids)
    for budget in (perplexity.UPCAST_BYTES, 5 * 20 * 517 * 4, 1):
        monkeypatch.setattr(perplexity, "UPCAST_BYTES", budget)
        assert torch.equal(perplexity.token_nll(logits, ids), want), budget
        assert torch.equal(perplexity.token_nll(logits, ids[:1]), by_row(logits, ids[:1])), budget
