"""Training-time hardening: targeted neuron dropout + KL to the frozen original.

Each step draws `batch_size` windows of `seq_len` tokens from local text (`--data`: a .txt, .raw or
.jsonl file, or a directory of them, read by `evaluation.load_corpus`; nothing is downloaded) and,
per row, masks each of the top `drop_top` fingerprinted neurons with probability `drop_p` (one per-row
MaskPlan, the shared
masking mechanism). Loss = cross-entropy + λ · KL(original || model), the original's logits taken
unmasked from the frozen original. accelerate places the model; state (weights, optimizer, step)
is checkpointed atomically every `save_every` steps and on Ctrl-C, and a later run with the same
checkpoint directory resumes from it. Window sampling is seeded per step, so 10 + 10 resumed steps
equal 20 straight ones.

    details = finetune(model, original, fp, tokenizer, FinetuneConfig(data="corpus/", steps=100), checkpoint_dir=d)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from achilles_guard.engine.corpus import load_corpus
from achilles_guard.engine.masking import MaskPlan, masked
from achilles_guard.errors import InputError, UsageError

__all__ = ["FinetuneConfig", "finetune"]


@dataclass(frozen=True)
class FinetuneConfig:
    data: str | None = None
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 64
    drop_p: float = 0.5
    drop_top: int = 32
    kl_weight: float = 1.0
    seed: int = 0
    save_every: int = 25

    def validated(self) -> "FinetuneConfig":
        checks = [
            (self.data is not None, "--strategy finetune needs --data (a local .txt/.jsonl file or directory)"),
            (self.steps >= 1, f"--steps must be >= 1 (got {self.steps})"),
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.seq_len >= 2, f"--seq-len must be >= 2 (got {self.seq_len})"),
            (0.0 <= self.drop_p <= 1.0, f"--drop-p must be in [0, 1] (got {self.drop_p})"),
            (self.drop_top >= 1, f"--drop-top must be >= 1 (got {self.drop_top})"),
            (self.kl_weight >= 0, f"--kl-weight must be >= 0 (got {self.kl_weight})"),
            (self.save_every >= 1, "save_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        load_corpus(Path(self.data))  # the one corpus reader (evaluation.py): .txt, .raw, .jsonl
        return self


def finetune(
    model,
    original,
    fp,
    tokenizer,
    config: FinetuneConfig,
    *,
    checkpoint_dir: Path,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Fine-tune `model` in place (float32); returns what happened (steps, losses, resumed_from).

    `progress(step, steps, detail)` is called after every step (the CLI's Rich progress bar);
    without it, `log` gets a line every 10 steps.
    """
    from accelerate import Accelerator

    config = config.validated()
    tokens = torch.cat(
        [tokenizer(t, return_tensors="pt")["input_ids"][0] for t in load_corpus(Path(config.data))]
    )  # (N,)
    if tokens.numel() < config.seq_len + 1:
        raise InputError(
            f"--data {config.data}: only {tokens.numel()} tokens; need more than --seq-len {config.seq_len}"
        )
    # every attack's set first (the fingerprint marks the neurons of every portfolio attack's set
    # `critical`), then the best-ranked others: dropout over what any attack would remove
    candidates = sorted(fp.neurons, key=lambda r: (not r.critical, r.rank))[
        : max(config.drop_top, len(fp.critical_records))
    ]
    modules = sorted({r.neuron.module for r in candidates})
    channels = {m: torch.tensor([r.neuron.channel for r in candidates if r.neuron.module == m]) for m in modules}

    accelerator = Accelerator(cpu=model.get_input_embeddings().weight.device.type == "cpu")
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    original.to(device)

    start, history = _resume(checkpoint_dir, model, optimizer, config)
    step = start
    try:
        for step in range(start, config.steps):
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # per-step: resume-exact
            starts = torch.randint(0, tokens.numel() - config.seq_len, (config.batch_size,), generator=g)
            batch = torch.stack([tokens[s : s + config.seq_len] for s in starts.tolist()]).to(device)  # (B, L)
            factors = {
                m: (torch.rand(config.batch_size, len(c), generator=g) >= config.drop_p).float()
                for m, c in channels.items()
            }
            with torch.no_grad():
                reference = original(input_ids=batch, use_cache=False).logits.float()  # (B, L, V)
            with masked(model, MaskPlan(channels, factors)):
                logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, L, V)
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            kl = (
                F.kl_div(
                    F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean"
                )
                / config.seq_len
            )
            loss = ce + config.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history.append([step + 1, round(float(ce.detach()), 5), round(float(kl.detach()), 6)])
            if progress is not None:
                progress(step + 1, config.steps, f"loss {float(loss.detach()):.4f}")  # ce + λ·kl
            elif log and ((step + 1) % 10 == 0 or step + 1 == config.steps):
                log(f"finetune step {step + 1}/{config.steps}: ce {history[-1][1]:.4f} kl {history[-1][2]:.5f}")
            if (step + 1) % config.save_every == 0:
                _save_state(checkpoint_dir, model, optimizer, config, step + 1, history)
        step = config.steps
    except KeyboardInterrupt:
        _save_state(checkpoint_dir, model, optimizer, config, history[-1][0] if history else start, history)
        raise
    _save_state(checkpoint_dir, model, optimizer, config, step, history)
    model = accelerator.unwrap_model(model)
    model.requires_grad_(False)
    model.eval()
    return {
        "steps": config.steps,
        "resumed_from": start,
        "config": asdict(config),
        "dropout_neurons": [str(r.neuron) for r in candidates],
        "final_ce": history[-1][1] if history else None,
        "final_kl": history[-1][2] if history else None,
        "history_tail": history[-10:],
    }


def _save_state(directory: Path, model, optimizer, config: FinetuneConfig, step: int, history: list) -> None:
    """Atomic: write to a temporary file in the directory, then os.replace."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": json.dumps(_resume_key(config)),
        "history": json.dumps(history),
    }
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / "state.pt")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _resume(directory: Path, model, optimizer, config: FinetuneConfig) -> tuple[int, list]:
    path = directory / "state.pt"
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if json.loads(state["config"]) != _resume_key(config) or state["step"] > config.steps:
        return 0, []  # a different run: start over (the old state is replaced at the first save)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), json.loads(state["history"])


def _resume_key(config: FinetuneConfig) -> dict:
    key = asdict(config)
    key.pop("steps")  # a resumed run may ask for more steps
    key.pop("save_every")
    return key


class FinetuneDefense:
    """`--strategy finetune`: neuron dropout over every attack's set + KL to the original, on `--data`."""

    name = "finetune"
    kind = "weights"

    def check(self, request, fp) -> None:
        FinetuneConfig(**request.finetune).validated()

    def apply(self, step):
        from achilles_guard.defenses.base import Applied

        config = FinetuneConfig(**step.request.finetune).validated()
        work = step.load(dtype="float32", device=step.request.device)
        progress = step.progress
        steps = (lambda done, total, detail: progress("harden", "finetune", done, total, detail)) if progress else None
        details = finetune(
            work.model,
            step.original.model,
            step.fp,
            work.tokenizer,
            config,
            checkpoint_dir=step.out / "finetune-state",
            log=step.log,
            progress=steps,
        )
        return Applied.saved(step, work, details, same_basis=True)


DEFENSE = FinetuneDefense()
