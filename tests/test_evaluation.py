"""guard eval's engine: corpus loading, sliding windows, level 0 = the unmasked model, n* collapses."""

from __future__ import annotations

import json

import pytest
import torch

from achilles_guard.engine.perplexity import row_losses
from achilles_guard.errors import InputError, UsageError
from achilles_guard.formats.load import load_model
from achilles_guard.research.evaluation import (
    Corpus,
    ReportRanking,
    config_losses,
    evaluate_levels,
    load_corpus,
    parse_levels,
    tokenize_corpus,
)
from tests.builders import PROBE


@pytest.fixture(scope="module")
def lm(planted):
    return load_model(planted[0])


@pytest.fixture(scope="module")
def ranked(planted, lm, tmp_path_factory):
    """A scan report's ranking without running a scan: the planted set first, then a few others."""
    path, critical = planted
    others = [{"module": "model.layers.1.mlp.down_proj", "channel": c} for c in range(5)]
    ranking = [{"module": n.module, "channel": n.channel} for n in sorted(critical)] + others
    doc = {"schema": "achilles-guard/scan/v1", "model": {"config_sha256": lm.config_sha256},
           "params": {"epsilon": 1.0, "mask_scale": 0.0}, "n_star": 3, "ranking": ranking,
           "critical_set": ranking[:3]}
    report = tmp_path_factory.mktemp("rep") / "report.json"
    report.write_text(json.dumps(doc))
    return ReportRanking.load(report, lm)


@pytest.mark.parametrize("n,max_length,stride", [(50, 16, 8), (50, 16, 15), (50, 16, 1), (10, 16, 8), (17, 16, 5)])
def test_windows_score_every_token_exactly_once(n, max_length, stride):
    ids = torch.arange(n)
    corpus = Corpus.build(ids, max_length=max_length, stride=stride)
    W, L = corpus.windows.shape
    assert L == min(max_length, n)
    targets = corpus.windows[:, 1:][corpus.scored]  # ids are positions: the scored target positions
    assert sorted(targets.tolist()) == list(range(1, n))  # each of 1..N-1 once, token 0 never
    assert corpus.scored_tokens == n - 1
    assert torch.equal(corpus.windows, corpus.starts[:, None] + torch.arange(L))


def test_stride_must_leave_context():
    with pytest.raises(UsageError, match="--stride"):
        Corpus.build(torch.arange(40), max_length=16, stride=16)


def test_level0_equals_independent_unmasked_ppl_and_nstar_collapses(lm, ranked):
    ids = tokenize_corpus(lm, [PROBE])
    one = Corpus.build(ids, max_length=ids.numel(), stride=ids.numel() - 1)  # a single window
    with torch.no_grad():
        independent = float(row_losses(lm.model(input_ids=ids[None]).logits, ids[None])[0])
    result = evaluate_levels(lm, one, ranked, [0, 1, 2, 3])
    assert result.baseline_loss == pytest.approx(independent, rel=1e-5)
    by_n = {r.n: r for r in result.levels}
    assert by_n[0].loss == pytest.approx(independent, rel=1e-5)
    assert by_n[2].delta_log10 < 0.1  # a proper subset does nothing
    assert by_n[3].delta_log10 > 5  # n* collapses


def test_windowed_loss_equals_sum_of_per_token_nll(lm):
    ids = tokenize_corpus(lm, [PROBE, PROBE])
    corpus = Corpus.build(ids, max_length=24, stride=10)
    with torch.no_grad():  # reference: each target scored in its own window, computed one window at a time
        total = 0.0
        for w in range(corpus.windows.shape[0]):
            row = corpus.windows[w][None]
            logp = torch.log_softmax(lm.model(input_ids=row).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, row[0, 1:, None]).squeeze(-1)
            total += float(nll[corpus.scored[w]].sum())
    batched = config_losses(lm.model, corpus, None, batch_size=3)
    assert float(batched[0]) == pytest.approx(total / (ids.numel() - 1), rel=1e-5)


def test_corpus_formats(tmp_path, lm):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"other": 1}\n')
    assert load_corpus(tmp_path) == ["hello world", "one", "two"]
    assert load_corpus(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("  \n")
    with pytest.raises(InputError, match="no text"):
        load_corpus(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_corpus(tmp_path / "bad.jsonl")


def test_levels_parsing(ranked):
    assert parse_levels("0,2,n*,1", ranked) == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="negative"):
        parse_levels("0,-1", ranked)
    with pytest.raises(UsageError, match="beyond the ranking"):
        parse_levels("0,9", ranked)
    with pytest.raises(UsageError, match="not an integer"):
        parse_levels("a", ranked)
