"""Forward latency with and without the ActivationMonitor attached, in the same process.

The ~40 M-parameter planted Llama (hidden 512, 8 layers, FFN 1536, vocab 12288, massive activation
planted in layer 0 by demo.plant_massive), fingerprinted by a real scan (top-64 neurons), on CPU.
Rounds alternate `--block` forwards without and with the monitor; the ratio compares medians.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/monitor_overhead.py --rounds 30 --block 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry


def build(tmp: Path, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from achilles_guard.engine.demo import plant_massive
    from achilles_guard.formats.load import quiet_transformers
    from tests.builders import tokenizer

    quiet_transformers()
    tok = tokenizer()
    config = LlamaConfig(vocab_size=12288, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    plant_massive(model)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tok.save_pretrained(tmp / "model")
    return tmp / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=10, help="forwards per configuration per round")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of each forward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import load_fingerprint, write_fingerprint
    from achilles_guard.monitor import ActivationMonitor
    from tests.builders import PROBE

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lm = load_model(build(Path(tmp), args.seed))
        result = run_scan(lm, [tokenize_probe(lm, "probe", PROBE)], ScanParams(samples=8))
        fp = load_fingerprint(write_fingerprint(Path(tmp) / "fp.safetensors", result, top=64))
        print(
            f"model: {lm.num_parameters / 1e6:.1f} M parameters, threads {torch.get_num_threads()}, "
            f"critical set {len(fp.critical_set)} "
            f"({'converged' if result.primary.result.converged else 'not converged'}), "
            f"{len(fp.neurons)} monitored neurons in {len({r.neuron.module for r in fp.neurons})} modules; setup "
            f"{time.perf_counter() - t0:.1f}s"
        )

        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, 500, (1, args.tokens), generator=g)
        registry = CollectorRegistry()
        monitor = ActivationMonitor(lm.model, fp, registry=registry, model_name="bench")

        def block() -> list[float]:
            times = []
            with torch.no_grad():
                for _ in range(args.block):
                    t = time.perf_counter()
                    lm.model(input_ids=ids, use_cache=False)
                    times.append(time.perf_counter() - t)
            return times

        block(), monitor.attach(), block(), monitor.detach()  # warm-up both paths
        off, on = [], []
        for r in range(args.rounds):
            first_on = r % 2 == 1  # alternate which goes first, against drift
            for with_monitor in ((True, False) if first_on else (False, True)):
                if with_monitor:
                    monitor.attach()
                    on += block()
                    monitor.detach()
                else:
                    off += block()
        med_off, med_on = statistics.median(off), statistics.median(on)
        hook_mean = registry.get_sample_value("guard_monitor_overhead_seconds_sum", {"model": "bench"}) / \
            registry.get_sample_value("guard_monitor_overhead_seconds_count", {"model": "bench"})
        assert monitor.state().last.score == 0.0
        print(f"forwards: {len(off)} without, {len(on)} with the monitor; batch 1 x {args.tokens} tokens")
        print(f"median forward without monitor: {med_off * 1e3:.3f} ms")
        print(f"median forward with monitor:    {med_on * 1e3:.3f} ms")
        print(f"monitor's own time per forward (guard_monitor_overhead_seconds mean): {hook_mean * 1e6:.0f} us "
              f"= {hook_mean / med_off * 100:.2f} % of a forward")
        print(
            f"overhead ratio (median with / median without): {med_on / med_off:.4f}  "
            f"({(med_on / med_off - 1) * 100:+.2f} %; goal <= +3 %)"
        )


if __name__ == "__main__":
    main()
