"""Scan speed: PCICN stage 1 + stage 2 against the same forward passes run bare.

A planted Llama of ~40 M parameters (hidden 512, 8 layers, FFN 1536; the plant in layer 0, see
docs/fixtures.md for why not later) and a ~100-token probe. The bare baseline runs, one at a time and
without any hook, the forwards the scan needs: K + 1 forwards of the base model (clean + K noisy
inputs) and one full forward per candidate n tried in stage 2 (plus the clean loss).

    PYTHONPATH=. python benchmarks/scan_speed.py [--samples 100] [--device cpu|cuda] [--dtype float32|float16]
    PYTHONPATH=. python benchmarks/scan_speed.py --short [--repeats 5] [--hidden 96,192,384]

`--short`: the fixed cost per forward. A tiny planted Llama (hidden 96, 3 layers, FFN 256, vocab 512;
`--hidden` sets other widths, the FFN 8/3 of it, and prints one block each, without the profile)
and a 16-token probe, where a bare forward takes about a millisecond on a CPU: stage 1 and stage 2
against the same forwards run bare, both one at a time (stage 2: one forward per n up to n*) and
batched exactly as the scan batches them (the compute floor; stage 2: the same chunks of 8, 16, ...
masks, the last one evaluated whole), best of `--repeats`, then a cProfile of one scan: where the
time that is not a module's forward goes.

Prints times, the ratio scan / bare, and peak memory of stage 1 (CUDA: max allocated; CPU: the peak
of torch's CPU allocator as seen by the profiler) next to what K copies of the activations would take.
"""

from __future__ import annotations

import argparse
import time

import torch

from achilles_guard.engine import pcicn
from achilles_guard.engine.demo import Plant, build_tokenizer, plant_massive
from achilles_guard.engine.neurons import discover

TEXT = (
    "The lighthouse keeper wrote in his log every evening: the wind, the height of the swell, the ships "
    "that passed and the ones that did not. In forty years the entries changed very little."
)
VOCAB = 12288  # embeddings + head of a 12 k vocabulary bring the model to ~40 M parameters


def build(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    critical = plant_massive(model, Plant(layer=0, channels=(11, 29, 47), massive=1000.0))
    model = model.to(device=device, dtype=dtype)
    ids = tok(TEXT, return_tensors="pt")["input_ids"].to(device)
    return model, ids, critical


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bare(model, ids, samples, n_tried, device):
    """The same forwards, sequential and hook-free."""
    embeds = model.get_input_embeddings()(ids)  # (1, T, d)
    generator = torch.Generator().manual_seed(0)
    T, d = embeds.shape[1:]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(samples + 1):
            noise = torch.randn(T, d, generator=generator).to(device, embeds.dtype)
            model.base_model(inputs_embeds=embeds + 5.0 * noise[None], use_cache=False)
        sync(device)
        t1 = time.perf_counter()
        for _ in range(n_tried + 1):  # + the clean loss
            logits = model(input_ids=ids, use_cache=False).logits
            torch.log_softmax(logits.float(), -1)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def short_case(repeats: int, samples: int, hidden: int = 96, profile_it: bool = True) -> None:
    """Scan / bare on a forward of about a millisecond (see the module docstring)."""
    import cProfile
    import io
    import pstats

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    critical = plant_massive(model, Plant(layer=0, channels=(11, 29, 47), massive=1000.0))
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :16]
    cands = discover(model, "all")
    T = ids.shape[1]
    b1 = pcicn._rank_batch(model, T, cands.total)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
    embeds = model.get_input_embeddings()(ids)

    def bare_batched(k_rows: int, chunks: list[int]):
        generator = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            done = 0
            while done < k_rows:
                b = min(b1, k_rows - done)
                noise = torch.randn(b, T, embeds.shape[-1], generator=generator)
                model.base_model(inputs_embeds=embeds + 5.0 * noise, use_cache=False)
                done += b
        t1 = time.perf_counter()
        with torch.no_grad():
            for b in [1, *chunks]:  # the clean loss, then each chunk of candidate n
                logits = model(input_ids=ids.expand(b, -1), use_cache=False).logits
                torch.log_softmax(logits.float(), -1)
        return t1 - t0, time.perf_counter() - t1

    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ranking = pcicn.rank(model, ids, cands, samples=samples, seed=42)
        t1 = time.perf_counter()
        result = pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=1000)
        t2 = time.perf_counter()
        n_tried = len(result.curve)
        # the batches search() ran: chunks of 8, 16, 32... masks (capped at its batch size and at what is left of
        # the budget), up to the chunk in which Δ reached ε, which it evaluates whole (n* = 3: one batch of 8)
        limit, max_batch = min(1000, len(ranking)), pcicn.search_batch_size(model, T)
        chunks, done, chunk = [], 0, min(8, max_batch)
        while done < n_tried:
            chunks.append(min(chunk, limit - done))
            done += chunks[-1]
            chunk = min(chunk * 2, max_batch)
        seq1, seq2 = bare(model, ids, samples, n_tried, "cpu")
        bat1, bat2 = bare_batched(samples + 1, chunks)
        rows.append((t1 - t0, t2 - t1, seq1, seq2, bat1, bat2))
    s1, s2, q1, q2, f1, f2 = (min(r[i] for r in rows) for i in range(6))
    print(f"short case: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {cands.total} "
          f"candidate neurons in {len(cands.candidates)} modules, {T} tokens, K={samples}, stage-1 batch {b1}; "
          f"threads {torch.get_num_threads()}; best of {repeats}")
    print(f"planted set found: {set(result.critical_set) == critical} (n*={result.n_star}, {n_tried} n tried)")
    print(f"stage 1 (rank)  : scan {s1 * 1e3:8.1f} ms | bare one at a time {q1 * 1e3:8.1f} ms ({s1 / q1:5.2f}x) | "
          f"bare batched {f1 * 1e3:8.1f} ms ({s1 / f1:5.2f}x)")
    print(f"stage 2 (search): scan {s2 * 1e3:8.1f} ms | bare one at a time {q2 * 1e3:8.1f} ms ({s2 / q2:5.2f}x) | "
          f"bare batched {f2 * 1e3:8.1f} ms ({s2 / f2:5.2f}x)")
    print(f"total           : scan {(s1 + s2) * 1e3:8.1f} ms | bare batched {(f1 + f2) * 1e3:8.1f} ms "
          f"({(s1 + s2) / (f1 + f2):5.2f}x; goal <= 1.2x)")
    s1, fw_s, fixed_s, hooks_s, arith_s, floor_s = stage1_breakdown(model, ids, embeds, cands, samples, b1, repeats)
    base_s = fw_s + fixed_s
    print(f"stage 1 split (interleaved): scan {s1 * 1e3:.1f} ms = noisy forwards {fw_s * 1e3:.1f} + clean forward "
          f"and noise {fixed_s * 1e3:.1f} + hook dispatch {hooks_s * 1e3:.1f} + sum_k |A_k - A_clean| "
          f"{arith_s * 1e3:.1f} + the rest {(s1 - base_s - hooks_s - arith_s) * 1e3:.1f} ms")
    print(f"stage 1 / (its forwards + noise): {s1 / base_s:5.2f}x; with no tax at all, only the accumulation: "
          f"{(base_s + arith_s) / base_s:5.2f}x; with an ideal one-read accumulation ({floor_s * 1e3:.1f} ms alone, "
          f"not torch's summation order): {(base_s + floor_s) / base_s:5.2f}x")
    if not profile_it:
        return
    profile = cProfile.Profile()
    profile.enable()
    ranking = pcicn.rank(model, ids, cands, samples=samples, seed=42)
    pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=1000)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
    print("cProfile of one scan (rank + search), top 15 by own time:")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


