"""Next-token loss in log space.

Everything stays a mean negative log-likelihood in nats (`loss`); perplexity is only ever reported
as `log10 PPL = loss / ln 10`, and Δ as a difference of losses, so a collapse of 10^35 is a number
like 80.6, never an overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LN10", "token_nll", "row_losses", "delta_log10", "log10_ppl"]

LN10 = math.log(10.0)
UPCAST_BYTES = 256 << 20  # the largest float32 copy of logits token_nll makes at once


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every label, float32, shape (B, T-1).

    logits (B, T, V) in any dtype; input_ids (B, T) or (1, T) (labels = the inputs, shifted).
    Rows are upcast in chunks of at most UPCAST_BYTES, so a (B, T, V) float32 copy of a large batch never
    exists at once; log_softmax works on each (position) vector alone, so the chunking does not change a bit
    (tests/test_pcicn.py checks it against one row at a time).
    """
    B, T, V = logits.shape
    labels = input_ids[:, 1:].to(logits.device).expand(B, -1)  # (B, T-1)
    per = max(1, UPCAST_BYTES // max(1, (T - 1) * V * 4))  # rows per chunk: a bounded float32 copy
    parts = []
    for start in range(0, B, per):  # one chunk for every batch guard runs but the largest vocabularies
        log_probs = F.log_softmax(logits[start : start + per, :-1].float(), dim=-1)  # (b, T-1, V)
        parts.append(-log_probs.gather(-1, labels[start : start + per, :, None]).squeeze(-1))  # (b, T-1)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each row (nats), float32, shape (B,)."""
    return token_nll(logits, input_ids).mean(dim=1).cpu()


def delta_log10(masked_loss: float, clean_loss: float) -> float:
    """Δ = log10(PPL_masked / PPL_clean), from losses in nats; +inf when the masked loss is not finite."""
    if not math.isfinite(masked_loss):
        return math.inf
    return (masked_loss - clean_loss) / LN10


def log10_ppl(loss: float) -> float:
    return loss / LN10 if math.isfinite(loss) else math.inf
