"""A small completion loop (greedy by default) with a KV cache; one forward per generated token.

    result = complete(model, prompt_ids, max_new_tokens=16, temperature=0.0, eos_token_id=0)
    result.token_ids, result.finish_reason      # "length" or "stop"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

__all__ = ["Completion", "complete"]


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # generated tokens, the stop token included when one ended it
    finish_reason: str  # "length" | "stop"
    forwards: int


def complete(model, prompt_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, seed: int | None = None) -> Completion:
    """Generate up to `max_new_tokens` after `prompt_ids` (1, T); sample when temperature > 0."""
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=prompt_ids.device)
        generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    tokens: list[int] = []
    key = cache_argument(model)
    past = None
    step_ids = prompt_ids  # (1, T) on the first forward, then (1, 1)
    finish = "length"
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, use_cache=True, **{key: past})
            past = out.get(key)
            logits = out.logits[:, -1, :].float()  # (1, V)
            if generator is None:
                next_id = logits.argmax(-1)  # (1,)
            else:
                probs = torch.softmax(logits / temperature, dim=-1).nan_to_num(0.0)
                if float(probs.sum()) <= 0:  # a collapsed model: nothing finite to sample from
                    next_id = logits.nan_to_num(0.0).argmax(-1)
                else:
                    next_id = torch.multinomial(probs, 1, generator=generator)[:, 0]
            token = int(next_id)
            tokens.append(token)
            if eos_token_id is not None and token == eos_token_id:
                finish = "stop"
                break
            step_ids = next_id[:, None]  # (1, 1)
    return Completion(tuple(tokens), finish, len(tokens))


def cache_argument(model) -> str:
    """The forward's KV-cache argument (and output field): `cache` from transformers 5.x (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
