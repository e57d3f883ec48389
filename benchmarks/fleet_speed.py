"""How long `guard fleet scan` takes for a registry, per backend, and what the fleet adds per model.

Part 1: a registry of `--models` (8) tiny random Llamas (tests/builders.tiny_model, seeds 0..7),
each scanned with `--samples 4 --max-neurons 32 --attacks pcicn` on one short text. Whole wall
time of one `guard fleet scan --force` per backend: local `--jobs 1`, local `--jobs 2`, and Ray
with 2 CPUs (`--ray local --jobs 2`, Ray's own start included) when Ray is installed.

Part 2: the fleet machinery's cost over a bare `guard scan` on a model whose scan takes >= 10 s
(a Llama of hidden 512, 4 layers, `--overhead-samples` noise samples, PCICN, `--overhead-masks` masks): best of
`--repeat` wall times of the bare command (with `--format sarif`, which writes what the fleet keeps),
of a fleet of that one model (the bare scan plus the fleet's fixed start), and of a fleet of
`--copies` copies of it (`--jobs 1`): what each model after the first adds over its bare scan is
(T_fleet(copies) - T_fleet(1)) / (copies - 1) - T_bare; and the fixed cost of a fleet run that
finds everything cached (process start, discovery, hashing, fleet.json).

    PYTHONPATH=. python benchmarks/fleet_speed.py [--models 8] [--copies 3] [--repeat 2] [--skip-ray]

`--models 0` runs part 2 only. Wall and CPU seconds (user + sys of the command and its workers) are
both printed: CPU time is what the fleet adds, wall time also moves with whatever else runs.

Everything is written under a temporary directory and deleted at the end. CPU-only (CUDA hidden).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import resource
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


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def guard(*args: str, ok=(0,)) -> tuple[float, float]:
    """(wall s, CPU s) of one `guard` command; CPU: user + sys of it and all its workers."""
    c0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "achilles_guard", *args], env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(f"guard {' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr[-800:]}")
    return seconds, _children_cpu() - c0


def best(n: int, *args: str) -> tuple[float, float]:
    return min(guard(*args) for _ in range(max(1, n)))


def quiet_save(model, path: Path) -> Path:
    with contextlib.redirect_stderr(io.StringIO()):
        return save_model(model, path)


def part1(args, work: Path) -> None:
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
        t, _ = guard("fleet", "scan", str(reg), "--out", str(work / "out"), *TINY, *extra, "--force")
        base = base or t
        print(f"  {name:<16} | {t:7.1f} | {t / args.models:7.2f} | {base / t:.2f}x")


def part2(args, work: Path) -> None:
    heavy = quiet_save(tiny_model("llama", hidden=512, layers=4, intermediate=1024), work / "heavy" / "model")
    for i in range(1, args.copies):
        shutil.copytree(heavy, work / "heavy" / f"copy{i}")
    one = work / "one.txt"
    one.write_text(f"{heavy}\n")
    opts = ["--samples", str(args.overhead_samples), "--max-neurons", str(args.overhead_masks), "--attacks", "pcicn",
            "--text", PROBE]
    bare = best(args.repeat, "scan", str(heavy), "--out", str(work / "bare"), "--format", "sarif", *opts)
    fleet1 = best(args.repeat, "fleet", "scan", str(one), "--out", str(work / "f1"), *opts, "--force")
    cached = best(args.repeat, "fleet", "scan", str(one), "--out", str(work / "f1"), *opts)
    fleetk = best(args.repeat, "fleet", "scan", str(work / "heavy"), "--out", str(work / "fk"), *opts, "--force")
    k = args.copies
    # the fleet's cost splits in two: a fixed start per fleet run (one more `guard` process, discovery, the
    # summary) and what each further model adds over its bare scan (spawn, hashing, publish, fleet.json)
    wall_pm, cpu_pm = ((fleetk[i] - fleet1[i]) / (k - 1) - bare[i] for i in (0, 1))
    wall_am, cpu_am = ((fleetk[i] - k * bare[i]) / k for i in (0, 1))  # the fixed start spread over k models
    print(f"\npart 2: fleet machinery over a bare `guard scan` (hidden 512, 4 layers, --samples "
          f"{args.overhead_samples}, pcicn, {args.overhead_masks} masks), best of {args.repeat}")
    print(f"  {'':<38} {'wall s':>7}   {'CPU s':>7}")
    print(f"  {'bare guard scan --format sarif':<38} {bare[0]:7.2f}   {bare[1]:7.2f}")
    print(f"  {'fleet scan of that 1 model':<38} {fleet1[0]:7.2f}   {fleet1[1]:7.2f}   "
          f"(wall {100 * (fleet1[0] / bare[0] - 1):+.1f} %, CPU {100 * (fleet1[1] / bare[1] - 1):+.1f} %)")
    print(f"  {f'fleet scan of {k} copies, --jobs 1':<38} {fleetk[0]:7.2f}   {fleetk[1]:7.2f}   "
          f"(each model after the first: wall {wall_pm:+.2f} s = {100 * wall_pm / bare[0]:+.1f} %, "
          f"CPU {cpu_pm:+.2f} s = {100 * cpu_pm / bare[1]:+.1f} %)")
    print(f"  {'':<38} {'':>7}   {'':>7}   (amortized over the {k}: wall {wall_am:+.2f} s = "
          f"{100 * wall_am / bare[0]:+.1f} %, CPU {cpu_am:+.2f} s = {100 * cpu_am / bare[1]:+.1f} % per model)")
    print(f"  {'fleet rerun, all cached':<38} {cached[0]:7.2f}   {cached[1]:7.2f}   (the fixed cost of a fleet run)")
    print(f"  load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other work on the machine inflates "
          "wall times, not CPU times)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8, help="part 1's registry size; 0: part 2 only")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--overhead-samples", type=int, default=150)
    ap.add_argument("--overhead-masks", type=int, default=192, help="part 2's stage-2 budget (a scan of >= 10 s here)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-speed-", dir=args.tmp))
    try:
        if args.models:
            part1(args, work)
        part2(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
