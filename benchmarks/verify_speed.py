"""How long `guard verify-checkpoint` takes as a checkpoint grows, against hashing the whole checkpoint.

Builds synthetic sharded checkpoints with the tensor names and shapes of a 2B-class Llama
(hidden 2048, intermediate 8192, 16 heads / 8 KV heads, vocab 32000, bfloat16; 126 MB per layer):
6 layers (~1 GB) and 32 layers (~4.3 GB, 2.0 B parameters), random weights, 1 GB shards + index.
Fingerprints 64 neurons spread over every layer (down_proj rows, SwiGLU units = gate + up rows,
norm channels), then times, with the page cache dropped (cold) and warm:
  - verification (load_fingerprint + verify_checkpoint: what the CLI does),
  - sha256 of every shard with hashlib (the usual "hash the release" gate).
Everything is written under a temporary directory (default /tmp) and deleted at the end.

    PYTHONPATH=. python benchmarks/verify_speed.py [--sizes 6,32] [--tmp /tmp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 8, 32000
SHARD_BYTES = 1 << 30
N_NEURONS = 64


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
    }


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    head = HIDDEN // HEADS
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (KV_HEADS * head, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (KV_HEADS * head, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def build_checkpoint(root: Path, layers: int, seed: int = 0) -> int:
    """Random bf16 weights in ~1 GB shards + model.safetensors.index.json; returns total bytes."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    gen = torch.Generator().manual_seed(seed)
    groups, current, size = [], [], 0
    for name, shape in tensor_shapes(layers):
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in group}
        save_file(tensors, str(root / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def write_benchmark_fingerprint(root: Path, path: Path, layers: int) -> int:
    """64 neurons spread over the layers, their producing slices read from the checkpoint."""
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM, LlamaConfig

    from achilles_guard.checkpoint import Checkpoint, tensor_sha256
    from achilles_guard.fingerprint import FORMAT, SCHEMA_VERSION
    from achilles_guard.model import config_sha256
    from achilles_guard.neurons import Candidate, Neuron, producing_slices

    cfg = {k: v for k, v in llama_config(layers).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):  # module tree only: which rows produce which neuron
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg))
    kinds = [("mlp.down_proj", "linear", "mlp_out"), ("mlp.act_fn", "activation", "mlp_act"),
             ("post_attention_layernorm", "norm", "norm"), ("self_attn.o_proj", "linear", "attn_out")]
    gen = torch.Generator().manual_seed(1)
    tensors, slices, neurons = {}, {}, []
    with Checkpoint.open(root) as ckpt:
        for i in range(N_NEURONS):
            layer = i * layers // N_NEURONS
            rel, kind, component = kinds[i % len(kinds)]
            width = INTER if kind == "activation" else HIDDEN
            n = Neuron(f"model.layers.{layer}.{rel}", int(torch.randint(width, (1,), generator=gen)))
            keys = []
            for ws in producing_slices(model, n, Candidate(n.module, layer, component, kind, width)):
                keys.append(ws.key)
                shape, dtype = ckpt.shape_dtype(ws.param)
                value = ckpt.read_slice(ws.param, ws.axis, ws.index).contiguous()
                tensors[ws.key] = value
                slices[ws.key] = {"param": ws.param, "checkpoint_key": ws.param, "axis": ws.axis, "index": ws.index,
                                  "null_value": ws.null_value, "shard": ckpt.shard_of(ws.param), "dtype": dtype,
                                  "shape": list(shape), "sha256": tensor_sha256(value)}
            neurons.append({"module": n.module, "channel": n.channel, "layer": layer, "component": component,
                            "rank": i + 1, "importance": 1.0, "critical": i < 3, "slices": keys,
                            "baseline": {"mean": 0.0, "std": 1.0, "max_abs": 1.0, "mean_abs": 1.0}})
    metadata = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "tool_version": "benchmark",
        "config_sha256": config_sha256(root),
        "model_type": "llama",
        "architecture": "LlamaForCausalLM",
        "scan_params": "{}",
        "critical_set": json.dumps([{"module": x["module"], "channel": x["channel"]} for x in neurons[:3]]),
        "neurons": json.dumps(neurons),
        "slices": json.dumps(slices, sort_keys=True),
        "baseline": json.dumps({"loss": 1.0, "log10_ppl": 0.43, "texts": [1.0]}),
        "probe_texts": "[]",
    }
    path.write_bytes(save(tensors, metadata=metadata))
    return len(slices)


