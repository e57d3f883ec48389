"""Tiny models built from configs, shared by every test module (no downloads, ever).

    tok = tokenizer()                                  # byte-level BPE, 512 tokens, cached
    model = tiny_model("gpt2")                         # random, 2 layers, hidden 32
    path = save_model(model, tmp_path / "m")           # safetensors + tokenizer files
    path, plant = planted_model(tmp_path / "p", Plant(channels=(5, 9)))
    proc = run_guard(["scan", str(path)])              # a real `python -m achilles_guard` subprocess
"""

from __future__ import annotations

import functools
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from achilles_guard.engine.demo import DEMO_PLANT, Plant, build_tokenizer, plant_massive
from achilles_guard.engine.texts import default_texts

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt")

# A probe text of ~60 tokens with the test tokenizer.
PROBE = (
    "The river rose slowly through the night, and by morning the old stone bridge stood in water up to "
    "its arches. Farmers moved their cattle to the hills while the baker kept his ovens burning."
)


@functools.lru_cache(maxsize=1)


def tokenizer():
    return build_tokenizer()


def tiny_config(family: str, *, hidden: int = 32, layers: int = 2, intermediate: int = 64, **overrides):
    import transformers as T

    vocab = len(tokenizer())
    common = dict(vocab_size=vocab, tie_word_embeddings=False)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        cfg = cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    elif family == "gemma":
        cfg = T.GemmaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4,
                            max_position_embeddings=256, **common)
    elif family == "phi3":
        cfg = T.Phi3Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                           pad_token_id=0, **common)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, n_inner=intermediate,
                           bos_token_id=0, eos_token_id=0, **common)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=4, max_position_embeddings=256, bos_token_id=0,
                              eos_token_id=0, **common)
    elif family == "opt":
        cfg = T.OPTConfig(hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                          num_attention_heads=4, word_embed_proj_dim=hidden, max_position_embeddings=256,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1, **common)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, *, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    return model.eval()


