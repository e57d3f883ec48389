"""achilles_guard.integrity.tamper: one neuron syntax, one meaning of "scale" (shared with monitor.tamper)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from achilles_guard.cli import app
from achilles_guard.engine.neurons import Neuron, parse_neuron
from achilles_guard.integrity.tamper import scaled_slice
from achilles_guard.monitor.tamper import disrupted

runner = CliRunner()


@pytest.mark.parametrize("spec", ["model.layers.0.mlp.down_proj[11]", "model.layers.0.mlp.down_proj:11"])
def test_parse_neuron_reads_the_report_syntax_and_the_colon_alias(spec):
    neuron = parse_neuron(spec)
    assert neuron == Neuron("model.layers.0.mlp.down_proj", 11)
    assert parse_neuron(str(neuron)) == neuron  # what reports print parses back


@pytest.mark.parametrize("spec", ["", "down_proj", "down_proj[x]", "[3]", ":3", "down_proj:-1", "down_proj[3", 7])
def test_parse_neuron_refuses_anything_else(spec):
    with pytest.raises(ValueError):
        parse_neuron(spec)


def test_scaled_slice_multiplies_the_slice_from_its_null_value():
    value = torch.tensor([2.0, -4.0, -0.0], dtype=torch.float16)
    assert torch.equal(scaled_slice(value, 0.5), torch.tensor([1.0, -2.0, -0.0], dtype=torch.float16))
    assert scaled_slice(value, 0.5).dtype == torch.float16
    assert torch.equal(scaled_slice(value, 0.0, -1.0), torch.full((3,), -1.0, dtype=torch.float16))  # 0 = null value
    one_plus_w = torch.tensor([1.0, 3.0])  # a `1 + w` norm: effective weights 2 and 4
    assert torch.equal(scaled_slice(one_plus_w, 0.5, -1.0) + 1, torch.tensor([1.0, 2.0]))


def test_monitor_disrupt_and_guard_tamper_scale_the_same_way(planted_scan, tmp_path):
    from safetensors.torch import load_file

    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import load_fingerprint

    path, critical, out = planted_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    lm = load_model(path, dtype="float32", device="cpu")
    target = sorted(critical)[0]
    record = next(r for r in fp.neurons if r.neuron == target)
    rec = fp.slices[record.slices[0]]
    param = dict(lm.model.named_parameters())[rec.param]
    with disrupted(lm.model, fp, [target], scale=0.25):
        in_memory = param.detach().select(rec.axis, rec.index).clone()
    result = runner.invoke(app, ["tamper", str(path), "--out", str(tmp_path / "scaled"), "--neuron", str(target),
                                 "--kind", "scale", "--scale", "0.25"])
    assert result.exit_code == 0, result.output
    on_disk = load_file(str(tmp_path / "scaled" / "model.safetensors"))[rec.param].select(rec.axis, rec.index)
    assert torch.equal(in_memory, on_disk)


def test_cli_refuses_a_malformed_neuron(planted_scan, tmp_path):
    result = runner.invoke(app, ["tamper", str(planted_scan[0]), "--out", str(tmp_path / "x"), "--neuron", "down_proj"])
    assert result.exit_code == 2 and "MODULE[CHANNEL]" in result.output and not (tmp_path / "x").exists()
