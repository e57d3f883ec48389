"""Verification, always: re-attack a hardened model with the same scan (PCICN and the whole attack
portfolio, portfolio.py) and measure.

    v = verify(original_lm, hardened_lm, fp, before_report, probes, held_out, params,
               same_basis=True, max_cost=0.01)
    v.verdict            # "mitigated" | "not mitigated"
    v.table()            # rows of the before/after table

A defence counts as `mitigated` only when (a) no attack of the re-run portfolio (the strongest one,
`ScanResult.strongest`; PCICN alone for reports made before the portfolio) collapses the hardened
model within the budget, or the strongest needs >= 10x more neurons than before: a defence that
only beats PCICN is not mitigated, (b) the original
critical mask, re-applied where the neuron basis is unchanged, no longer reaches Δ >= epsilon, and
(c) the clean cost - Δ log10 PPL of the hardened vs the original model on the probe texts and on
held-out texts - is within `max_cost` orders of magnitude.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from achilles_guard.masking import MaskPlan, masked
from achilles_guard.neurons import Neuron
from achilles_guard.perplexity import delta_log10, row_losses
from achilles_guard.report import json_number
from achilles_guard.scan import ProbeText, ScanParams, ScanResult, run_scan

__all__ = ["HELD_OUT_TEXTS", "AttackSummary", "Verification", "verify", "original_attack_delta", "losses", "HARDER_FACTOR"]

HARDER_FACTOR = 10  # "needs >= 10x more neurons" counts as mitigated

# Held-out paragraphs written for this project; never used as probe texts by default.
HELD_OUT_TEXTS = (
    ("held-out-letter", "Dear Ms. Alvarez, thank you for your note about the garden committee. We met on "
     "Tuesday and agreed to plant the beans along the north fence, where the soil drains well, and to "
     "leave the old apple tree standing for another year."),
    ("held-out-manual", "To replace the filter, switch the unit off at the wall and wait one minute. Open "
     "the front panel by pressing both tabs, slide the used filter out, and insert the new one with the "
     "arrow pointing toward the fan. Close the panel until it clicks."),
)


@dataclass(frozen=True)
class AttackSummary:
    """What one PCICN scan found, in numbers."""

    converged: bool
    n_star: int | None  # primary text
    smallest_set: int | None  # over all probe texts
    delta_log10: float | None
    max_neurons: int
    portfolio: bool = False  # the portfolio ran: strongest_* below are what counts
    strongest_n: int | None = None
    strongest_attack: str | None = None
    strongest_delta: float | None = None

    @property
    def collapsed(self) -> bool:
        return self.strongest_n is not None if self.portfolio else self.converged

    @property
    def best_n(self) -> int | None:
        """Size of the strongest attack's set (PCICN's n* without a portfolio); None: no collapse."""
        return self.strongest_n if self.portfolio else (self.n_star if self.converged else None)

    @staticmethod
    def of(result: ScanResult) -> "AttackSummary":
        primary = result.primary.result
        s = result.strongest
        ran = any(t.portfolio is not None for t in result.texts)
        return AttackSummary(primary.converged, primary.n_star, result.smallest_set,
                             json_number(primary.delta_log10), primary.max_neurons, ran,
                             s.n if s else None, s.attack if s else None, json_number(s.delta_log10) if s else None)

    @staticmethod
    def of_report(doc: dict) -> "AttackSummary":
        ran = bool(doc.get("attacks"))
        s = doc.get("strongest") if ran else None
        return AttackSummary(bool(doc["converged"]), doc.get("n_star"), doc.get("smallest_critical_set"),
                             doc.get("delta_log10"), int(doc["params"]["max_neurons"]), ran,
                             s["n"] if s else None, s["attack"] if s else None, s["delta_log10"] if s else None)


@dataclass(frozen=True)
class Verification:
    strategy: str
    before: AttackSummary
    after: AttackSummary
    original_set: tuple[Neuron, ...]
    same_basis: bool
    original_attack_before: float | None  # Δ of the original critical mask on the original model
    original_attack_after: float | None  # ... on the hardened model (same module/channel names)
    clean_cost_probe: float  # max over probe texts of Δ log10 PPL, hardened vs original
    clean_cost_held_out: float
    max_cost: float
    epsilon: float
    verdict: str
    reasons: tuple[str, ...]

    def as_dict(self) -> dict:
        doc = asdict(self)
        doc["original_set"] = [{"module": n.module, "channel": n.channel} for n in self.original_set]
        doc["reasons"] = list(self.reasons)
        for key in ("original_attack_before", "original_attack_after", "clean_cost_probe", "clean_cost_held_out"):
            doc[key] = json_number(doc[key]) if doc[key] is not None else None
        doc["table"] = self.table()
        return doc

    def table(self) -> list[dict]:
        """Before/after rows (strings ready to print)."""
        def n_text(s: AttackSummary, n: int | None) -> str:
            return str(n) if s.converged and n is not None else f"not converged within {s.max_neurons}"

        def d_text(x: float | None) -> str:
            return "n/a" if x is None else ("inf" if not math.isfinite(x) else f"{x:.3f}")

        label = "Δ of the original critical mask" + ("" if self.same_basis else " (same indices; basis changed)")
        return [
            {"metric": "n* (primary probe)", "before": n_text(self.before, self.before.n_star), "after": n_text(self.after, self.after.n_star)},
            {"metric": "smallest set over probes", "before": n_text(self.before, self.before.smallest_set), "after": n_text(self.after, self.after.smallest_set)},
            {"metric": "strongest attack: n (attack)", "before": _strong(self.before), "after": _strong(self.after)},
            {"metric": "Δ log10 PPL at n* (or last n)", "before": d_text(self.before.delta_log10), "after": d_text(self.after.delta_log10)},
            {"metric": label, "before": d_text(self.original_attack_before), "after": d_text(self.original_attack_after)},
            {"metric": "clean cost, probe texts (Δ log10 PPL)", "before": "0.000", "after": d_text(self.clean_cost_probe)},
            {"metric": "clean cost, held-out texts (Δ log10 PPL)", "before": "0.000", "after": d_text(self.clean_cost_held_out)},
        ]


def losses(model, id_list: list[torch.Tensor]) -> list[float]:
    """Clean mean next-token NLL (nats) of `model` on each (1, T) text."""
    out = []
    with torch.no_grad():
        for ids in id_list:
            out.append(float(row_losses(model(input_ids=ids, use_cache=False).logits, ids)[0]))
    return out


def original_attack_delta(model, input_ids: torch.Tensor, neurons: tuple[Neuron, ...], *, scale: float = 0.0) -> float | None:
    """Δ log10 PPL of masking `neurons` (the shared masking mechanism) vs the same model clean."""
    if not neurons:
        return None
    clean = losses(model, [input_ids])[0]
    with torch.no_grad(), masked(model, MaskPlan.fixed(neurons, scale)):
        attacked = losses(model, [input_ids])[0]
    return delta_log10(attacked, clean)


def verify(
    original_model,
    hardened_lm,
    *,
    strategy: str,
    before: AttackSummary,
    original_set: tuple[Neuron, ...],
    probes: list[ProbeText],
    held_out: list[tuple[torch.Tensor, torch.Tensor]],
    params: ScanParams,
    same_basis: bool,
    max_cost: float = 0.01,
    progress=None,
) -> tuple[Verification, ScanResult]:
    """Re-run PCICN on `hardened_lm` and decide (see module docstring).

    `held_out` pairs the same text tokenized for the original and the hardened model (1, T) each.
    """
    hardened = hardened_lm.model
    result = run_scan(hardened_lm, probes, params, progress=progress)
    after = AttackSummary.of(result)
    primary_ids = probes[0].input_ids
    existing = _existing(hardened, original_set)
    attack_before = original_attack_delta(original_model, primary_ids.to(_device(original_model)), original_set, scale=params.mask_scale)
    attack_after = original_attack_delta(hardened, primary_ids, existing, scale=params.mask_scale) if existing else None
    orig_probe = losses(original_model, [p.input_ids.to(_device(original_model)) for p in probes])
    hard_probe = losses(hardened, [p.input_ids for p in probes])
    orig_held = losses(original_model, [o for o, _ in held_out])
    hard_held = losses(hardened, [h for _, h in held_out])
    cost_probe = max(delta_log10(h, o) for h, o in zip(hard_probe, orig_probe))
    cost_held = max((delta_log10(h, o) for h, o in zip(hard_held, orig_held)), default=0.0)

    reasons = []
    eps = params.epsilon
    attack = "the re-run attack portfolio" if after.portfolio else "re-run PCICN"
    before_n, after_n = before.best_n, after.best_n
    if before_n is None:
        reasons.append("the original model had no critical set within the budget: nothing to mitigate")
    if after_n is None:
        reasons.append(f"{attack} does not collapse the hardened model within {after.max_neurons} neurons")
        search_ok = True
    elif before_n and after_n >= HARDER_FACTOR * before_n:
        reasons.append(f"{attack} needs {after_n} neurons, >= {HARDER_FACTOR}x the {before_n} before")
        search_ok = True
    else:
        how = (f"{after.strongest_attack} attack, Δ = {_fmt(after.strongest_delta)}" if after.portfolio
               else f"Δ = {_fmt(after.delta_log10)}")
        reasons.append(f"{attack} still collapses the hardened model with {after_n} neurons ({how})")
        search_ok = False
    mask_ok = True
    if same_basis and attack_after is not None:
        mask_ok = not (attack_after >= eps)
        reasons.append(f"the original critical mask gives Δ = {_fmt(attack_after)} on the hardened model "
                       + ("(< ε)" if mask_ok else f"(>= ε = {eps})"))
    elif not same_basis:
        reasons.append("the neuron basis changed: the original mask is reported for information only")
    cost_ok = max(cost_probe, cost_held) <= max_cost
    reasons.append(f"clean cost {_fmt(max(cost_probe, cost_held))} orders of magnitude "
                   + ("<=" if cost_ok else ">") + f" --max-cost {max_cost}")
    verdict = "mitigated" if (search_ok and mask_ok and cost_ok) else "not mitigated"
    v = Verification(strategy, before, after, tuple(original_set), same_basis, attack_before, attack_after,
                     cost_probe, cost_held, max_cost, eps, verdict, tuple(reasons))
    return v, result


def _existing(model, neurons: tuple[Neuron, ...]) -> tuple[Neuron, ...]:
    names = dict(model.named_modules())
    return tuple(n for n in neurons if n.module in names)


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _strong(s: AttackSummary) -> str:
    if not s.portfolio:
        return "n/a (PCICN only)"
    if s.strongest_n is None:
        return f"none within {s.max_neurons}"
    return f"{s.strongest_n} ({s.strongest_attack}, Δ = {_fmt(s.strongest_delta)})"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else ("inf" if not math.isfinite(x) else f"{x:.3f}")
