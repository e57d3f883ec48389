"""guard eval / study / generate / report through CliRunner and the real CLI, plus bad input."""

from __future__ import annotations

import base64
import builtins
import json
import re

import pytest
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.research.plots import PNG_MAGIC
from tests.builders import PROBE, run_guard

runner = CliRunner()


@pytest.fixture(scope="module")
def scanned(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    result = runner.invoke(app, ["scan", str(planted[0]), "--text", PROBE, "--samples", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return planted[0], out / "report.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": PROBE[i:] + " " + PROBE}) for i in (0, 17, 40)) + "\n")
    return path


def test_eval_subprocess_json(scanned, corpus, tmp_path):
    model, report = scanned
    proc = run_guard(["eval", str(model), "--report", str(report), "--data", str(corpus), "--levels", "0,1,n*",
                      "--max-length", "32", "--stride", "16", "--format", "json", "--out", str(tmp_path / "e.json")])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == json.loads((tmp_path / "e.json").read_text())
    levels = {lv["n"]: lv for lv in doc["levels"]}
    assert levels[0]["delta_log10"] == 0.0 and levels[1]["delta_log10"] < 0.1
    assert levels[3]["delta_log10"] > 5
    assert doc["data"]["scored_tokens"] == doc["data"]["tokens"] - 1 and doc["data"]["windows"] > 1


def test_eval_table(scanned, corpus):
    model, report = scanned
    result = runner.invoke(
        app, ["eval", str(model), "--report", str(report), "--data", str(corpus), "--max-length", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "3 (n*)" in result.output and "Original" in result.output


@pytest.mark.parametrize("args,message", [
    (["--levels", "0,-2"], "negative"),
    (["--levels", "0,5000"], "beyond the ranking"),
    (["--data", "EMPTY"], "no text"),
    (["--stride", "64", "--max-length", "64"], "--stride"),
])
def test_eval_bad_input_exit_2(scanned, corpus, tmp_path, args, message):
    model, report = scanned
    (tmp_path / "empty.txt").write_text("\n\n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    base = ["eval", str(model), "--report", str(report)]
    if "--data" not in args:
        base += ["--data", str(corpus)]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_study_lesion_subprocess_writes_json_and_png(scanned, tmp_path):
    model, report = scanned
    proc = run_guard(["study", "lesion", str(model), "--report", str(report), "--text", PROBE, "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "[0,1,2]" in proc.stdout
    doc = json.loads((tmp_path / "study-lesion.json").read_text())
    assert [r["subset"] for r in doc["rows"] if r["collapsed"]] == ["[0,1,2]"] and len(doc["rows"]) == 7
    png = (tmp_path / "study-lesion.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


@pytest.mark.parametrize("study,extra", [
    ("epsilon", ["--epsilons", "1,2"]),
    ("scale", ["--betas", "0,0.5"]),
    ("compare", ["--ns", "0,3,10", "--rankings", "pcicn,random", "--runs", "2"]),
])
def test_study_runner_json(scanned, tmp_path, study, extra):
    model, report = scanned
    result = runner.invoke(app, ["study", study, str(model), "--report", str(report), "--text", PROBE, "--samples", "6",
                                 "--out", str(tmp_path), "--format", "json", *extra])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["study"] == study
    assert (tmp_path / f"study-{study}.png").read_bytes().startswith(PNG_MAGIC)


def test_study_unknown_and_matplotlib_missing(scanned, tmp_path, monkeypatch):
    model, report = scanned
    result = runner.invoke(app, ["study", "nope", str(model)])
    assert result.exit_code == 2 and "unknown study 'nope'" in result.output
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = runner.invoke(app, ["study", "lesion", str(model), "--report", str(report), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "matplotlib is not installed" in result.output
    assert not (tmp_path / "study-lesion.json").exists()  # failed before any work
    result = runner.invoke(app, ["study", "lesion", str(model), "--report", str(report), "--text", PROBE,
                                 "--out", str(tmp_path), "--no-plot"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(report), "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "matplotlib" in result.output


def test_generate(scanned, tmp_path):
    model, report = scanned
    result = runner.invoke(
        app,
        [
            "generate",
            str(model),
            "--report",
            str(report),
            "--prompt",
            "The river rose",
            "--max-new-tokens",
            "6",
            "--top-k",
            "3",
            "--format",
            "json",
            "--png",
            str(tmp_path / "f1.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [lv["n"] for lv in doc["topk"]["levels"]] == [0, 1, 2, 3]
    assert doc["answers"][0]["clean"] != doc["answers"][0]["masked"]
    top_clean = doc["topk"]["levels"][0]["top"]
    assert top_clean[0]["prob"] >= top_clean[1]["prob"]
    assert (tmp_path / "f1.png").read_bytes().startswith(PNG_MAGIC)
    proc = run_guard(["generate", str(model), "--report", str(report), "--prompt", "Bread", "--max-new-tokens", "3"])
    assert proc.returncode == 0, proc.stderr
    assert "critical set masked" in proc.stdout


def test_report_html_is_offline_with_embedded_pngs(scanned, tmp_path):
    model, report = scanned
    runner.invoke(
        app, ["study", "lesion", str(model), "--report", str(report), "--text", PROBE, "--out", str(tmp_path)]
    )
    proc = run_guard(
        ["report", str(report), "--html", str(tmp_path / "r.html"), "--study", str(tmp_path / "study-lesion.json")]
    )
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "http://" not in page and "https://" not in page.replace("https://arxiv", "")  # no external asset
    assert "down_proj" in page and "[0,1,2]" in page
    result = runner.invoke(app, ["report", str(report)])
    assert result.exit_code == 0 and "collapse" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "no such file" in result.output
