"""guard bench: lm-evaluation-harness on the masked model, with a local task over a JSON file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from achilles_guard.cli import app
from tests.builders import PROBE

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness not installed (pip install 'achilles-guard[eval]')"
)

runner = CliRunner()

TASK = """task: guard_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture()
def local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": t}) for t in (PROBE, PROBE[40:], "Bread and water by the river.")) + "\n"
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK.format(data=data))
    return tasks


def test_bench_metrics_collapse_with_mask(planted, local_task, tmp_path):
    out = tmp_path / "scan"
    assert (
        runner.invoke(app, ["scan", str(planted[0]), "--text", PROBE, "--samples", "6", "--out", str(out)]).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "bench",
            str(planted[0]),
            "--report",
            str(out / "report.json"),
            "--tasks",
            "guard_local_ppl",
            "--include-path",
            str(local_task),
            "--levels",
            "0,1,n*",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    levels = {lv["n"]: lv["results"]["guard_local_ppl"] for lv in json.loads(result.stdout)["levels"]}
    assert set(levels) == {0, 1, 3}
    assert levels[1]["bits_per_byte"] == pytest.approx(levels[0]["bits_per_byte"], rel=0.02)  # one neuron: nothing
    assert levels[3]["bits_per_byte"] > 3 * levels[0]["bits_per_byte"]  # the critical set: collapse
    result = runner.invoke(
        app,
        [
            "bench",
            str(planted[0]),
            "--report",
            str(out / "report.json"),
            "--tasks",
            "no_such_task_xyz",
            "--include-path",
            str(local_task),
        ],
    )
    assert result.exit_code == 2 and "unknown to lm-eval" in result.output
