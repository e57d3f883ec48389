"""How long `guard verify-checkpoint` takes as a checkpoint grows, against hashing the whole checkpoint.

Builds synthetic sharded checkpoints with the tensor names and shapes of a 2B-class Llama
(hidden 2048, intermediate 8192, 16 heads / 8 KV heads, vocab 32000, bfloat16; 126 MB per layer):
6 layers (~1 GB) and 32 layers (~4.3 GB, 2.0 B parameters), random weights, 1 GB shards + index.
Fingerprints 64 neurons spread over every layer (down_proj rows, SwiGLU units = gate + up rows,
norm channels) plus the tensor records of every loaded tensor (sha256 + row sketch), then times,
with the page cache dropped (cold) and warm:
  - `--quick` verification (load_fingerprint + verify_model(quick=True): the slices and norm gains),
  - full verification (load_fingerprint + verify_model: every loaded tensor, the CLI's default),
  - sha256 of every shard with hashlib (the usual "hash the release" gate).
Everything is written under a temporary directory (default /tmp) and deleted at the end.

    PYTHONPATH=. python benchmarks/verify_speed.py [--sizes 6,32] [--tmp /tmp] [--repeat 3]

`--gguf`: GGUF against safetensors of the same model, in process (imports excluded): the tiny llama
of the tests (tests/builders.tiny_gguf, --qtype) and its float32 safetensors conversion, and, when it
is cached (`python -m tests.realmodel`), SmolLM2-135M-Instruct.Q4_1.gguf and its converted directory.
The same 64 neurons are fingerprinted from each file (GGUF: raw blocks; safetensors: slices); the
rows give the best-of-`--repeat` warm verify time (load_fingerprint + verify), the cold one (page
cache dropped first), the bytes the verifier reads (header + slices/blocks) and GGUF/safetensors ratios,
and the GGUF header parse alone (read_layout).

    PYTHONPATH=. python benchmarks/verify_speed.py --gguf [--qtype Q4_1] [--repeat 20] [--tiny-only]
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


def write_benchmark_fingerprint(root: Path, path: Path) -> int:
    """64 neurons spread over the checkpoint's layers, their producing slices read from it."""
    return fingerprint_same_neurons(root, root, path, records=True)


