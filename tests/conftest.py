"""Session fixtures shared by all tests. Builders live in tests/builders.py."""

from __future__ import annotations

import os

import pytest

from tests.builders import PROBE, planted_model, save_model, tiny_model, tokenizer

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): two workers on CI's two cores, one torch thread each, and the
    # same for the `guard` subprocesses they start; two processes of two OpenMP threads each on two cores
    # spin against each other (measured here: a SmolLM2 stage 1 of 0.48 s took 13.6 s beside another one)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Never touch the user's ~/.cache: the demo model is built into a per-session directory."""
    os.environ["GUARD_CACHE_DIR"] = str(tmp_path_factory.mktemp("guard-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_asked():
    """The suite measures the same numbers on a GPU machine as on CI's CPU: `--device auto` means the CPU
    here, in process and in `guard` subprocesses (builders.run_guard hides the GPUs). tests/test_cuda.py
    asks for CUDA by name and un-hides the GPUs for its own subprocesses."""
    import achilles_guard.formats.load as model_module

    original = model_module.resolve_device
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "resolve_device", lambda device: original("cpu" if device == "auto" else device))
        yield


@pytest.fixture(scope="session")
def tok():
    return tokenizer()


@pytest.fixture(scope="session")
def probe_text() -> str:
    return PROBE


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """(model_dir, critical_set) of the demo construction: Llama, plant in layer 0, 3 channels."""
    return planted_model(tmp_path_factory.mktemp("planted") / "model")


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory):
    return save_model(tiny_model("llama"), tmp_path_factory.mktemp("random") / "llama")


@pytest.fixture(scope="session")
def planted_scan(planted, tmp_path_factory):
    """(model_dir, critical_set, out_dir) with out_dir/{report.json, fingerprint.safetensors, signed.safetensors,
    key}: a quick scan (5 samples) of `planted`, fingerprinting the set + top 8; signed copy with `key`."""
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import write_fingerprint
    from achilles_guard.report.documents import scan_report, write_json

    path, critical = planted
    out = tmp_path_factory.mktemp("planted-scan")
    lm = load_model(path)
    result = run_scan(lm, [tokenize_probe(lm, "probe", PROBE)], ScanParams(samples=5))
    write_json(out / "report.json", scan_report(result))
    write_fingerprint(out / "fingerprint.safetensors", result, top=8)
    (out / "key").write_bytes(b"0123456789abcdef-test-signing-key\n")
    write_fingerprint(out / "signed.safetensors", result, top=8, sign_key=b"0123456789abcdef-test-signing-key")
    return path, critical, out


@pytest.fixture(scope="session")
def planted_fp(planted, tmp_path_factory):
    """Path of the fingerprint of the `planted` model (critical set = the 3 planted channels)."""
    from tests.builders import planted_fingerprint

    return planted_fingerprint(planted[0], tmp_path_factory.mktemp("planted-fp") / "fingerprint.safetensors")


@pytest.fixture(scope="session")
def smollm2():
    """Directory of the real SmolLM2-135M-Instruct (tests/realmodel.py: fetched and converted once into the
    user cache). Skips with one reason when it cannot be had; fails instead when CI=true."""
    from tests.realmodel import RealModelUnavailable, smollm2_dir

    try:
        return smollm2_dir()
    except RealModelUnavailable as err:
        message = f"real model SmolLM2 unavailable: {err}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: real-model tests must run)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2):
    """The real SmolLM2-135M-Instruct.Q4_1.gguf (tests/realmodel.py, cached beside the converted directory)."""
    from tests.realmodel import RealModelUnavailable, smollm2_gguf

    try:
        return smollm2_gguf()
    except RealModelUnavailable as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real model SmolLM2 GGUF unavailable: {err} (CI=true: real-model tests must run)")
        pytest.skip(f"real model SmolLM2 GGUF unavailable: {err}")
