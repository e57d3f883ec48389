"""integrity.slices (verify-checkpoint): every slice status, single-file and sharded, re-saves, the functional check."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.integrity.slices import FunctionalParams, SliceStatus, classify
from achilles_guard.integrity.tamper import TamperKind, select_targets, tamper_checkpoint
from achilles_guard.integrity.verify import verify_slices
from achilles_guard.report.documents import verify_document, verify_sarif
from tests.builders import reshard

DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def fp(planted_scan):
    return load_fingerprint(planted_scan[2] / "fingerprint.safetensors")


@pytest.fixture(scope="module")
def sharded(planted_scan, tmp_path_factory):
    """The planted model re-saved as 3 shards + index (float32, same bytes)."""
    return reshard(planted_scan[0], tmp_path_factory.mktemp("sharded") / "model", shards=3)


def _shard_holding(ckpt_dir, name):
    index = ckpt_dir / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"


def test_untouched_checkpoint_is_intact(planted_scan, fp):
    report = verify_slices(planted_scan[0], fp)
    assert report.ok and report.verdict == "intact" and report.config.matches
    assert {v.status for v in report.slices} == {SliceStatus.intact}
    assert report.shards_read == ("model.safetensors",)


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("kind, status", [
    (TamperKind.zero, SliceStatus.zeroed),
    (TamperKind.scale, SliceStatus.scaled),
    (TamperKind.sign_flip, SliceStatus.sign_flipped),
    (TamperKind.noise, SliceStatus.perturbed),
])
def test_every_tamper_kind_is_classified(planted_scan, fp, sharded, tmp_path, layout, kind, status):
    src = planted_scan[0] if layout == "single" else sharded
    critical = planted_scan[1]
    targets = select_targets(src, planted_scan[2] / "report.json", [], None)  # the critical set, via the model tree
    assert {t.neuron for t in targets} == critical
    tampered = tamper_checkpoint(src, tmp_path / "t", targets, kind=kind, scale=0.3, noise=0.05, seed=1)
    report = verify_slices(tampered, fp)
    assert not report.ok and report.verdict == "tampered"
    assert {r.neuron for r in report.tampered_neurons} == critical  # the verdict names the neurons...
    shard = _shard_holding(src, DOWN)
    for v in report.tampered_slices:
        assert v.status is status and v.param == DOWN and v.critical
        assert v.shard == shard  # ...and the shard they live in
        assert {n.neuron for n in v.neurons} <= critical
    if kind is TamperKind.scale:
        assert all(abs(v.factor - 0.3) < 1e-6 for v in report.tampered_slices)
    if kind is TamperKind.noise:
        assert all(abs(v.rel_l2 - 0.05) < 1e-3 for v in report.tampered_slices)
    untouched = [v for v in report.slices if v.param != DOWN]
    assert untouched and all(v.status is SliceStatus.intact for v in untouched)
    doc = verify_document(report)
    assert doc["verdict"] == "tampered" and doc["counts"][status.value] == len(critical)
    sarif = verify_sarif(doc)
    results = sarif["runs"][0]["results"]
    assert len(results) == len(critical)
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results} == {
        f"{tampered}/{shard}"
    }


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_missing_and_shape_mismatch(planted_scan, fp, sharded, tmp_path, layout):
    src = planted_scan[0] if layout == "single" else sharded
    for case in ("missing", "shape"):
        dst = reshard(src, tmp_path / case, shards=1) if layout == "single" else reshard(src, tmp_path / case, shards=3)
        target = dst / _shard_holding(dst, DOWN)
        with safe_open(str(target), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if case == "missing":
            del tensors[DOWN]
            index = json.loads((dst / "model.safetensors.index.json").read_text())
            del index["weight_map"][DOWN]
            (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            tensors[DOWN] = tensors[DOWN][:, :-1].contiguous()  # one fewer input feature
        save_file(tensors, str(target), metadata={"format": "pt"})
        report = verify_slices(dst, fp, functional=FunctionalParams())
        assert report.functional is None and "skipped" in report.functional_skipped
        expected = SliceStatus.missing if case == "missing" else SliceStatus.shape_mismatch
        bad = report.tampered_slices
        assert not report.ok and bad and all(v.status is expected and v.param == DOWN for v in bad)
        if case == "missing":
            assert all(
                v.shard == "model.safetensors" and v.checkpoint_key is None for v in bad
            )  # the fingerprinted shard
        else:
            assert all(v.shard == _shard_holding(dst, DOWN) for v in bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 3])
def test_no_false_positive_after_resave(planted_scan, fp, tmp_path, dtype, shards):
    dst = reshard(planted_scan[0], tmp_path / "m", shards=shards, dtype=dtype)
    report = verify_slices(dst, fp)
    assert report.ok, [v.describe() for v in report.tampered_slices]
    assert report.config.matches  # dtype keys are not part of the config hash
    assert {v.status for v in report.slices} == {SliceStatus.equivalent}


def test_no_false_positive_after_resharding(fp, sharded):
    report = verify_slices(sharded, fp)
    assert report.ok and {v.status for v in report.slices} == {SliceStatus.intact}
    assert all(
        v.shard == _shard_holding(sharded, v.checkpoint_key) for v in report.slices
    )  # each slice read from the shard the index names


def test_tamper_after_dtype_change_still_caught(planted_scan, fp, tmp_path):
    half = reshard(planted_scan[0], tmp_path / "half", shards=3, dtype=torch.bfloat16)
    targets = select_targets(half, planted_scan[2] / "fingerprint.safetensors", [], None)
    report = verify_slices(tamper_checkpoint(half, tmp_path / "t", targets, kind="scale", scale=0.5), fp)
    assert {v.status for v in report.tampered_slices} == {SliceStatus.scaled}
    assert all(abs(v.factor - 0.5) < 1e-2 for v in report.tampered_slices)


def test_config_change_same_architecture_is_a_finding(planted_scan, fp, tmp_path):
    dst = reshard(planted_scan[0], tmp_path / "m", shards=1)
    config = json.loads((dst / "config.json").read_text())
    config["rms_norm_eps"] = 0.1
    (dst / "config.json").write_text(json.dumps(config))
    report = verify_slices(dst, fp)
    assert not report.config.matches and not report.ok and not report.tampered_slices
    assert any(r["ruleId"] == "AG110" for r in verify_sarif(verify_document(report))["runs"][0]["results"])


def test_classify_rules():
    ref = torch.tensor([1.0, -2.0, 3.0, 0.5])
    assert classify(ref, ref.clone(), 0.0)[0] is SliceStatus.equivalent
    assert classify(ref, ref.to(torch.bfloat16), 0.0)[0] is SliceStatus.equivalent
    assert classify(ref, torch.zeros(4), 0.0)[0] is SliceStatus.zeroed
    assert classify(ref, torch.full((4,), -1.0), -1.0)[0] is SliceStatus.zeroed  # Gemma-style norm null value
    status, factor, rel, _ = classify(ref, ref * 0.3, 0.0)
    assert status is SliceStatus.scaled and abs(factor - 0.3) < 1e-6 and abs(rel - 0.7) < 1e-6
    assert classify(ref, -ref, 0.0)[0] is SliceStatus.sign_flipped
    via_bf16 = ref.to(torch.bfloat16).to(torch.float32)  # cast down and back up: rounding only
    assert (
        classify(torch.tensor([1.001, -2.003, 3.0]), torch.tensor([1.001, -2.003, 3.0]).bfloat16().float(), 0.0)[0]
        is SliceStatus.equivalent
    )
    assert classify(ref, via_bf16, 0.0)[0] is SliceStatus.equivalent
    tiny = ref.clone()
    tiny[0] += 1e-6  # a same-dtype change below fp16 rounding is still a change
    status, _, rel, _ = classify(ref, tiny, 0.0)
    assert status is SliceStatus.perturbed and 0 < rel < 1e-5
    status, _, rel, _ = classify(ref, torch.tensor([1.0, -2.0, 3.0, float("inf")]), 0.0)
    assert status is SliceStatus.perturbed and math.isinf(rel)
    assert classify(torch.tensor(0.7), torch.tensor(0.0), 0.0)[0] is SliceStatus.zeroed  # a bias entry (0-D)


def test_functional_shows_collapse_of_zeroed_checkpoint(planted_scan, fp, tmp_path):
    path, critical, out = planted_scan
    intact = verify_slices(path, fp, functional=FunctionalParams())
    assert intact.ok and abs(intact.functional.delta_log10) < 1e-4 and intact.functional.still_critical
    targets = select_targets(path, out / "fingerprint.safetensors", [], None)
    zeroed = tamper_checkpoint(path, tmp_path / "z", targets, kind=TamperKind.zero)
    report = verify_slices(zeroed, fp, functional=FunctionalParams(max_delta_log10=0.05))
    fc = report.functional
    assert fc.delta_log10 >= 1.0 and not fc.loss_ok and not report.ok
    assert fc.still_critical is False  # masking the already-zeroed set changes nothing any more


@pytest.mark.parametrize("value, status", [(0.0, SliceStatus.zeroed), (7.5, SliceStatus.scaled)])
def test_a_norm_channel_outside_the_fingerprinted_neurons_is_caught(planted_scan, fp, tmp_path, value, status):
    """The fingerprint stores every scanned norm's whole gain: zeroing (or scaling) a norm channel that is no
    fingerprinted neuron is a tampered slice `PARAM@0:C`, the verdict is tampered, and the rest stays quiet."""
    norm = "model.layers.1.post_attention_layernorm.weight"
    held = {k for k in fp.slices if k.startswith(norm + "@")}
    channel = next(c for c in range(64) if f"{norm}@0:{c}" not in held)
    with safe_open(str(planted_scan[0] / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gain = tensors[norm].clone()
    gain[channel] = value * gain[channel]
    tensors[norm] = gain
    target = tmp_path / "m"
    target.mkdir()
    for name in ("config.json",):
        (target / name).write_bytes((planted_scan[0] / name).read_bytes())
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    report = verify_slices(target, fp)
    assert not report.ok and report.verdict == "tampered"
    (bad,) = report.tampered_slices
    assert bad.key == f"{norm}@0:{channel}" and bad.status is status and bad.shard == "model.safetensors"
    assert verify_document(report)["counts"][status.value] == 1
    assert verify_slices(planted_scan[0], fp).verdict == "intact"  # the original: nothing reported