def drop_cache(root: Path) -> None:
    """Evict the checkpoint's pages (a directory's files, or one file) from the page cache (no root needed:
    posix_fadvise DONTNEED)."""
    for f in [root] if root.is_file() else [p for p in root.iterdir() if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_verify(root: Path, fp_path: Path, quick: bool) -> tuple[float, str]:
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.integrity.verify import verify_model

    t0 = time.perf_counter()
    report = verify_model(root, load_fingerprint(fp_path), quick=quick)
    elapsed = time.perf_counter() - t0
    assert report.ok, "a synthetic untouched checkpoint must verify intact"
    assert quick or report.tensor_check.identical == report.tensor_check.tensors, report.tensor_check
    return elapsed, report.verdict


def time_hash(root: Path) -> float:
    t0 = time.perf_counter()
    for f in sorted(root.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as handle:
            while chunk := handle.read(16 << 20):
                h.update(chunk)
    return time.perf_counter() - t0


def fingerprint_same_neurons(model_source: Path, hf_dir: Path, path: Path, n_neurons: int = N_NEURONS,
                             records: bool = False) -> int:
    """Fingerprint `n_neurons` neurons spread over the layers (down_proj rows, SwiGLU units, norm channels,
    o_proj rows) of `model_source`: a .gguf file (slices = its raw blocks, as `guard scan` records them) or a
    safetensors directory. `hf_dir` gives the module tree (config.json). `records`: also every tensor's record
    (integrity.records.build_records, as `guard scan` writes them). Returns the number of slices."""
    from safetensors.torch import save
    from transformers import AutoConfig, AutoModelForCausalLM

    from achilles_guard.engine.neurons import Candidate, Neuron, producing_slices
    from achilles_guard.formats.checkpoint import Checkpoint, tensor_sha256
    from achilles_guard.formats.gguf import GGUFSliceSource, is_gguf
    from achilles_guard.formats.load import config_sha256
    from achilles_guard.integrity.fingerprint import FORMAT, SCHEMA_VERSION

    config = AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    kinds = [("mlp.down_proj", "linear", "mlp_out"), ("mlp.act_fn", "activation", "mlp_act"),
             ("post_attention_layernorm", "norm", "norm"), ("self_attn.o_proj", "linear", "attn_out")]
    gen = torch.Generator().manual_seed(1)
    tensors, slices, neurons = {}, {}, []
    gguf = is_gguf(model_source)
    with (GGUFSliceSource(model_source) if gguf else Checkpoint.open(model_source)) as source:
        for i in range(n_neurons):
            layer = i * layers // n_neurons
            rel, kind, component = kinds[i % len(kinds)]
            width = inter if kind == "activation" else hidden
            n = Neuron(f"model.layers.{layer}.{rel}", int(torch.randint(width, (1,), generator=gen)))
            keys = []
            for ws in producing_slices(model, n, Candidate(n.module, layer, component, kind, width)):
                if gguf:
                    keys.append(source.add(ws, tensors, slices))
                    continue
                keys.append(ws.key)
                shape, dtype = source.shape_dtype(ws.param)
                value = source.read_slice(ws.param, ws.axis, ws.index).contiguous()
                tensors[ws.key] = value
                slices[ws.key] = {"param": ws.param, "checkpoint_key": ws.param, "axis": ws.axis, "index": ws.index,
                                  "null_value": ws.null_value, "shard": source.shard_of(ws.param), "dtype": dtype,
                                  "shape": list(shape), "sha256": tensor_sha256(value)}
            neurons.append({"module": n.module, "channel": n.channel, "layer": layer, "component": component,
                            "rank": i + 1, "importance": 1.0, "critical": i < 3, "slices": keys,
                            "baseline": {"mean": 0.0, "std": 1.0, "max_abs": 1.0, "mean_abs": 1.0}})
        metadata = {
            "format": FORMAT,
            "schema_version": str(SCHEMA_VERSION),
            "tool_version": "benchmark",
            "config_sha256": source.layout.config_sha256 if gguf else config_sha256(model_source),
            "model_type": config.model_type,
            "architecture": config.architectures[0] if config.architectures else "LlamaForCausalLM",
            "scan_params": "{}",
            "critical_set": json.dumps([{"module": x["module"], "channel": x["channel"]} for x in neurons[:3]]),
            "neurons": json.dumps(neurons),
            "slices": json.dumps(slices, sort_keys=True),
            "baseline": json.dumps({"loss": 1.0, "log10_ppl": 0.43, "texts": [1.0]}),
            "probe_texts": "[]",
        }
        if gguf:
            metadata["gguf"] = source.metadata_json()
    if records:
        from achilles_guard.formats.source import open_source
        from achilles_guard.integrity.records import SKETCH_TENSOR, build_records

        with open_source(model_source) as src:
            rec = build_records(src)
        tensors[SKETCH_TENSOR] = torch.from_numpy(rec.sketch)
        metadata["tensors"] = rec.metadata_json()
    path.write_bytes(save(tensors, metadata=metadata))
    return len(slices)


def safetensors_bytes_read(root: Path, fp, shards: tuple[str, ...]) -> int:
    """What verify_slices reads: each opened shard's header (8-byte length + JSON) and every slice's elements."""
    total = 0
    for shard in shards:
        with open(root / shard, "rb") as handle:
            total += 8 + int.from_bytes(handle.read(8), "little")
    return total + sum(fp.tensors[key].numel() * fp.tensors[key].element_size() for key in fp.slices)


def time_gguf_pair(label: str, gguf_path: Path, hf_dir: Path, work: Path, repeat: int) -> dict:
    """Warm and cold verify of the GGUF and of the safetensors directory, same 64 neurons; header parse alone."""
    from achilles_guard.formats.gguf import read_layout
    from achilles_guard.integrity.fingerprint import load_fingerprint
    from achilles_guard.integrity.verify import verify_slices

    fp_g, fp_s = work / f"{label}-gguf.fp.safetensors", work / f"{label}-st.fp.safetensors"
    n_slices = fingerprint_same_neurons(gguf_path, hf_dir, fp_g)
    assert fingerprint_same_neurons(hf_dir, hf_dir, fp_s) == n_slices

    def gguf_once():
        t0 = time.perf_counter()
        report = verify_slices(gguf_path, load_fingerprint(fp_g))
        elapsed = time.perf_counter() - t0
        assert report.ok and report.counts["intact"] == n_slices, report.counts
        return elapsed, report.bytes_read, report.header_bytes

    def st_once():
        t0 = time.perf_counter()
        fp = load_fingerprint(fp_s)
        report = verify_slices(hf_dir, fp)
        elapsed = time.perf_counter() - t0
        assert report.ok and report.counts["intact"] == n_slices, report.counts
        return elapsed, safetensors_bytes_read(hf_dir, fp, report.shards_read)

    def header_once():
        t0 = time.perf_counter()
        read_layout(gguf_path).close()
        return time.perf_counter() - t0

    def cold(fn, target: Path):
        drop_cache(target)
        return fn()[0]

    warm_g = [gguf_once() for _ in range(repeat)]
    warm_s = [st_once() for _ in range(repeat)]
    header = min(header_once() for _ in range(repeat))
    cold_g = min(cold(gguf_once, gguf_path) for _ in range(max(1, repeat // 5)))
    cold_s = min(cold(st_once, hf_dir) for _ in range(max(1, repeat // 5)))
    st_size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    return dict(label=label, slices=n_slices, g_warm=min(t for t, *_ in warm_g), s_warm=min(t for t, _ in warm_s),
                g_cold=cold_g, s_cold=cold_s, g_bytes=warm_g[0][1], g_header=warm_g[0][2], s_bytes=warm_s[0][1],
                g_size=gguf_path.stat().st_size, s_size=st_size, header=header)


def gguf_main(args) -> None:
    import gguf  # noqa: F401  (imports are not part of the timing)

    from achilles_guard.formats.load import load_model
    from tests.builders import tiny_gguf

    work = Path(tempfile.mkdtemp(prefix="guard-verify-gguf-", dir=args.tmp))
    rows = []
    try:
        tiny = tiny_gguf(work / f"tiny-{args.qtype}.gguf", args.qtype)
        lm = load_model(tiny, dtype="float32", device="cpu")
        lm.model.save_pretrained(work / "tiny-st", safe_serialization=True)
        rows.append(time_gguf_pair(f"tiny {args.qtype}", tiny, work / "tiny-st", work, args.repeat))
        from tests.realmodel import GGUF_NAME, find_cached

        cached = None if args.tiny_only else find_cached()
        smol = cached and cached.parent / f"{cached.name}-gguf" / GGUF_NAME
        if smol and smol.is_file():
            rows.append(time_gguf_pair("SmolLM2 Q4_1", smol, cached, work, args.repeat))
        elif not args.tiny_only:
            print("SmolLM2 GGUF not cached (python -m tests.realmodel fetches it): tiny model only")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'model':>13} {'slices':>6} | {'GGUF file':>10} {'read':>10} {'header':>10} {'parse':>8} "
          f"{'warm':>8} {'cold':>8} | {'st files':>10} {'read':>8} {'warm':>8} {'cold':>8} | "
          f"{'read ×':>7} {'warm ×':>7} {'cold ×':>7}")
    for r in rows:
        print(f"{r['label']:>13} {r['slices']:>6} | {r['g_size']:>10,} {r['g_bytes']:>10,} {r['g_header']:>10,} "
              f"{r['header'] * 1e3:>6.1f}ms {r['g_warm'] * 1e3:>6.1f}ms {r['g_cold'] * 1e3:>6.1f}ms | "
              f"{r['s_size']:>10,} {r['s_bytes']:>8,} {r['s_warm'] * 1e3:>6.1f}ms {r['s_cold'] * 1e3:>6.1f}ms | "
              f"{r['g_bytes'] / r['s_bytes']:>7.1f} {r['g_warm'] / r['s_warm']:>7.2f} "
              f"{r['g_cold'] / r['s_cold']:>7.2f}")
    print(f"(best of {args.repeat} warm, {max(1, args.repeat // 5)} cold; verify = load_fingerprint + verify of "
          f"{N_NEURONS} neurons; read = header + slice/block bytes the verifier reads; × = GGUF / safetensors; "
          "parse = GGUF header parse alone)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6,32", help="layer counts to build (6 ≈ 1 GB, 32 ≈ 4.3 GB)")
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--repeat", type=int, default=None, help="default: 3 (20 with --gguf)")
    parser.add_argument("--gguf", action="store_true", help="GGUF vs safetensors of the same model (see above)")
    parser.add_argument("--qtype", default="Q4_1", help="--gguf: type of the tiny GGUF's matrices")
    parser.add_argument("--tiny-only", action="store_true", help="--gguf: skip SmolLM2 even when it is cached")
    args = parser.parse_args()
    if args.gguf:
        args.repeat = args.repeat or 20
        return gguf_main(args)
    args.repeat = args.repeat or 3

    work = Path(tempfile.mkdtemp(prefix="guard-verify-bench-", dir=args.tmp))
    rows = []
    try:
        for layers in (int(x) for x in args.sizes.split(",")):
            root = work / f"llama-{layers}l"
            t0 = time.perf_counter()
            total = build_checkpoint(root, layers)
            build_s = time.perf_counter() - t0
            fp_path = work / f"fp-{layers}l.safetensors"
            n_slices = write_benchmark_fingerprint(root, fp_path)
            shards = len(list(root.glob("*.safetensors")))
            t = {k: [] for k in ("quick_cold", "quick_warm", "full_cold", "full_warm", "hash_cold", "hash_warm")}
            for _ in range(args.repeat):
                for mode, quick in (("quick", True), ("full", False)):
                    drop_cache(root)
                    t[f"{mode}_cold"].append(time_verify(root, fp_path, quick)[0])
                    t[f"{mode}_warm"].append(time_verify(root, fp_path, quick)[0])
                drop_cache(root)
                t["hash_cold"].append(time_hash(root))
                t["hash_warm"].append(time_hash(root))
            row = dict(layers=layers, gb=total / 1e9, shards=shards, slices=n_slices, build_s=build_s,
                       fp_bytes=fp_path.stat().st_size, **{k: min(v) for k, v in t.items()})
            rows.append(row)
            print(f"built {layers} layers: {row['gb']:.2f} GB in {shards} shards ({build_s:.0f} s); "
                  f"fingerprint of {N_NEURONS} neurons = {n_slices} slices + every tensor's record "
                  f"({row['fp_bytes'] / 1e6:.1f} MB)", flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'checkpoint':>12} {'shards':>6} | {'quick cold':>10} {'quick warm':>10} | {'full cold':>9} "
          f"{'full warm':>9} | {'sha256 cold':>11} {'sha256 warm':>11} | {'full/sha256 cold':>16} {'warm':>6} | "
          f"{'sha256/quick warm':>17}")
    for r in rows:
        print(f"{r['gb']:>10.2f}GB {r['shards']:>6} | {r['quick_cold'] * 1e3:>8.1f}ms "
              f"{r['quick_warm'] * 1e3:>8.1f}ms | "
              f"{r['full_cold']:>8.2f}s {r['full_warm']:>8.2f}s | {r['hash_cold']:>10.2f}s {r['hash_warm']:>10.2f}s | "
              f"{r['full_cold'] / r['hash_cold']:>15.2f}x {r['full_warm'] / r['hash_warm']:>5.2f}x | "
              f"{r['hash_warm'] / r['quick_warm']:>16.0f}x")
    print(f"(best of {args.repeat}; verify = load_fingerprint + verify_model, quick: {N_NEURONS} neurons' slices, "
          "full: every tensor; sha256 = hashlib over every shard, one thread; cold = page cache dropped with "
          "posix_fadvise first)")


if __name__ == "__main__":
    main()
