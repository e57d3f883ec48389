"""Re-attack a hardened model with the same scan (PCICN and the whole attack portfolio, portfolio.py)
and decide, with a number: the margin.

    v, rescan = reattack(original_model, hardened_lm, before=..., before_doc=report, ...)
    v.margin             # smallest collapsing set after / before (None: none within the budget)
    v.verdict            # "mitigated" | "not mitigated"
    v.table()            # rows of the before/after table, margin first

n0 = the smallest collapsing set any attack found on the original model (over every probe text).
A defence is `mitigated` only when all of these hold:
(a) margin = (smallest set any re-run attack finds on the hardened model) / n0 >= `min_margin`
    (default 10), or no attack collapses it within a budget of at least min_margin x n0 neurons:
    a defence that only beats PCICN is not mitigated. The re-attack searches up to
    `search_ceiling` = max(the scan's budget, SEARCH_FACTOR x min_margin x n0) neurons, not just to
    the margin it must show: every set it finds is pruned to 1-minimality, and a collapse first reached
    with 30 neurons can prune to 2 (measured on SmolLM2: a budget-10 re-attack called `redundancy`
    mitigated, a ceiling of 100 found two layer-0 neurons that still collapse it);
(b) with n0 neurons no attack reaches Δ >= ε: the top n0 of each re-run ranking, greedy's first n0
    picks, and the original critical mask where the neuron basis is unchanged;
(c) the clean cost - Δ log10 PPL of the hardened vs the original model on the probe texts and on
    held-out texts - is within `max_cost` orders of magnitude.
(Not `guard verify-checkpoint`, which compares weights with a fingerprint.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from achilles_guard.engine.masking import MaskPlan, masked
from achilles_guard.engine.neurons import Neuron
from achilles_guard.engine.perplexity import delta_log10, row_losses
from achilles_guard.engine.portfolio import KNOWN
from achilles_guard.engine.scan import ProbeText, ScanParams, ScanResult, run_scan
from achilles_guard.report.documents import json_number

__all__ = [
    "HELD_OUT_TEXTS",
    "AttackSummary",
    "AttackMargin",
    "Verification",
    "reattack",
    "original_attack_delta",
    "losses",
    "DEFAULT_MIN_MARGIN",
    "SEARCH_FACTOR",
    "search_ceiling",
    "per_attack_before",
]

DEFAULT_MIN_MARGIN = 10.0  # the hardened model must need >= 10x more neurons
SEARCH_FACTOR = 10  # the re-attack searches 10x past the margin it must show, then prunes what it finds


def search_ceiling(params: ScanParams, n0: int | None, min_margin: float = DEFAULT_MIN_MARGIN) -> int:
    """How far the re-attack's searches go: never below the scan's own budget, and SEARCH_FACTOR times the
    set size the margin needs, because a larger collapsing set is pruned to the small one inside it."""
    need = math.ceil(min_margin * n0) if n0 else 0
    return max(params.max_neurons, SEARCH_FACTOR * need)

# Held-out paragraphs written for this project; never used as probe texts by default.
HELD_OUT_TEXTS = (
    (
        "held-out-letter",
        "Dear Ms. Alvarez, thank you for your note about the garden committee. We met on "
        "Tuesday and agreed to plant the beans along the north fence, where the soil drains well, and to "
        "leave the old apple tree standing for another year.",
    ),
    (
        "held-out-manual",
        "To replace the filter, switch the unit off at the wall and wait one minute. Open "
        "the front panel by pressing both tabs, slide the used filter out, and insert the new one with the "
        "arrow pointing toward the fan. Close the panel until it clicks.",
    ),
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
        return AttackSummary(
            primary.converged,
            primary.n_star,
            result.smallest_set,
            json_number(primary.delta_log10),
            primary.max_neurons,
            ran,
            s.n if s else None,
            s.attack if s else None,
            json_number(s.delta_log10) if s else None,
        )

    @staticmethod
    def of_report(doc: dict) -> "AttackSummary":
        ran = bool(doc.get("attacks"))
        s = doc.get("strongest") if ran else None
        return AttackSummary(
            bool(doc["converged"]),
            doc.get("n_star"),
            doc.get("smallest_critical_set"),
            doc.get("delta_log10"),
            int(doc["params"]["max_neurons"]),
            ran,
            s["n"] if s else None,
            s["attack"] if s else None,
            s["delta_log10"] if s else None,
        )


@dataclass(frozen=True)
class AttackMargin:
    """One attack before and after: smallest set over the probe texts, and the best Δ with n0 neurons."""

    attack: str
    n_before: int | None  # None: no set (or not searched: a smaller set was found first, see note)
    n_after: int | None
    delta_at_n0_before: float | None  # None: not measured (the attack did not search up to n0)
    delta_at_n0_after: float | None
    note_before: str = ""
    note_after: str = ""

    def as_dict(self, n0: int | None) -> dict:
        doc = asdict(self)
        for key in ("delta_at_n0_before", "delta_at_n0_after"):
            doc[key] = json_number(doc[key]) if doc[key] is not None else None
        doc["margin"] = (self.n_after / n0) if (n0 and self.n_after) else None
        return doc


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
    n0: int | None = None  # smallest collapsing set any attack found on the original
    margin: float | None = None  # after / n0; None: no attack collapses the hardened model within the budget
    min_margin: float = DEFAULT_MIN_MARGIN
    attacks: tuple[AttackMargin, ...] = ()

    @property
    def margin_text(self) -> str:
        if self.n0 is None:
            return "n/a (the original did not collapse)"
        if self.margin is None:
            return f"none within budget ({self.after.max_neurons})"
        return f"{self.margin:g}"

    @property
    def clean_cost(self) -> float:
        return max(self.clean_cost_probe, self.clean_cost_held_out)

    def as_dict(self) -> dict:
        doc = asdict(self)
        doc["original_set"] = [{"module": n.module, "channel": n.channel} for n in self.original_set]
        doc["reasons"] = list(self.reasons)
        for key in ("original_attack_before", "original_attack_after", "clean_cost_probe", "clean_cost_held_out"):
            doc[key] = json_number(doc[key]) if doc[key] is not None else None
        doc["margin_text"] = self.margin_text
        doc["clean_cost"] = json_number(self.clean_cost)
        doc["attacks"] = [a.as_dict(self.n0) for a in self.attacks]
        doc["table"] = self.table()
        return doc

    def table(self) -> list[dict]:
        """Before/after rows (strings ready to print), the margin first."""

        def n_text(s: AttackSummary, n: int | None) -> str:
            return str(n) if s.converged and n is not None else f"not converged within {s.max_neurons}"

        def a_text(n: int | None, note: str) -> str:
            return str(n) if n is not None else (note or "none")

        label = "Δ of the original critical mask" + ("" if self.same_basis else " (same indices; basis changed)")
        rows = [
            {
                "metric": f"margin (smallest set after / before; need >= {self.min_margin:g})",
                "before": "1",
                "after": self.margin_text,
            },
            {"metric": "strongest attack: n (attack)", "before": _strong(self.before), "after": _strong(self.after)},
        ]
        for a in self.attacks:
            rows.append(
                {
                    "metric": f"{a.attack}: n",
                    "before": a_text(a.n_before, a.note_before),
                    "after": a_text(a.n_after, a.note_after),
                }
            )
            rows.append(
                {
                    "metric": f"{a.attack}: best Δ with n0 = {self.n0} neuron(s)",
                    "before": _fmt(a.delta_at_n0_before),
                    "after": _fmt(a.delta_at_n0_after),
                }
            )
        rows += [
            {
                "metric": "n* (primary probe, PCICN)",
                "before": n_text(self.before, self.before.n_star),
                "after": n_text(self.after, self.after.n_star),
            },
            {"metric": label, "before": _fmt(self.original_attack_before), "after": _fmt(self.original_attack_after)},
            {
                "metric": "clean cost, probe texts (Δ log10 PPL)",
                "before": "0.000",
                "after": _fmt(self.clean_cost_probe),
            },
            {
                "metric": "clean cost, held-out texts (Δ log10 PPL)",
                "before": "0.000",
                "after": _fmt(self.clean_cost_held_out),
            },
        ]
        return rows


def per_attack_before(doc: dict, n0: int | None) -> dict[str, tuple[int | None, float | None, str]]:
    """From a scan report: attack -> (smallest n over texts, best Δ with n0 neurons, note)."""
    texts = doc.get("texts") or [{"attacks": doc.get("attacks", [])}]
    out: dict[str, list] = {}
    for text in texts:
        for a in text.get("attacks", []):
            n, best, note = out.get(a["attack"], [None, None, ""])
            if a.get("converged") and a.get("n") is not None:
                n = a["n"] if n is None else min(n, a["n"])
            d = _delta_at(
                n0,
                a.get("n") if a.get("converged") else None,
                a.get("delta_log10"),
                [(c["n"], c["delta_log10"]) for c in a.get("curve", [])],
            )
            best = d if best is None else (best if d is None else max(best, d))
            out[a["attack"]] = [n, best, note or a.get("note", "")]
    found = [v for v in out.values() if v[0] is not None]
    if found and KNOWN not in out:  # the known attack re-tries the scan's own sets: on the original, its best
        n = min(v[0] for v in found)
        best = max((v[1] for v in found if v[1] is not None), default=None)
        out[KNOWN] = [n, best, "the scan's own sets"]
    return {k: tuple(v) for k, v in out.items()}


def losses(model, id_list: list[torch.Tensor]) -> list[float]:
    """Clean mean next-token NLL (nats) of `model` on each (1, T) text."""
    out = []
    with torch.no_grad():
        for ids in id_list:
            out.append(float(row_losses(model(input_ids=ids, use_cache=False).logits, ids)[0]))
    return out


def original_attack_delta(
    model, input_ids: torch.Tensor, neurons: tuple[Neuron, ...], *, scale: float = 0.0
) -> float | None:
    """Δ log10 PPL of masking `neurons` (the shared masking mechanism) vs the same model clean."""
    if not neurons:
        return None
    clean = losses(model, [input_ids])[0]
    with torch.no_grad(), masked(model, MaskPlan.fixed(neurons, scale)):
        attacked = losses(model, [input_ids])[0]
    return delta_log10(attacked, clean)


def reattack(
    original_model,
    hardened_lm,
    *,
    strategy: str,
    before: AttackSummary,
    before_doc: dict | None = None,
    original_set: tuple[Neuron, ...],
    probes: list[ProbeText],
    held_out: list[tuple[torch.Tensor, torch.Tensor]],
    params: ScanParams,
    same_basis: bool,
    max_cost: float = 0.01,
    min_margin: float = DEFAULT_MIN_MARGIN,
    progress=None,
    demote: tuple[Neuron, ...] = (),
    known_sets: tuple[tuple[Neuron, ...], ...] = (),
) -> tuple[Verification, ScanResult]:
    """Re-run the scan (PCICN and the portfolio) on `hardened_lm` and decide (see module docstring).

    `held_out` pairs the same text tokenized for the original and the hardened model (1, T) each;
    `before_doc` is the original scan's report (per-attack numbers before); `demote`: the neurons a runtime
    guard restores, ranked last by every attack (the strongest attacker knows what is guarded); `known_sets`:
    sets that collapse the original (or an earlier step), re-tried with every copy of their neurons.
    """
    hardened = hardened_lm.model
    n0 = before.best_n
    params = replace(params, max_neurons=search_ceiling(params, n0, min_margin))
    result = run_scan(
        hardened_lm, probes, params, progress=progress, demote=demote, known_sets=known_sets, copy_aware=True
    )
    after = AttackSummary.of(result)
    primary_ids = probes[0].input_ids
    existing = _existing(hardened, original_set)
    attack_before = original_attack_delta(
        original_model, primary_ids.to(_device(original_model)), original_set, scale=params.mask_scale
    )
    attack_after = original_attack_delta(hardened, primary_ids, existing, scale=params.mask_scale) if existing else None
    orig_probe = losses(original_model, [p.input_ids.to(_device(original_model)) for p in probes])
    hard_probe = losses(hardened, [p.input_ids for p in probes])
    orig_held = losses(original_model, [o for o, _ in held_out])
    hard_held = losses(hardened, [h for _, h in held_out])
    cost_probe = max(delta_log10(h, o) for h, o in zip(hard_probe, orig_probe))
    cost_held = max((delta_log10(h, o) for h, o in zip(hard_held, orig_held)), default=0.0)

    attacks = _per_attack(result, per_attack_before(before_doc, n0) if before_doc else {}, n0, params)
    after_n = after.best_n
    margin = (after_n / n0) if (n0 and after_n) else None

    reasons = []
    eps = params.epsilon
    attack = "the re-run attack portfolio" if after.portfolio else "re-run PCICN"
    if n0 is None:
        reasons.append("the original model had no critical set within the budget: nothing to mitigate")
        margin_ok = False
    elif after_n is None:
        margin_ok = after.max_neurons >= min_margin * n0
        reasons.append(
            f"{attack} does not collapse the hardened model within {after.max_neurons} neurons"
            + (
                ""
                if margin_ok
                else f": a budget below {min_margin:g} x n0 = {min_margin * n0:g} cannot show the margin"
            )
        )
    else:
        margin_ok = margin >= min_margin
        how = (
            f"{after.strongest_attack} attack, Δ = {_fmt(after.strongest_delta)}"
            if after.portfolio
            else f"Δ = {_fmt(after.delta_log10)}"
        )
        reasons.append(
            f"margin {margin:g} ({attack} collapses the hardened model with {after_n} neurons, {how}; "
            f"{n0} before) " + (">=" if margin_ok else "<") + f" --min-margin {min_margin:g}"
        )
    reach = [(a.attack, a.delta_at_n0_after) for a in attacks if a.delta_at_n0_after is not None]
    if same_basis and attack_after is not None:
        reach.append(("original critical mask", attack_after))
    over = [(name, d) for name, d in reach if not d < eps]
    n0_ok = n0 is not None and not over
    if n0 is not None:
        reasons.append(
            f"with n0 = {n0} neuron(s): "
            + (
                ", ".join(f"{name} reaches Δ = {_fmt(d)} >= ε" for name, d in over)
                if over
                else f"no attack reaches ε = {eps} (best Δ {_fmt(max((d for _, d in reach), default=None))})"
            )
        )
    if not same_basis:
        reasons.append("the neuron basis changed: the original mask is reported for information only")
    cost_ok = max(cost_probe, cost_held) <= max_cost
    reasons.append(
        f"clean cost {_fmt(max(cost_probe, cost_held))} orders of magnitude "
        + ("<=" if cost_ok else ">")
        + f" --max-cost {max_cost}"
    )
    verdict = "mitigated" if (margin_ok and n0_ok and cost_ok) else "not mitigated"
    v = Verification(
        strategy,
        before,
        after,
        tuple(original_set),
        same_basis,
        attack_before,
        attack_after,
        cost_probe,
        cost_held,
        max_cost,
        eps,
        verdict,
        tuple(reasons),
        n0,
        margin,
        min_margin,
        tuple(attacks),
    )
    return v, result


def _per_attack(result: ScanResult, before: dict, n0: int | None, params: ScanParams) -> list[AttackMargin]:
    """Every attack's numbers after (from the re-scan; Δ with n0 neurons re-measured) next to before."""
    names = list(
        dict.fromkeys([*before, *(a.attack for t in result.texts if t.portfolio for a in t.portfolio.attacks)])
    )
    out = []
    for name in names:
        n_after, best, note = None, None, ""
        for t in result.texts:
            a = next((x for x in (t.portfolio.attacks if t.portfolio else ()) if x.attack == name), None)
            if a is None:
                continue
            if a.converged and a.n is not None:
                n_after = a.n if n_after is None else min(n_after, a.n)
            note = note or a.note
            d = _delta_at(n0, a.n if a.converged else None, a.delta_log10, a.curve)  # its own set or curve
            if n0 and name in t.portfolio.rankings and name != "greedy":  # and the top n0 of its ranking, measured
                top = _top_delta(result.lm.model, t.probe.input_ids, t.portfolio.rankings[name], n0, params.mask_scale)
                d = top if d is None else max(d, top)
            best = d if best is None else (best if d is None else max(best, d))
        n_before, d_before, note_before = before.get(name, (None, None, ""))
        out.append(AttackMargin(name, n_before, n_after, d_before, best, note_before, note))
    return out


def _delta_at(n0: int | None, n: int | None, delta: float | None, curve) -> float | None:
    """Best Δ an attack reached with at most n0 neurons: its set if it is that small, else its curve."""
    if not n0:
        return None
    if n is not None and n <= n0 and delta is not None:
        return float(delta)
    seen = [float(d) for k, d in curve if k <= n0 and d is not None]
    return max(seen) if seen else None


def _top_delta(model, input_ids: torch.Tensor, ranking, n: int, scale: float) -> float:
    return original_attack_delta(model, input_ids, tuple(ranking.top(n)), scale=scale)


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
