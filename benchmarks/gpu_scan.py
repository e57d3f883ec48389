"""GPU scan benchmark: a full PCICN scan against the same forward passes run bare, in one run.

For each model it prints: load time, stage-1 time (K noisy forwards + the clean one), stage-2 time
and time per candidate mask, whole-scan time (discovery + stage 1 + stage 2, load excluded), peak
GPU memory, and the compute floor: the *same* batched forwards (same batch sizes, same shapes, same
fp32 log-softmax loss) run with no hook at all. The ratio scan / floor is the cost of our
machinery (hooks, running sums, per-sample masks, bookkeeping).

Models:
  smollm2  the real SmolLM2-135M-Instruct, a Hugging Face directory (--smollm2 DIR), its first
           packaged probe text
  1b, 8b   random-weight Llama-shaped models built from a config (Llama-3.2-1B / Llama-3.1-8B
           shapes, vocab 128256), no download; a seeded random --tokens-token text
  tiny     a 2-layer random Llama (hidden 64): a CPU smoke test of this script (CI runs it)

    PYTHONPATH=. python benchmarks/gpu_scan.py --models smollm2,1b,8b --smollm2 DIR      # on a GPU
    PYTHONPATH=. python benchmarks/gpu_scan.py --models tiny --device cpu --dtype float32 --samples 4

Random weights do not collapse, so on 1b/8b the search runs to the full budget (--max-neurons
masks): the worst case for stage 2.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import contextmanager

import torch

from achilles_guard.engine import pcicn
from achilles_guard.engine.neurons import discover
from achilles_guard.engine.perplexity import row_losses

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied)
    "tiny": (64, 128, 2, 4, 2, 512, True),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "8b": (4096, 14336, 32, 32, 8, 128256, False),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_llama(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=tied, max_position_embeddings=2048)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype and device: no fp32 copy of 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def smollm2(directory: str, device: str, dtype: torch.dtype):
    from achilles_guard.engine.texts import default_texts
    from achilles_guard.formats.load import load_model

    lm = load_model(directory, dtype={torch.float16: "float16", torch.float32: "float32",
                                      torch.bfloat16: "bfloat16"}[dtype], device=device)
    name, text = default_texts()[0]
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(device)
    return lm.model, ids, name


def floor(model, ids, samples: int, rank_batch: int, chunks: list[int], device: str) -> tuple[float, float]:
    """The scan's forwards with the same batch shapes and no hooks: (stage-1 s, stage-2 s)."""
    embeds = model.get_input_embeddings()(ids)  # (1, T, d)
    T, d = embeds.shape[1:]
    generator = torch.Generator().manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.base_model(inputs_embeds=embeds, use_cache=False)  # the clean forward
        for start in range(0, samples, rank_batch):
            b = min(rank_batch, samples - start)
            noise = torch.randn(b, T, d, generator=generator).to(device)
            model.base_model(inputs_embeds=(embeds.float() + 5.0 * noise).to(embeds.dtype), use_cache=False)
        sync(device)
        t1 = time.perf_counter()
        row_losses(model(input_ids=ids, use_cache=False).logits, ids)  # the clean loss
        for rows in chunks:
            batch = ids.expand(rows, -1)
            row_losses(model(input_ids=batch, use_cache=False).logits, batch).tolist()
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def search_chunks(n_tried: int, max_batch: int) -> list[int]:
    """The chunk sizes pcicn.search used for n_tried candidates (8, 16, 32, ... capped)."""
    chunks, chunk, done = [], min(8, max_batch), 0
    while done < n_tried:
        chunks.append(min(chunk, n_tried - done))
        done += chunks[-1]
        chunk = min(chunk * 2, max_batch)
    return chunks


