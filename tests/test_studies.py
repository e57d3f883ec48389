"""Each study runs on the tiny planted model in seconds and yields a table + a PNG."""

from __future__ import annotations

import pytest

from achilles_guard.engine.scan import ScanParams, tokenize_probe
from achilles_guard.formats.load import load_model
from achilles_guard.research import studies
from achilles_guard.research.evaluation import Corpus
from achilles_guard.research.plots import PNG_MAGIC, spec_png
from achilles_guard.research.studies.base import PlotSpec


@pytest.fixture(scope="module")
def ctx(planted, probe_text):
    lm = load_model(planted[0])
    probe = tokenize_probe(lm, "probe", probe_text)
    corpus = Corpus.build(probe.input_ids[0].cpu(), max_length=probe.tokens, stride=probe.tokens - 1)
    return studies.StudyContext(lm, probe, corpus, ScanParams(samples=6, max_neurons=40))


def _check(result, tmp_path):
    png = spec_png(result.plot)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    doc = result.as_dict()
    assert doc["schema"] == "achilles-guard/study/v1" and len(doc["rows"]) == len(result.rows)
    assert PlotSpec.from_dict(doc["plot"]).as_dict() == doc["plot"]  # the HTML report re-renders from JSON
    return doc


def test_lesion_all_subsets_only_full_set_collapses(ctx, planted, tmp_path):
    result = studies.lesion_study(ctx)
    doc = _check(result, tmp_path)
    assert len(doc["rows"]) == 7
    assert {r["subset"] for r in doc["rows"]} == {"[0,1,2]", "[0,1]", "[0,2]", "[1,2]", "[0]", "[1]", "[2]"}
    collapsed = [r["subset"] for r in doc["rows"] if r["collapsed"]]
    assert collapsed == ["[0,1,2]"]
    assert doc["rows"][0]["delta_log10"] > 5
    assert max(r["delta_log10"] for r in doc["rows"][1:]) < 0.1
    assert set(doc["params"]["critical_set"]) == {str(n) for n in planted[1]}


def test_lesion_subset_plan_rows_match_bitmasks(planted):
    neurons = tuple(sorted(planted[1]))
    plan, membership = studies.subset_plan(neurons)
    assert membership.shape == (7, 3) and plan.rows == 7
    module = neurons[0].module
    assert (plan.factors[module] == 0).eq(membership).all()


def test_alpha_samples_epsilon(ctx, tmp_path):
    alpha = studies.alpha_study(ctx, [1.0, 5.0])
    assert [r[1] for r in alpha.rows] == [3, 3]
    _check(alpha, tmp_path)
    samples = studies.samples_study(ctx, [2, 6])
    assert all(r[1] == 3 for r in samples.rows)
    _check(samples, tmp_path)
    eps = studies.epsilon_study(ctx, [1.0, 5.0, 1e6])
    assert [r[1] for r in eps.rows][:2] == [3, 3]
    assert str(eps.rows[2][1]).startswith("not converged")
    _check(eps, tmp_path)


def test_scale_beta_zero_collapses_beta_near_one_does_not(ctx, tmp_path):
    result = studies.scale_study(ctx, [0.0, 0.8, 5.0])
    by_beta = {r[0]: r[3] for r in result.rows}
    assert by_beta[1.0] == pytest.approx(0.0, abs=1e-6)
    assert by_beta[0.0] > 5 and abs(by_beta[0.8]) < 1
    _check(result, tmp_path)


def test_precision_same_collapse_in_each_dtype(ctx, tmp_path):
    result = studies.precision_study(ctx, ["float32", "float64", "bfloat16"])
    rows = {r[0]: r for r in result.rows}
    assert rows["float32"][4] > 5 and rows["float64"][4] > 5
    assert rows["float64"][1] == pytest.approx(rows["float32"][1], abs=1e-3)
    _check(result, tmp_path)


def test_texts_agreement_and_min_length(ctx, tmp_path):
    result = studies.texts_study(
        ctx,
        lengths=[2, 12, 30],
        texts=[("other", "A different paragraph about rivers, bridges and bread in the town.")],
    )
    doc = _check(result, tmp_path)
    assert doc["rows"][0]["same_set"] is True
    assert doc["params"]["min_agreeing_length"] == 2  # the planted value is on at every token: 2 tokens already agree


def test_components_and_compare(ctx, tmp_path):
    comp = studies.components_study(ctx, presets=["mlp-out", "gate", "attention"], counts=[3, 10], runs=2)
    rows = {(r[0], r[1], r[2]): r[3] for r in comp.rows}
    assert rows[("mlp-out", "pcicn", 3)] > 5  # the planted set is the top of mlp-out
    assert rows[("attention", "pcicn", 10)] < 1
    _check(comp, tmp_path)
    cmp = studies.compare_study(ctx, ns=[0, 3, 20], rankings=["pcicn", "random"], runs=2)
    first = cmp.rows[0]
    assert first[1] == pytest.approx(first[2], abs=1e-6)  # n = 0: every ranking is the clean model
    assert cmp.rows[1][1] - first[1] > 5  # pcicn collapses at 3
    _check(cmp, tmp_path)
