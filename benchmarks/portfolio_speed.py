"""Portfolio speed: a whole `--attacks all` scan against a `--attacks pcicn` scan, same model, same run.

The real SmolLM2-135M-Instruct (tests/realmodel.py fetches and converts it into the user cache), the
four packaged texts, the paper's defaults (α 5, K 100, ε 1). Both scans run in this one process,
alternating `--repeat` times, and the script prints each time and the ratio all / pcicn
(the issue's budget: at most 3x).

    PYTHONPATH=. python benchmarks/portfolio_speed.py [MODEL_DIR] [--samples 100] [--repeat 1] [--texts 4]

Also prints, per attack, where the portfolio's extra time goes (timings.attacks of the report).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: the cached SmolLM2)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--texts", type=int, default=4, help="how many of the packaged texts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.engine.texts import default_texts
    from achilles_guard.formats.load import load_model
    from achilles_guard.report.documents import scan_report

    path = args.model
    if path is None:
        from tests.realmodel import smollm2_dir

        path = str(smollm2_dir())
    lm = load_model(path, dtype="float32", device="cpu")
    probes = [tokenize_probe(lm, n, t) for n, t in default_texts()[: args.texts]]
    print(f"model {path}: {lm.num_parameters:,} params, {len(probes)} texts "
          f"({', '.join(str(p.tokens) for p in probes)} tokens), K = {args.samples}, {torch.get_num_threads()} threads")
    times = {"pcicn": [], "all": []}
    last = {}
    for _ in range(args.repeat):
        for attacks in ("pcicn", "all"):
            t0 = time.perf_counter()
            result = run_scan(lm, probes, ScanParams(samples=args.samples, attacks=attacks))
            times[attacks].append(time.perf_counter() - t0)
            last[attacks] = scan_report(result)
    best = {k: min(v) for k, v in times.items()}
    for k in ("pcicn", "all"):
        s = last[k]["strongest"]
        found = (
            f"strongest {s['attack']} n={s['n']} Δ={s['delta_log10']:.2f} (text {s.get('text')})"
            if s
            else "no collapse"
        )
        print(f"--attacks {k:5s}: {best[k]:7.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[k])})  {found}")
    print(f"ratio all / pcicn: {best['all'] / best['pcicn']:.3f}  (budget: <= 3)")
    print("per attack, summed over texts (s):")
    for name in ("pcicn", "activation", "gradient", "greedy"):
        total = sum(t["timings"]["attacks"].get(name, 0.0) for t in last["all"]["texts"])
        notes = sorted({a["note"] or ("n=" + str(a["n"]) if a["converged"] else "no set")
                        for t in last["all"]["texts"] for a in t["attacks"] if a["attack"] == name})
        print(f"  {name:10s} {total:7.2f}  {'; '.join(notes)}")


if __name__ == "__main__":
    main()
