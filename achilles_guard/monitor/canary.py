"""The canary: run the fingerprint's probe text through the live model and compare its loss.

Δ = (loss − baseline loss) / ln 10, in orders of magnitude of perplexity, exactly the scan's Δ.
The canary fails when Δ reaches the scan's collapse threshold ε (default 1).

    canary = Canary(model, tokenizer, fingerprint)
    canary.run()                      # CanaryResult(delta_log10, loss, ok, seconds)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from achilles_guard.engine.pcicn import clean_loss
from achilles_guard.engine.perplexity import LN10
from achilles_guard.errors import InputError

__all__ = ["Canary", "CanaryResult"]


@dataclass(frozen=True)
class CanaryResult:
    delta_log10: float  # +inf when the loss is not finite (a collapsed model)
    loss: float
    ok: bool
    seconds: float


class Canary:
    """The first probe text of the fingerprint, tokenized once, with its baseline loss."""

    def __init__(self, model, tokenizer, fingerprint, *, threshold: float | None = None):
        if not fingerprint.probe_texts:
            raise InputError(f"fingerprint {fingerprint.path}: it stores no probe text, so no canary can run")
        ids = tokenizer(fingerprint.probe_texts[0], return_tensors="pt")["input_ids"]  # (1, T)
        if ids.shape[1] < 2:
            raise InputError(
                f"fingerprint {fingerprint.path}: its probe text tokenizes to {ids.shape[1]} token(s) here; wrong "
                "tokenizer?"
            )
        self.model = model
        self.input_ids = ids.to(model.get_input_embeddings().weight.device)
        self.baseline_loss = fingerprint.baseline_loss
        self.threshold = float(threshold if threshold is not None else fingerprint.scan_params.get("epsilon", 1.0))

    def run(self) -> CanaryResult:
        t0 = time.perf_counter()
        loss = clean_loss(self.model, self.input_ids)
        delta = (loss - self.baseline_loss) / LN10 if math.isfinite(loss) else math.inf
        return CanaryResult(delta, loss, delta < self.threshold, time.perf_counter() - t0)
