"""Speed of the defences on the planted model (hidden 512, 8 layers, FFN 1536) on CPU.

    PYTHONPATH=. python benchmarks/harden_speed.py [--samples 10] [--max-neurons 50] [--forwards 20]

Prints: rotation seconds (total, per layer; float64 arithmetic), pin overhead per forward
(median of --forwards forwards with and without the guard, goal <= 3 %), and the time of the
re-scan that verification runs (PCICN with --samples noise samples, search up to --max-neurons).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from achilles_guard.defenses.pin import PinGuard, PinnedModel
from achilles_guard.defenses.rotate import rotate_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from tests.builders import PROBE, planted_model, scanned, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-neurons", type=int, default=50)
    parser.add_argument("--forwards", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, _ = planted_model(tmp / "m", hidden=512, layers=8, intermediate=1536)
        model = tiny_model("llama", hidden=512, layers=8, intermediate=1536).double()
        params = sum(p.numel() for p in model.parameters())
        record = rotate_model(model, seed=0)
        print(
            f"model: {params / 1e6:.1f} M parameters, hidden 512, 8 layers, FFN 1536, threads {torch.get_num_threads()}"
        )
        print(
            f"rotate ({record.kind}, float64): {record.seconds:.3f} s total, {record.seconds_per_layer * 1000:.1f} ms "
            "per layer"
        )

        t0 = time.perf_counter()
        scan_dir = scanned(path, tmp / "scan", samples=args.samples, max_neurons=args.max_neurons)
        print(
            f"re-scan (PCICN, {args.samples} samples, search <= {args.max_neurons}): {time.perf_counter() - t0:.2f} s "
            "(includes load and fingerprint)"
        )

        from achilles_guard.formats.load import load_model

        lm = load_model(path)
        fp = load_fingerprint(scan_dir / "fingerprint.safetensors")
        ids = lm.tokenizer(PROBE * 2, return_tensors="pt")["input_ids"]
        for which in ("critical", "all"):
            _pin_overhead(lm, PinGuard.from_fingerprint(fp, neurons=which), ids, args.forwards, which)


def _pin_overhead(lm, guard, ids, forwards, which) -> None:
    pinned = PinnedModel(lm.model, guard)
    bare_t, pin_t = [], []
    with torch.no_grad():
        for _ in range(3):
            lm.model(input_ids=ids), pinned(input_ids=ids)
        for _ in range(forwards):  # interleaved so drift hits both alike
            t = time.perf_counter()
            lm.model(input_ids=ids)
            bare_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            pinned(input_ids=ids)
            pin_t.append(time.perf_counter() - t)
    bare, pin = statistics.median(bare_t), statistics.median(pin_t)
    print(
        f"pin overhead, {which} ({sum(len(p.channels) for p in guard.profiles.values())} neurons in "
        f"{len(guard.profiles)} modules, "
        f"T={ids.shape[1]}): bare {bare * 1000:.2f} ms, pinned {pin * 1000:.2f} ms, overhead "
        f"{100 * (pin - bare) / bare:+.1f} %"
    )


if __name__ == "__main__":
    main()