@contextmanager
def profiled(enabled: bool, title: str):
    """torch.profiler around a stage; prints the ops that took the most self time (CPU and CUDA)."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    print(f"--- profile: {title}")
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=48))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=48))


def bench(label: str, build, args, device: str, dtype: torch.dtype) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    model, ids, text_name = build()
    sync(device)
    load_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated() if cuda else 0
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # warm-up: kernels, allocator
        model(input_ids=ids, use_cache=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t1 = time.perf_counter()
    cands = discover(model, args.components)
    sync(device)
    t2 = time.perf_counter()
    with profiled(args.profile, f"{label} stage 1"):
        ranking = pcicn.rank(model, ids, cands, samples=args.samples, seed=42, alpha=5.0)
        sync(device)
    t3 = time.perf_counter()
    with profiled(args.profile, f"{label} stage 2"):
        result = pcicn.search(model, ids, ranking, epsilon=1.0, max_neurons=args.max_neurons)
        sync(device)
    t4 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    n_tried = len(result.curve)
    T = ids.shape[1]
    rank_batch = pcicn._rank_batch(model, T, cands.total)
    chunks = search_chunks(n_tried, pcicn.search_batch_size(model, T))
    f1, f2 = floor(model, ids, args.samples, rank_batch, chunks, device)
    scan_s = t4 - t1
    row = dict(model=label, params=n_params, text=text_name, tokens=T, candidates=cands.total,
               load_s=load_s, discover_s=t2 - t1, stage1_s=t3 - t2, stage2_s=t4 - t3, masks=n_tried,
               per_mask_ms=1e3 * (t4 - t3) / max(n_tried, 1), scan_s=scan_s, floor1_s=f1, floor2_s=f2,
               ratio=scan_s / (f1 + f2), peak_gib=peak / 2**30, weights_gib=weights / 2**30,
               converged=result.converged, n_star=result.n_star, delta=result.delta_log10,
               critical=[f"{n.module}[{n.channel}]" for n in result.critical_set])
    del model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,1b,8b")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct Hugging Face directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=30, help="probe length of the random-weight models")
    parser.add_argument("--max-neurons", type=int, default=1000)
    parser.add_argument("--components", default="all")
    parser.add_argument("--profile", action="store_true", help="print the top kernels/ops of each scan stage")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    from transformers import LlamaForCausalLM  # noqa: F401 - imported before any timer starts

    if device.startswith("cuda"):
        import transformers

        print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} CUDA {torch.version.cuda} | "
              f"transformers {transformers.__version__} | python {platform.python_version()}")
    print(f"dtype {args.dtype}, K={args.samples}, budget {args.max_neurons} masks, components {args.components}")

    rows = []
    for label in args.models.split(","):
        if label == "smollm2":
            if not args.smollm2:
                print("smollm2: skipped (no --smollm2 DIR)")
                continue
            build = lambda: smollm2(args.smollm2, device, dtype)  # noqa: E731
        else:
            def build(label=label):
                ids = torch.randint(0, SHAPES[label][5], (1, args.tokens),
                                    generator=torch.Generator().manual_seed(0)).to(device)
                return random_llama(label, device, dtype), ids, f"random {args.tokens} tokens"
        row = bench(label, build, args, device, dtype)
        rows.append(row)
        found = f"n*={row['n_star']} {row['critical']} delta={row['delta']:.2f}" if row["converged"] \
            else f"not converged within {row['masks']} masks"
        print(f"{label}: {row['params'] / 1e9:.3f} B params, {row['candidates']} candidate neurons, "
              f"{row['tokens']} tokens ({row['text']}); {found}")
    header = ("model", "load s", "stage1 s (floor)", "stage2 s (floor)", "masks", "ms/mask", "scan s", "floor s",
              "ratio", "peak GiB", "weights GiB")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["model"], f"{r['load_s']:.2f}", f"{r['stage1_s']:.2f} ({r['floor1_s']:.2f})",
                          f"{r['stage2_s']:.2f} ({r['floor2_s']:.2f})",
                          str(r["masks"]), f"{r['per_mask_ms']:.2f}", f"{r['scan_s']:.2f}",
                          f"{r['floor1_s'] + r['floor2_s']:.2f}", f"{r['ratio']:.2f}x",
                          f"{r['peak_gib']:.2f}", f"{r['weights_gib']:.2f}"]))


if __name__ == "__main__":
    main()
