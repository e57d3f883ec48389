"""finetune: a short CPU run raises n* (re-attack measured), resume after interruption equals a straight run."""

from __future__ import annotations

import re

import pytest
import torch

from achilles_guard.defenses.finetune import FinetuneConfig, finetune
from achilles_guard.defenses.harden import HardenRequest, harden
from achilles_guard.engine.texts import default_texts
from achilles_guard.errors import InputError
from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from tests.builders import scanned


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "a.txt"
    path.write_text("\n".join(t for _, t in default_texts()) * 3)
    return path


@pytest.fixture(scope="module")
def scan_dir(planted, tmp_path_factory):
    return scanned(planted[0], tmp_path_factory.mktemp("scan"))


def test_short_run_raises_n_star_and_reports_the_original_mask(planted, scan_dir, corpus, tmp_path):
    ft = dict(data=str(corpus), steps=40, lr=3e-3, batch_size=4, seq_len=32, drop_p=0.5, drop_top=8)
    calls = []
    outcome = harden(
        HardenRequest(
            planted[0], scan_dir / "fingerprint.safetensors", None, "finetune", tmp_path / "out", finetune=ft
        ),
        progress=lambda *args: calls.append(args),
    )
    steps = [c for c in calls if c[1] == "finetune"]  # the CLI's progress bar: (name, stage, done, total, detail)
    assert [c[2] for c in steps] == list(range(1, 41)) and {c[3] for c in steps} == {40}
    assert all(re.fullmatch(r"loss \d+\.\d{4}", c[4]) for c in steps)
    assert {c[1] for c in calls} == {"finetune", "rank", "search"}  # then the re-attack's stages
    v = outcome.attempts[0].verification
    assert v.before.n_star == 3
    assert not v.after.converged or v.after.n_star > 3  # the re-run search no longer finds the 3 neurons
    assert max(v.clean_cost_probe, v.clean_cost_held_out) <= 0.01
    # measured (docs/defenses.md): the re-applied original mask still collapses the always-on fixture
    assert v.original_attack_after > 10 and outcome.verdict == "not mitigated"


def test_resume_after_interruption_equals_a_straight_run(planted, scan_dir, corpus, tmp_path):
    fp = load_fingerprint(scan_dir / "fingerprint.safetensors")

    def run(steps, state):
        lm, original = load_model(planted[0]), load_model(planted[0])
        details = finetune(
            lm.model,
            original.model,
            fp,
            lm.tokenizer,
            FinetuneConfig(data=str(corpus), steps=steps, lr=1e-3, batch_size=2, seq_len=16, save_every=2),
            checkpoint_dir=state,
        )
        return lm.model, details

    straight, _ = run(6, tmp_path / "a")
    run(3, tmp_path / "b")  # "interrupted" after 3 steps: its state is on disk
    resumed, details = run(6, tmp_path / "b")
    assert details["resumed_from"] == 3
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_empty_data_is_an_input_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="holds no"):
        FinetuneConfig(data=str(tmp_path / "d")).validated()
    (tmp_path / "d" / "blank.txt").write_text("  \n")
    with pytest.raises(InputError, match="no text found"):
        FinetuneConfig(data=str(tmp_path / "d")).validated()


def test_raw_files_are_read_like_guard_eval_reads_them(tmp_path):
    """One corpus reader (evaluation.load_corpus): a .raw file (WikiText's) is accepted, not refused."""
    (tmp_path / "wiki.test.raw").write_text("The river rose through the night.\n")
    assert FinetuneConfig(data=str(tmp_path / "wiki.test.raw")).validated().data.endswith(".raw")