def save_model(model, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return path


def planted_model(path: Path, plant: Plant = DEMO_PLANT, *, family: str = "llama", hidden: int = 64,
                  layers: int = 4, intermediate: int = 128, seed: int = 0):
    """A Llama-family model with a planted critical set (see achilles_guard.engine.demo); returns (dir, set)."""
    model = tiny_model(family, hidden=hidden, layers=layers, intermediate=intermediate, seed=seed)
    critical = plant_massive(model, plant)
    return save_model(model, path), critical


def run_guard(args: list[str], *, timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m achilles_guard`, the `guard` entry point) in a subprocess."""
    # No GPU unless `env` names one: the suite gives the same numbers on a GPU machine as on CI's CPU.
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "achilles_guard", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)


def run_guard_all(commands: list[list[str]], *, timeout: float = 300, env: dict | None = None
                  ) -> list[subprocess.CompletedProcess]:
    """Run several independent `guard` commands at once (real subprocesses, as `run_guard`), results in order.

    Each one spends seconds importing torch and transformers on one core; side by side they overlap.
    OMP_NUM_THREADS=1 each, so that their torch threads do not spin against each other on a small machine.
    """
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                **(env or {})}
    procs = [subprocess.Popen([sys.executable, "-m", "achilles_guard", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=full_env) for args in commands]
    done = []
    try:
        for args, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def scanned(model_dir: Path, out: Path, *, text: str = PROBE, **params) -> Path:
    """Scan `model_dir` through the library (report.json + fingerprint.safetensors in `out`); returns out."""
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import write_fingerprint
    from achilles_guard.report.documents import scan_report, write_json

    lm = load_model(model_dir)
    result = run_scan(
        lm, [tokenize_probe(lm, "probe", text)], ScanParams(**{"samples": 10, "max_neurons": 100, **params})
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", scan_report(result))
    write_fingerprint(out / "fingerprint.safetensors", result, top=16)
    return out


def reshard(src: Path, dst: Path, *, shards: int = 3, dtype: torch.dtype | None = None) -> Path:
    """Re-save a checkpoint as `shards` safetensors files + model.safetensors.index.json (optionally
    casting floating tensors to `dtype`), copying config and tokenizer files. Returns dst."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i * per : (i + 1) * per]}
        save_file(part, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)
    if dtype is not None:
        config = json.loads((dst / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# --- single-file checkpoint edits (what a write-access attacker does) ---


def edited(src: Path, dst: Path, edit, dtype: torch.dtype | None = None) -> Path:
    """A copy of the single-file checkpoint `src` with `edit(tensors)` applied (and optionally re-cast)."""
    shutil.copytree(src, dst)
    tensors = {k: v.clone() for k, v in load_file(str(src / "model.safetensors")).items()}
    edit(tensors)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def swap_rows(name: str, i: int, j: int):
    def edit(t):
        t[name][[i, j]] = t[name][[j, i]]
    return edit


def negate(name: str):
    def edit(t):
        t[name].neg_()
    return edit


def scale_element(name: str, row: int, col: int, factor: float):
    def edit(t):
        t[name][row, col] *= factor
    return edit


def halve_column(name: str, col: int):
    def edit(t):
        t[name][:, col] *= 0.5
    return edit



def planted_fingerprint(model_dir: Path, out: Path, *, samples: int = 10, top: int = 16) -> Path:
    """Scan a planted model on PROBE (in-process, few samples) and write its fingerprint to `out`."""
    from achilles_guard.engine.scan import ScanParams, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import write_fingerprint

    lm = load_model(model_dir)
    result = run_scan(lm, [tokenize_probe(lm, "probe", PROBE)], ScanParams(samples=samples))
    return write_fingerprint(out, result, top=top)


# --- shared by the monitor tests (test_monitor, test_monitor_server, test_monitor_protect) ---


def varied_prompts(n: int = 60) -> list[str]:
    """Distinct prompts: odd inputs (code, digits, unicode, one char, repeats) and word windows of
    the packaged texts with lengths from 1 to ~80 words, starting all over them."""
    odd = [
        "x",
        "1234567890 " * 5,
        "def f(x):\n    return x * 2\n",
        "Größe, naïve café — 東京 🙂",
        "the the the the the the",
        "!!!???...",
        "A" * 200,
        "    leading spaces",
        "MiXeD CaSe WoRdS",
        "\n\n\n",
    ]
    words = " ".join(t for _, t in default_texts()).split()
    windows = [" ".join(words[(37 * i) % (len(words) - 80):][: 1 + (13 * i) % 80]) for i in range(n)]
    return list(dict.fromkeys(odd + windows))[:n]


class Server:
    """A `guard monitor --serve` subprocess on a free loopback port."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "achilles_guard", "monitor", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.log = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.wait()}): {''.join(self.log)}")
            self.log.append(line)
            found = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                return
        raise RuntimeError("server did not start")

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=payload, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (
                json.loads(data) if resp.getheader("Content-Type", "").startswith("application/json") else data.decode()
            )
        finally:
            conn.close()

    def complete(self, prompt: str, max_tokens: int = 4, **kw):
        status, doc = self.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **kw})
        assert status == 200, doc
        return doc

    def scrape(self) -> dict[tuple, float]:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        self.last_scrape = text
        return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, "".join(self.log) + err


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _byte_vocab() -> list[str]:
    """GPT-2's byte-level alphabet: 256 printable characters, one per byte (a BPE vocab needs no merges for them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_gguf(path: Path, qtype: str = "Q4_0", *, seed: int = 0, hidden: int = 64, ffn: int = 128, layers: int = 2,
              heads: int = 4, kv_heads: int = 2, architecture: str = "llama") -> Path:
    """A tiny llama GGUF written with gguf.GGUFWriter: byte-level BPE vocab (tokenizer.ggml.*), norms in F32,
    every matrix in `qtype` (F32, F16, Q8_0, Q4_0, Q4_1...: quantized by gguf.quants). transformers loads it
    with `gguf_file=`."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = _byte_vocab() + ["Ġt", "Ġa", "he", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["Ġ t", "Ġ a", "h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    quant = gguf.GGMLQuantizationType[qtype]

    def add(name: str, values, q=quant) -> None:
        values = np.asarray(values, dtype=np.float32)
        if q == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif q == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            packed = gguf.quants.quantize(values, q)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=q)

    f32 = gguf.GGMLQuantizationType.F32
    kv = hidden * kv_heads // heads
    add("token_embd.weight", rng.normal(0, 0.5, (len(tokens), hidden)))
    add("output_norm.weight", 1 + rng.normal(0, 0.1, hidden), f32)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + rng.normal(0, 0.1, hidden), f32)
        add(p + "ffn_norm.weight", 1 + rng.normal(0, 0.1, hidden), f32)
        add(p + "attn_q.weight", rng.normal(0, 0.1, (hidden, hidden)))
        add(p + "attn_k.weight", rng.normal(0, 0.1, (kv, hidden)))
        add(p + "attn_v.weight", rng.normal(0, 0.1, (kv, hidden)))
        add(p + "attn_output.weight", rng.normal(0, 0.1, (hidden, hidden)))
        add(p + "ffn_gate.weight", rng.normal(0, 0.1, (ffn, hidden)))
        add(p + "ffn_up.weight", rng.normal(0, 0.1, (ffn, hidden)))
        add(p + "ffn_down.weight", rng.normal(0, 0.1, (hidden, ffn)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def independent_delta(model, input_ids: torch.Tensor, neurons) -> float:
    """Δ log10 PPL of zeroing `neurons` [(module, channel)], with plain hooks and plain cross-entropy: none of the
    project's masking or loss code (a PinnedModel works too: its hooks go on the wrapped modules, before the guard)."""
    def loss() -> float:
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        return float(F.cross_entropy(logits, input_ids[0, 1:]))

    clean = loss()
    handles = []
    for module, channel in neurons:
        def zero(mod, args, out, c=channel):
            out = out.clone()
            out[..., c] = 0.0
            return out
        handles.append(model.get_submodule(module).register_forward_hook(zero))
    try:
        masked = loss()
    finally:
        for h in handles:
            h.remove()
    return (masked - clean) / math.log(10)
