"""Clean-prefix reuse: blocks skipped and time saved in stage 2 + the attack portfolio, identical results.

For each model, one scan with reuse (the default) and one without (`run_scan(..., prefix_reuse=False)`),
same ranking (stage 1 runs once per scan and is not affected): stage 2 + portfolio seconds each, the
decoder blocks a whole forward would run vs the ones reuse skipped, and whether the two reports are
identical outside their timings (they must be).

    PYTHONPATH=. python benchmarks/prefix_reuse.py                  # planted fixtures (plant in block 0 / 2 / 5)
    PYTHONPATH=. python benchmarks/prefix_reuse.py --smollm2 DIR    # also SmolLM2-135M (a converted HF directory)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from achilles_guard.engine.demo import Plant, build_tokenizer, plant_massive
from achilles_guard.engine.neurons import discover
from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
from achilles_guard.formats.load import load_model
from achilles_guard.report.documents import scan_report

TEXT = (
    "The lighthouse keeper wrote in his log every evening: the wind, the height of the swell, the ships "
    "that passed and the ones that did not. In forty years the entries changed very little, and the "
    "keeper liked it that way."
)


def _stripped(doc):
    if isinstance(doc, dict):
        return {k: _stripped(v) for k, v in doc.items() if k not in ("timings", "seconds", "load_s")}
    if isinstance(doc, list):
        return [_stripped(v) for v in doc]
    return doc


def planted(layer: int, root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    plant_massive(model, Plant(layer=layer))
    path = root / f"planted-block{layer}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def measure(name: str, path: Path, params: ScanParams) -> None:
    lm = load_model(path)
    probes = [tokenize_probe(lm, "probe", TEXT)]
    candidates = discover(lm.model, params.components)
    runs = {}
    for reuse in (False, True):
        t0 = time.perf_counter()
        result = run_scan(lm, probes, params, candidates=candidates, prefix_reuse=reuse)
        runs[reuse] = (result, time.perf_counter() - t0)
    (plain, _), (fast, _) = runs[False], runs[True]
    t_plain = plain.primary.search_s + plain.primary.portfolio_s
    t_fast = fast.primary.search_s + fast.primary.portfolio_s
    stats = fast.primary.prefix
    same = _stripped(scan_report(plain)) == _stripped(scan_report(fast))
    n = len(fast.primary.result.critical_set) if fast.primary.result.converged else None
    print(f"{name:<22} n*={n!s:<4} forwards {stats.forwards:>5}, reused {stats.reused:>5}; blocks skipped "
          f"{stats.blocks_skipped:>6}/{stats.blocks_total:<6} ({100 * stats.saved:5.1f} %); stage 2 + portfolio "
          f"{t_plain:7.2f} s -> {t_fast:7.2f} s ({t_plain / max(t_fast, 1e-9):.2f}x); identical: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", type=Path, default=None, help="converted SmolLM2-135M directory")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    params = ScanParams(samples=args.samples, max_neurons=100, greedy_pool=32)
    with tempfile.TemporaryDirectory() as tmp:
        for layer in (0, 2, 5):
            measure(f"planted, block {layer}/8", planted(layer, Path(tmp)), params)
    if args.smollm2 is not None:
        measure("SmolLM2-135M", args.smollm2, ScanParams(samples=args.samples, max_neurons=100, greedy_pool=32))


if __name__ == "__main__":
    main()
