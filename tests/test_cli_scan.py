"""`guard scan` through the real entry point, CliRunner and subprocesses: bad input, formats, gates."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from typer.testing import CliRunner

from achilles_guard.cli import app, main
from achilles_guard.engine.demo import DEMO_PLANT
from achilles_guard.report.documents import atomic_write_bytes
from tests.builders import PROBE, run_guard, save_model, tiny_model

SECOND = (
    "A recipe for bread begins with flour, water, salt and patience; the dough rests for an hour "
    "before it is folded, shaped and baked until the crust sounds hollow when tapped."
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Every kind of bad model directory, plus a word-level tokenizer that Qwen2 ignores
    (docs/fixtures.md, "Tokenizer trap")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli-inputs")
    (root / "file.txt").write_text("not a model")
    (root / "noconfig").mkdir()
    nonsense = save_model(tiny_model("llama"), root / "nonsense")
    config = json.loads((nonsense / "config.json").read_text())
    (nonsense / "config.json").write_text(json.dumps({**config, "model_type": "nonsense"}))
    pickled = save_model(tiny_model("llama"), root / "pickled")
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": 1}))
    custom = save_model(tiny_model("llama"), root / "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    wordlevel = root / "qwen2-wordlevel"
    tiny_model("qwen2").save_pretrained(wordlevel)
    vocab = {w: i for i, w in enumerate(["<unk>", "the", "river", "rose"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(wordlevel)
    (root / "empty.txt").write_text("  \n")
    return root


# (id, args after "scan" with {root}/{model} placeholders, a fragment the one line must contain)
BAD = [
    ("missing-path", ["{root}/absent"], "no such directory"),
    ("a-file", ["{root}/file.txt"], "is a file"),
    ("no-config", ["{root}/noconfig"], "no config.json"),
    ("unknown-arch", ["{root}/nonsense"], "unknown architecture"),
    ("pickle-only", ["{root}/pickled"], "--allow-pickle"),
    ("custom-code", ["{root}/custom"], "--trust-remote-code"),
    ("short-text", ["{model}", "--text", "a short text"], "at least 10"),
    ("blank-text", ["{model}", "--text", "   "], "is empty"),
    ("tokenizes-to-nothing", ["{root}/qwen2-wordlevel", "--text", PROBE], "tokenizes to nothing"),
    ("empty-text-file", ["{model}", "--text-file", "{root}/empty.txt"], "is empty"),
    ("missing-text-file", ["{model}", "--text-file", "{root}/nope.txt"], "no such file"),
    ("non-numeric", ["{model}", "--alpha", "abc"], "--alpha"),
    ("non-integer", ["{model}", "--samples", "1.5"], "--samples"),
    ("alpha-zero", ["{model}", "--alpha", "0"], "--alpha must be > 0"),
    ("alpha-negative", ["{model}", "--alpha", "-1"], "--alpha must be > 0"),
    ("samples-zero", ["{model}", "--samples", "0"], "--samples must be >= 1"),
    ("epsilon-zero", ["{model}", "--epsilon", "0"], "--epsilon must be > 0"),
    ("step-zero", ["{model}", "--step", "0"], "--step must be >= 1"),
    ("max-neurons-zero", ["{model}", "--max-neurons", "0"], "--max-neurons"),
    ("unknown-preset", ["{model}", "--components", "mlps"], "unknown preset"),
    ("bad-regex", ["{model}", "--components", "re:(unclosed"], "bad regular expression"),
    ("unknown-ranking", ["{model}", "--ranking", "magic"], "--ranking"),
    ("bad-dtype", ["{model}", "--dtype", "int8"], "--dtype"),
    ("unwritable-out", ["{model}", "--out", "{root}/file.txt/out"], "not writable"),
    ("negative-gate", ["{model}", "--fail-under", "-1"], "--fail-under"),
    ("dir-and-demo", ["{model}", "--demo"], "exactly one"),
    ("neither", [], "exactly one"),
]


def _args(template, root, model, out):
    args = ["scan", *(a.format(root=root, model=model) for a in template)]
    if "--out" not in args:
        args += ["--out", str(out)]
    return args + ["--samples", "2"] if "--samples" not in args else args


@pytest.mark.parametrize("template,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(template, fragment, dirs, random_llama_dir, tmp_path, capsys):
    code = main(_args(template, dirs, random_llama_dir, tmp_path / "out"))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert fragment in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("name", ["a-file", "non-numeric", "alpha-zero", "tokenizes-to-nothing", "unwritable-out"])
def test_bad_input_through_cli_runner(name, dirs, random_llama_dir, tmp_path):
    template, fragment = next(b[1:] for b in BAD if b[0] == name)
    result = CliRunner().invoke(app, _args(template, dirs, random_llama_dir, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught error
    assert fragment in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["no-config", "non-numeric", "short-text"])
def test_bad_input_through_a_real_subprocess(name, dirs, random_llama_dir, tmp_path):
    template, fragment = next(b[1:] for b in BAD if b[0] == name)
    proc = run_guard(_args(template, dirs, random_llama_dir, tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert proc.stdout == ""


def _scan(args, tmp_path):
    result = CliRunner().invoke(app, ["scan", *args, "--samples", "5", "--out", str(tmp_path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _pairs(records):
    return {(r["module"], r["channel"]) for r in records}


def test_sarif(planted, tmp_path):
    path, critical = planted
    result = _scan([str(path), "--text", PROBE, "--format", "sarif", "--fail-under", "3"], tmp_path)
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["version"] == "2.1.0" and "sarif-2.1.0" in doc["$schema"]
    run = doc["runs"][0]
    assert run["tool"]["driver"]["name"] == "achilles-guard"
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} == {"AG001", "AG002"}
    found = [r for r in run["results"] if r["ruleId"] == "AG001"]
    assert {(r["properties"]["module"], r["properties"]["channel"]) for r in found} == {
        (n.module, n.channel) for n in critical
    }
    assert all(r["level"] in ("warning", "error") and r["message"]["text"] and r["locations"] for r in run["results"])
    assert [r["ruleId"] for r in run["results"]].count("AG002") == 1
    assert json.loads((tmp_path / "report.sarif").read_text()) == doc
    assert json.loads((tmp_path / "report.json").read_text())["schema"] == "achilles-guard/scan/v1"


def test_fail_under_gate(planted, tmp_path):
    path, critical = planted
    assert len(critical) == 3
    for gate, code in ((None, 0), ("2", 0), ("3", 1), ("10", 1)):
        # the paper's attack alone: the portfolio's greedy finds a 1-neuron set here (tests/test_portfolio.py)
        args = [str(path), "--text", PROBE, "--format", "json", "--attacks", "pcicn"] + (
            ["--fail-under", gate] if gate else []
        )
        result = _scan(args, tmp_path / f"gate-{gate}")
        assert result.exit_code == code, (gate, result.output)
        assert json.loads(result.stdout)["smallest_critical_set"] == 3


def test_no_finding_without_convergence(random_llama_dir, tmp_path):
    """A random model is not fragile: converged false, and the gate passes."""
    result = _scan(
        [str(random_llama_dir), "--text", PROBE, "--format", "json", "--max-neurons", "20", "--fail-under", "5"],
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["converged"] is False and doc["critical_set"] == [] and len(doc["curve"]) == 20


def test_several_texts_and_intersection(planted, tmp_path):
    path, critical = planted
    result = _scan([str(path), "--text", PROBE, "--text", SECOND, "--format", "json"], tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [t["name"] for t in doc["texts"]] == ["text-1", "text-2"]
    expected = {(n.module, n.channel) for n in critical}
    for text in doc["texts"]:
        assert text["converged"] and _pairs(text["critical_set"]) == expected and text["tokens"] >= 10
    assert _pairs(doc["intersection"]) == expected
    assert doc["texts"][0]["text"] == PROBE and doc["texts"][1]["tokens"] != doc["texts"][0]["tokens"]


def test_table_output_and_atomic_report(planted, tmp_path):
    path, critical = planted
    result = _scan([str(path), "--text", PROBE], tmp_path)
    assert result.exit_code == 0, result.output
    assert "report.json" in result.stdout
    for n in critical:
        assert n.module in result.stdout
    doc = json.loads((tmp_path / "report.json").read_text())
    assert _pairs(doc["critical_set"]) == {(n.module, n.channel) for n in critical}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_demo(tmp_path):
    result = CliRunner().invoke(app, ["scan", "--demo", "--samples", "5", "--format", "json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["synthetic_demo"] is True
    assert doc["converged"] and _pairs(doc["critical_set"]) == {
        (n.module, n.channel) for n in DEMO_PLANT.critical_set()
    }
    assert len(doc["texts"]) >= 3 and _pairs(doc["intersection"]) == _pairs(doc["critical_set"])
    table = CliRunner().invoke(app, ["scan", "--demo", "--samples", "5", "--out", str(tmp_path / "t")])
    assert table.exit_code == 0 and "synthetic" in table.stdout.lower()