def stage1_breakdown(model, embeds_ids, embeds, cands, samples, b1, repeats):
    """Where stage 1's time beyond its forwards goes, on forwards of its real batch sizes (b1 rows, then the
    rest), each best of `repeats`: the same forwards with hooks that only return (their dispatch), with hooks
    doing pcicn's accumulation (sub, abs, sum over the batch, add: three passes over (b, T, C) per module, in
    buffers shared by width as pcicn shares them), and, alone after the forward, one read pass over the same
    activations (torch.sum over the batch: the least any implementation must read)."""
    from achilles_guard.engine.masking import hooks

    names = [c.name for c in cands.candidates]
    T, d = embeds.shape[1:]
    sizes = [min(b1, samples - s) for s in range(0, samples, b1)]
    inputs = {b: embeds + 5.0 * torch.randn(b, T, d, generator=torch.Generator().manual_seed(b)) for b in set(sizes)}
    outs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for b in set(sizes):
            grabbed = []
            grab = {n: (lambda o, _g=grabbed: _g.append(o.reshape(-1, T, o.shape[-1]).clone())) for n in names}
            with hooks(model, grab):
                model.base_model(inputs_embeds=inputs[b], use_cache=False)
            outs[b] = grabbed
    clean = {n: o[0].clone() for n, o in zip(names, outs[sizes[0]])}
    sums = {n: torch.zeros_like(c) for n, c in clean.items()}
    scratch: dict[tuple, torch.Tensor] = {}

    def accumulate(name):
        def fn(output):
            out = output.reshape(-1, T, output.shape[-1])
            b, c = out.shape[0], out.shape[-1]
            if ("diff", b, c) not in scratch:
                scratch[("diff", b, c)] = torch.empty(b, T, c)
                scratch[("sum", c)] = torch.empty(T, c)
            diff, part = scratch[("diff", b, c)], scratch[("sum", c)]
            torch.sub(out, clean[name], out=diff)
            diff.abs_()
            torch.sum(diff, 0, out=part)
            sums[name] += part
        return fn

    def forwards(fns=None):
        with torch.no_grad(), hooks(model, fns or {}):
            for b in sizes:
                model.base_model(inputs_embeds=inputs[b], use_cache=False)

    parts = {b: [torch.empty(o.shape[1:]) for o in outs[b]] for b in outs}

    def one_read():
        for b in sizes:
            for o, part in zip(outs[b], parts[b]):
                torch.sum(o, 0, out=part)

    def clean_forward():
        with torch.no_grad():
            model.base_model(inputs_embeds=embeds, use_cache=False)

    def noise():
        generator = torch.Generator().manual_seed(42)
        for b in sizes:
            pcicn._noise(generator, b, T, d)

    def scan():
        pcicn.rank(model, embeds_ids, cands, samples=samples, seed=42)

    variants = {
        "scan": scan,
        "bare": forwards,
        "clean": clean_forward,
        "noise": noise,
        "noop": lambda: forwards({n: (lambda o: None) for n in names}),
        "arith": lambda: forwards({n: accumulate(n) for n in names}),
        "read": one_read,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(max(repeats, 5) * 2):  # interleaved, so that a slow spell of the machine hits every variant
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    t = {k: min(v) for k, v in times.items()}
    return (t["scan"], t["bare"], t["clean"] + t["noise"], max(0.0, t["noop"] - t["bare"]),
            max(0.0, t["arith"] - t["noop"]), t["read"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="the short-forward case (module docstring)")
    parser.add_argument("--hidden", default="96", help="--short: hidden size(s), comma-separated (FFN 8/3 of it)")
    args = parser.parse_args()
    if args.short:
        sizes = [int(h) for h in args.hidden.split(",")]
        for h in sizes:
            short_case(max(args.repeats, 3), args.samples, h, profile_it=len(sizes) == 1)
        return
    device, dtype = args.device, getattr(torch, args.dtype)
    model, ids, critical = build(device, dtype)
    cands = discover(model, "all")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama {n_params / 1e6:.1f} M params, {cands.total} candidate neurons in {len(cands.candidates)} "
        "modules; "
        f"text {ids.shape[1]} tokens; K={args.samples}; device {device} {args.dtype}; threads {torch.get_num_threads()}"
    )

    # warm-up (allocator, kernels)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)

    best = None
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        sync(device)
        t0 = time.perf_counter()
        ranking = pcicn.rank(model, ids, cands, samples=args.samples, seed=42)
        sync(device)
        t1 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() - base_mem if device == "cuda" else None
        result = pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=1000)
        sync(device)
        t2 = time.perf_counter()
        n_tried = len(result.curve)
        b1, b2 = bare(model, ids, args.samples, n_tried, device)
        run = (t1 - t0, t2 - t1, b1, b2, peak, n_tried, result)
        if args.repeats > 1:  # every repeat is printed: on a shared machine one run can be disturbed
            print(f"  repeat: stage 1 {run[0]:.3f}/{b1:.3f} s, stage 2 {run[1]:.3f}/{b2:.3f} s (scan/bare), "
                  f"total ratio {(run[0] + run[1]) / (b1 + b2):.2f}x")
        best = run  # the last repeat is detailed below
    s1, s2, b1, b2, peak, n_tried, result = best
    found = set(result.critical_set) == critical
    position = {n: i for i, n in enumerate(ranking.top(len(ranking)))}
    print(f"stage-1 ranks of the planted neurons: {sorted(position[n] + 1 for n in critical)}")
    print(f"scan: converged={result.converged} n*={result.n_star} planted set found exactly: {found}; "
          f"candidates tried: {n_tried}")
    print(f"stage 1 (rank)   : scan {s1:7.3f} s   bare {args.samples + 1} forwards {b1:7.3f} s   ratio {s1 / b1:5.2f}x")
    print(f"stage 2 (search) : scan {s2:7.3f} s   bare {n_tried + 1} forwards {b2:7.3f} s   ratio {s2 / b2:5.2f}x")
    print(f"total            : scan {s1 + s2:7.3f} s   bare {b1 + b2:7.3f} s   ratio {(s1 + s2) / (b1 + b2):5.2f}x")

    T = ids.shape[1]
    elt = 4
    one_copy = T * cands.total * elt
    print(f"activations of one forward over all candidates: {one_copy / 2**20:.1f} MiB; "
          f"K copies would be {args.samples * one_copy / 2**20:.0f} MiB")
    if peak is None:
        peak = _cpu_stage1_peak(model, ids, cands, args.samples)
    print(f"stage 1 peak extra memory: {peak / 2**20:.1f} MiB ({peak / one_copy:.1f} single-forward copies; "
          f"the batch of noisy samples in flight is {pcicn._rank_batch(model, ids.shape[1], cands.total)})")


def _cpu_stage1_peak(model, ids, cands, samples):
    """Peak resident-set growth during stage 1, sampled every 5 ms from /proc/self/statm."""
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - start)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    pcicn.rank(model, ids, cands, samples=samples, seed=42)
    done.set()
    watcher.join()
    return peak[0]


if __name__ == "__main__":
    main()
