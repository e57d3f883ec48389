"""Greedy answers and top-k next-token probabilities with neurons masked (`guard generate`, paper
Tables 7-9 and Fig. 1).

    greedy(lm, "The capital of France is", MaskPlan.fixed(critical_set, 0.0), max_new_tokens=20)
    topk_levels(lm, prompt, ReportRanking.load(path), [0, 1, 2, 3], k=5, scale=0.0)
"""

from __future__ import annotations

import torch

from achilles_guard.engine.masking import masked
from achilles_guard.errors import TextError

__all__ = ["greedy", "topk_levels"]


def greedy(lm, prompt: str, plan, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (None plan: the clean model)."""
    ids = _encode(lm, prompt)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id,
    )
    with torch.no_grad():
        if plan is None:
            out = lm.model.generate(input_ids=ids, **kwargs)
        else:
            with masked(lm.model, plan):
                out = lm.model.generate(input_ids=ids, **kwargs)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def topk_levels(lm, prompt: str, ranked, levels: list[int], k: int, scale: float) -> list[dict]:
    """Top-k next-token probabilities for each level, in one forward (row b masks the top levels[b])."""
    ids = _encode(lm, prompt)
    batch = ids.expand(len(levels), -1)  # (R, T)
    with torch.no_grad(), masked(lm.model, ranked.plan(levels, scale)):
        logits = lm.model(input_ids=batch, use_cache=False).logits[:, -1].float()  # (R, V)
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (R, k)
    return [
        {"n": n, "top": [{"token": lm.tokenizer.decode([i]), "id": i, "prob": p} for i, p in zip(ti, tp)]}
        for n, ti, tp in zip(levels, top_i.tolist(), top_p.tolist())
    ]


def _encode(lm, prompt: str) -> torch.Tensor:
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise TextError(f"prompt {prompt[:40]!r} tokenizes to nothing with this model's tokenizer")
    return ids.to(lm.input_device)
