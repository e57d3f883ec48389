"""Safe loading: pickle and custom code are refused without running them; bad paths; dtypes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from achilles_guard.errors import EXIT_USAGE, InputError, ModelLoadError, UnsafeModelError, UsageError
from achilles_guard.formats.load import check_model_dir, config_sha256, load_model, resolve_device, resolve_dtype
from tests.builders import run_guard, save_model, tiny_model


class _Payload:
    """Unpickling this object writes `marker` (what a malicious pytorch_model.bin does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _pickle_only_dir(root, marker):
    model_dir = save_model(tiny_model("llama"), root)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return model_dir


def _custom_code_dir(root, marker):
    model_dir = save_model(tiny_model("llama"), root)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    return model_dir


def test_the_traps_are_real(tmp_path):
    """The fixtures would write their marker if they ever ran (so the refusals below mean something)."""
    pickle.loads(pickle.dumps(_Payload(tmp_path / "by-pickle")))
    assert (tmp_path / "by-pickle").exists()
    model_dir = _custom_code_dir(tmp_path / "m", tmp_path / "by-import")
    subprocess.run([sys.executable, "-c", "import evil"], cwd=model_dir, check=True)
    assert (tmp_path / "by-import").exists()


def test_pickle_only_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "marker"
    model_dir = _pickle_only_dir(tmp_path / "m", marker)
    with pytest.raises(UnsafeModelError, match="only pickle weights.*--allow-pickle") as err:
        load_model(model_dir)
    assert err.value.exit_code == EXIT_USAGE
    proc = run_guard(["scan", str(model_dir), "--samples", "2", "--out", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "pytorch_model.bin" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_custom_code_is_refused_unimported(tmp_path):
    marker = tmp_path / "marker"
    model_dir = _custom_code_dir(tmp_path / "m", marker)
    with pytest.raises(UnsafeModelError, match="custom code.*--trust-remote-code"):
        load_model(model_dir)
    proc = run_guard(["scan", str(model_dir), "--samples", "2", "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and "auto_map" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not marker.exists()
    assert "evil" not in sys.modules


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        check_model_dir(tmp_path / "absent")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_model_dir(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_model_dir(tmp_path / "empty")
    model_dir = save_model(tiny_model("llama"), tmp_path / "nonsense")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "nonsense"}))
    with pytest.raises(ModelLoadError, match="unknown architecture model_type='nonsense'"):
        load_model(model_dir)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable config"):
        load_model(model_dir)
    no_weights = save_model(tiny_model("llama"), tmp_path / "noweights")
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(no_weights)
    for err in (InputError("x"), ModelLoadError("x"), UnsafeModelError("p", "r")):
        assert err.exit_code == EXIT_USAGE


def test_dtype_and_device_resolution(random_llama_dir):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float64", "cpu") == torch.float64
    with pytest.raises(UsageError, match="--dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="--device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")
    lm = load_model(random_llama_dir, dtype="float64")
    assert lm.dtype == torch.float64 and next(lm.model.parameters()).dtype == torch.float64
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    lm32 = load_model(random_llama_dir)
    assert lm32.dtype == torch.float32 and lm32.device == "cpu" and lm32.model_type == "llama"
    assert lm32.architecture == "LlamaForCausalLM"
    assert lm32.num_parameters == sum(p.numel() for p in lm32.model.parameters())
    assert lm32.config_sha256 == config_sha256(random_llama_dir) == lm.config_sha256


def test_config_sha_ignores_dtype_but_not_shape(tmp_path):
    a = save_model(tiny_model("llama"), tmp_path / "a")
    b = save_model(tiny_model("llama").to(torch.float16), tmp_path / "b")
    c = save_model(tiny_model("llama", hidden=64), tmp_path / "c")
    assert config_sha256(a) == config_sha256(b) != config_sha256(c)
