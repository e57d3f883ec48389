"""The GPU benchmark runs on CPU with tiny sizes (a smoke test: CI has no GPU)."""

from __future__ import annotations

import subprocess
import sys

from tests.builders import REPO


def test_gpu_scan_benchmark_smoke_on_cpu():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_scan.py", "--models", "tiny", "--device", "cpu", "--dtype", "float32",
         "--samples", "4", "--max-neurons", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "tiny: " in proc.stdout and "not converged within 16 masks" in proc.stdout
    row = [line for line in lines if line.startswith("tiny | ")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].split("|")]
    assert cells[4] == "16"  # masks evaluated: the whole budget
    assert float(cells[8].rstrip("x")) > 0  # a ratio was measured


def test_verify_speed_gguf_mode_smoke():
    """`verify_speed.py --gguf`: the tiny GGUF and its safetensors conversion verify intact (the benchmark asserts
    it) and one row of bytes read, times and GGUF/safetensors ratios is printed."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/verify_speed.py", "--gguf", "--tiny-only", "--repeat", "1", "--qtype", "Q8_0"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.strip().startswith("tiny Q8_0")]
    assert len(row) == 1, proc.stdout
    cells = row[0].replace("|", " ").split()
    g_size, g_read, header = (int(c.replace(",", "")) for c in cells[3:6])
    assert 0 < header < g_read < g_size
    assert all(float(c) > 0 for c in cells[-3:])
