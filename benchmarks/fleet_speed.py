"""How long `guard fleet scan` takes for a registry, per backend, and what the fleet adds per model.

Part 1: a registry of `--models` (8) tiny random Llamas (tests/builders.tiny_model, seeds 0..7),
each scanned with `--samples 4 --max-neurons 32 --attacks pcicn` on one short text. Whole wall
time of one `guard fleet scan --force` per backend: local `--jobs 1`, local `--jobs 2`, and Ray
with 2 CPUs (`--ray local --jobs 2`, Ray's own start included) when Ray is installed.

Part 2: the fleet machinery's cost over a bare `guard scan` on a model whose scan takes >= 10 s
(a Llama of hidden 256, 4 layers, `--overhead-samples` noise samples, PCICN, 64 masks): best of
`--repeat` wall times of the bare command (with `--format sarif`, which writes what the fleet keeps),
of a fleet of that one model, and of a fleet of `--copies` copies of it (`--jobs 1`), whose
amortized per-model cost is (T_fleet(copies) - copies x T_bare) / copies; and the fixed cost of a
fleet run that finds everything cached (process start, discovery, hashing, fleet.json).

    PYTHONPATH=. python benchmarks/fleet_speed.py [--models 8] [--copies 3] [--repeat 2] [--skip-ray]

Everything is written under a temporary directory and deleted at the end. CPU-only (CUDA hidden).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.builders import PROBE, save_model, tiny_model  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "RAY_AUTH_MODE": "disabled"}
TINY = ["--samples", "4", "--max-neurons", "32", "--attacks", "pcicn", "--text", PROBE]


def guard(*args: str, ok=(0,)) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "achilles_guard", *args], env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(f"guard {' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr[-800:]}")
    return seconds


def quiet_save(model, path: Path) -> Path:
    with contextlib.redirect_stderr(io.StringIO()):
        return save_model(model, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--overhead-samples", type=int, default=150)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-speed-", dir=args.tmp))
    try:
        reg = work / "registry"
        for seed in range(args.models):
            quiet_save(tiny_model("llama", seed=seed), reg / f"m{seed}")
        print(f"part 1: {args.models} tiny models ({' '.join(TINY[:6])}), one `guard fleet scan --force` each, CPU, "
              f"{os.cpu_count()} cores")
        backends = [("local --jobs 1", ["--jobs", "1"]), ("local --jobs 2", ["--jobs", "2"])]
        if not args.skip_ray and importlib.util.find_spec("ray"):
            backends.append(("ray, 2 CPUs", ["--ray", "local", "--jobs", "2"]))
        else:
            print("  (Ray not installed or --skip-ray: no Ray row)")
        base = None
        print(f"  {'backend':<16} | {'wall s':>7} | {'s/model':>7} | speed-up")
        for name, extra in backends:
            t = guard("fleet", "scan", str(reg), "--out", str(work / "out"), *TINY, *extra, "--force")
            base = base or t
            print(f"  {name:<16} | {t:7.1f} | {t / args.models:7.2f} | {base / t:.2f}x")

        heavy = quiet_save(tiny_model("llama", hidden=256, layers=4, intermediate=512), work / "heavy" / "model")
        for i in range(1, args.copies):
            shutil.copytree(heavy, work / "heavy" / f"copy{i}")
        one = work / "one.txt"
        one.write_text(f"{heavy}\n")
        opts = ["--samples", str(args.overhead_samples), "--max-neurons", "64", "--attacks", "pcicn", "--text", PROBE]
        bare = fleet1 = fleetk = cached = float("inf")
        for _ in range(args.repeat):
            bare = min(bare, guard("scan", str(heavy), "--out", str(work / "bare"), "--format", "sarif", *opts))
            fleet1 = min(fleet1, guard("fleet", "scan", str(one), "--out", str(work / "f1"), *opts, "--force"))
            cached = min(cached, guard("fleet", "scan", str(one), "--out", str(work / "f1"), *opts))
        for _ in range(max(1, args.repeat - 1)):
            fleetk = min(fleetk, guard("fleet", "scan", str(work / "heavy"), "--out", str(work / "fk"), *opts,
                                       "--force"))
        per_model = (fleetk - args.copies * bare) / args.copies
        print(f"\npart 2: fleet machinery over a bare `guard scan` (hidden 256, 4 layers, --samples "
              f"{args.overhead_samples}, pcicn, 64 masks), best of {args.repeat}")
        print(f"  bare guard scan --format sarif        {bare:7.2f} s")
        print(f"  fleet scan of that 1 model            {fleet1:7.2f} s  (+{fleet1 - bare:.2f} s, "
              f"{100 * (fleet1 / bare - 1):+.1f} %)")
        print(f"  fleet scan of {args.copies} copies, --jobs 1       {fleetk:7.2f} s  "
              f"(per model +{per_model:.2f} s, {100 * per_model / bare:+.1f} % of a bare scan)")
        print(f"  fleet rerun, all cached               {cached:7.2f} s  (fixed cost of a fleet run)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