def drop_cache(root: Path) -> None:
    """Evict the checkpoint's pages from the page cache (no root needed: posix_fadvise DONTNEED)."""
    for f in root.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_verify(root: Path, fp_path: Path) -> tuple[float, str]:
    from achilles_guard.detectors.checkpoint_verify import verify_checkpoint
    from achilles_guard.fingerprint import load_fingerprint

    t0 = time.perf_counter()
    report = verify_checkpoint(root, load_fingerprint(fp_path))
    elapsed = time.perf_counter() - t0
    assert report.ok, "a synthetic untouched checkpoint must verify intact"
    return elapsed, report.verdict


def time_hash(root: Path) -> float:
    t0 = time.perf_counter()
    for f in sorted(root.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as handle:
            while chunk := handle.read(16 << 20):
                h.update(chunk)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6,32", help="layer counts to build (6 ≈ 1 GB, 32 ≈ 4.3 GB)")
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import achilles_guard.detectors.checkpoint_verify  # imports are not part of the timing
    import achilles_guard.model  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="guard-verify-bench-", dir=args.tmp))
    rows = []
    try:
        for layers in (int(x) for x in args.sizes.split(",")):
            root = work / f"llama-{layers}l"
            t0 = time.perf_counter()
            total = build_checkpoint(root, layers)
            build_s = time.perf_counter() - t0
            fp_path = work / f"fp-{layers}l.safetensors"
            n_slices = write_benchmark_fingerprint(root, fp_path, layers)
            shards = len(list(root.glob("*.safetensors")))
            cold_v, warm_v, cold_h, warm_h = [], [], [], []
            for _ in range(args.repeat):
                drop_cache(root)
                cold_v.append(time_verify(root, fp_path)[0])
                warm_v.append(time_verify(root, fp_path)[0])
                drop_cache(root)
                cold_h.append(time_hash(root))
                warm_h.append(time_hash(root))
            row = dict(layers=layers, gb=total / 1e9, shards=shards, slices=n_slices, build_s=build_s,
                       verify_cold=min(cold_v), verify_warm=min(warm_v), hash_cold=min(cold_h), hash_warm=min(warm_h))
            rows.append(row)
            print(f"built {layers} layers: {row['gb']:.2f} GB in {shards} shards ({build_s:.0f} s); "
                  f"fingerprint of {N_NEURONS} neurons = {n_slices} slices", flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{'checkpoint':>12} {'shards':>6} {'verify cold':>12} {'verify warm':>12} {'sha256 cold':>12} "
        f"{'sha256 warm':>12} {'ratio cold':>10} {'ratio warm':>10}"
    )
    for r in rows:
        print(
            f"{r['gb']:>10.2f}GB {r['shards']:>6} {r['verify_cold'] * 1e3:>10.1f}ms {r['verify_warm'] * 1e3:>10.1f}ms "
            f"{r['hash_cold']:>11.2f}s {r['hash_warm']:>11.2f}s {r['hash_cold'] / r['verify_cold']:>9.0f}x "
            f"{r['hash_warm'] / r['verify_warm']:>9.0f}x"
        )
    print(f"(best of {args.repeat}; verify = load_fingerprint + verify_checkpoint of {N_NEURONS} neurons; "
          "cold = page cache dropped with posix_fadvise first)")


if __name__ == "__main__":
    main()
