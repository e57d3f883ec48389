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


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every label, float32, shape (B, T-1).

    logits (B, T, V) in any dtype; input_ids (B, T) or (1, T) (labels = the inputs, shifted).
    Each row is upcast on its own so a (B, T, V) float32 copy never exists at once.
    """
    labels = input_ids[:, 1:].to(logits.device)  # (B or 1, T-1)
    rows = []
    for b in range(logits.shape[0]):
        row_labels = labels[b if labels.shape[0] > 1 else 0]
        log_probs = F.log_softmax(logits[b, :-1].float(), dim=-1)  # (T-1, V)
        rows.append(-log_probs.gather(-1, row_labels[:, None]).squeeze(-1))  # (T-1,)
    return torch.stack(rows)


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
