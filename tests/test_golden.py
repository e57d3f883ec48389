"""Golden outputs: `guard scan --demo --format json` and `guard verify-checkpoint --format json` (intact and
tampered), compared field by field with the documents in tests/golden/.

They pin the public behaviour while the package is reorganised: every key, every string, every integer
and the exit codes must be identical; floats agree to 1e-4 relative (a CPU with other SIMD widths may
sum in another order); timings, temporary paths and the fingerprint's random sketch nonce are not
compared. Regenerate after an intended change with `GUARD_UPDATE_GOLDEN=1 pytest tests/test_golden.py`
and review the diff.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.builders import run_guard

GOLDEN = Path(__file__).parent / "golden"
VOLATILE = {"path", "seconds", "timings", "version"}  # and every key ending in _s (a duration)


def _normalised(doc):
    if isinstance(doc, dict):
        return {k: ("<volatile>" if k in VOLATILE or k.endswith("_s") else _normalised(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_normalised(v) for v in doc]
    return doc


def _same(a, b, where: str = "$") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), (where, a, b)
        # 1e-4 relative, and 1e-5 absolute for numbers near 0: a difference of two float32 losses (a Δ of
        # 1.26e-4 on one CPU was 1.26e-4 + 4e-7 on another: same torch, other SIMD reduction order)
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (where, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict), (where, b)
        assert sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, len(a), b if not isinstance(b, list) else len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _check(name: str, code: int, stdout: str) -> None:
    doc = {"exit": code, "document": _normalised(json.loads(stdout))}
    path = GOLDEN / f"{name}.json"
    if os.environ.get("GUARD_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    _same(doc, json.loads(path.read_text()))


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "d"
    proc = run_guard(["scan", "--demo", "--format", "json", "--out", str(out)], timeout=300)
    return proc, out


def test_scan_demo_json_is_golden(demo_scan):
    proc, _ = demo_scan
    _check("scan-demo", proc.returncode, proc.stdout)


def test_verify_checkpoint_json_is_golden(demo_scan, tmp_path):
    from achilles_guard.engine.demo import demo_model_dir

    _, out = demo_scan
    fp = str(out / "fingerprint.safetensors")
    proc = run_guard(["verify-checkpoint", str(demo_model_dir()), "--fingerprint", fp, "--format", "json"])
    _check("verify-intact", proc.returncode, proc.stdout)
    tampered = tmp_path / "tampered"
    made = run_guard(["tamper", str(demo_model_dir()), "--out", str(tampered), "--neurons", str(out / "report.json"),
                      "--kind", "zero"])
    assert made.returncode == 0, made.stderr
    proc = run_guard(["verify-checkpoint", str(tampered), "--fingerprint", fp, "--format", "json"])
    _check("verify-tampered", proc.returncode, proc.stdout)
    proc = run_guard(["verify-checkpoint", str(tampered), "--fingerprint", fp, "--format", "json", "--quick"])
    _check("verify-tampered-quick", proc.returncode, proc.stdout)
