"""`guard harden` as a library: apply each defence step, re-attack with the whole portfolio, decide.

    outcome = harden(HardenRequest(model_dir, fp_path, report_path, "redundancy", out_dir))
    outcome.verdict, outcome.attempts[0].verification.margin

Every defence implements one interface (defenses/base.py: `check`, `apply(step) -> Applied`), so
the loop below reads: for each step, apply -> re-attack (reattack.py) -> margin and verdict. A
strategy is one defence (`pin`, `redundancy`, `heads`, `rotate`, `split`, `finetune`), a chain `a+b` (each
step hardens the previous step's checkpoint, planned from the previous step's re-scan; a runtime
guard only last), or `auto`: candidates from cheapest to most expensive, stopping at the first
mitigated one; the report says what it tried and why it stopped.

Layout of OUT for one strategy: `model/` (hardened HF directory; none for a runtime guard),
`report.json` (re-scan of the hardened model), `fingerprint.safetensors` (of the hardened model),
`harden-report.json` (margin, per-attack numbers, verdict). A chain writes one such set per step
under `OUT/<step>/`; `auto` one per candidate under `OUT/<candidate>/`, and one `OUT/harden-report.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from achilles_guard import __version__
from achilles_guard.defenses import finetune, heads, pin, redundancy, rotate, split
from achilles_guard.defenses.base import Step
from achilles_guard.defenses.reattack import DEFAULT_MIN_MARGIN, HELD_OUT_TEXTS, AttackSummary, Verification, reattack
from achilles_guard.engine.neurons import Neuron
from achilles_guard.engine.scan import ScanParams, tokenize_probe
from achilles_guard.errors import InputError, UsageError
from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint, write_fingerprint
from achilles_guard.report.documents import SCAN_SCHEMA, read_document, scan_report, write_json

__all__ = [
    "DEFENSES",
    "STRATEGIES",
    "HardenRequest",
    "Attempt",
    "HardenOutcome",
    "harden",
    "auto_order",
    "parse_strategy",
]

# cheapest first: auto's order
DEFENSES = {
    d.name: d
    for d in (pin.DEFENSE, redundancy.DEFENSE, heads.DEFENSE, split.DEFENSE, rotate.DEFENSE, finetune.DEFENSE)
}
STRATEGIES = (*DEFENSES, "auto")
HARDEN_SCHEMA = "achilles-guard/harden/v2"


@dataclass(frozen=True)
class HardenRequest:
    model_dir: Path
    fingerprint: Path
    report: Path | None
    strategy: str
    out: Path
    copies: int = 8
    seed: int = 0
    rotation: str = "auto"
    max_cost: float = 0.01
    dtype: str = "auto"
    device: str = "auto"
    held_out: tuple[tuple[str, str], ...] = HELD_OUT_TEXTS
    finetune: dict = field(default_factory=dict)  # FinetuneConfig fields
    allow_short: bool = True
    min_margin: float = DEFAULT_MIN_MARGIN
    redundancy_copies: int = 32
    redundancy_wide: int = 0
    known_sets: tuple[Path, ...] = ()  # scan reports whose collapsing sets every re-attack re-tries
    head_copies: int = 32


@dataclass(frozen=True)
class Attempt:
    strategy: str  # a defence, or a chain "a+b"
    out: Path
    verification: Verification  # of the last step
    details: dict  # per step
    seconds: float
    hardened_model: Path | None = None  # the last checkpoint written (None: runtime guard only)
    steps: tuple[dict, ...] = ()  # every step's verdict, margin and seconds


@dataclass(frozen=True)
class HardenOutcome:
    request: HardenRequest
    attempts: tuple[Attempt, ...]
    stopped: str = ""

    @property
    def best(self) -> Attempt:
        good = [a for a in self.attempts if a.verification.verdict == "mitigated"]
        return good[0] if good else self.attempts[-1]

    @property
    def verdict(self) -> str:
        return self.best.verification.verdict

    def as_dict(self) -> dict:
        r = self.request
        return {
            "schema": HARDEN_SCHEMA,
            "tool": {"name": "achilles-guard", "version": __version__},
            "model": str(r.model_dir),
            "fingerprint": str(r.fingerprint),
            "strategy": r.strategy,
            "max_cost": r.max_cost,
            "min_margin": r.min_margin,
            "verdict": self.verdict,
            "chosen": self.best.strategy,
            "margin": self.best.verification.margin,
            "tried": [
                f"{a.strategy}: {a.verification.verdict} (margin {a.verification.margin_text}, "
                f"clean cost {a.verification.clean_cost:.4f})"
                for a in self.attempts
            ],
            "stopped": self.stopped,
            "attempts": [_attempt_dict(a, r.out) for a in self.attempts],
        }


def _attempt_dict(a: Attempt, root: Path) -> dict:
    doc = {
        "strategy": a.strategy,
        "out": str(a.out),
        "seconds": round(a.seconds, 3),
        "details": a.details,
        "steps": list(a.steps),
        **a.verification.as_dict(),
    }
    if a.hardened_model is not None:
        doc["hardened_model"] = str(a.hardened_model.relative_to(root))
    return doc


def parse_strategy(spec: str) -> list[str]:
    """`a` or `a+b+...` -> the defence names; UsageError for unknown names or a runtime guard not last."""
    steps = [s.strip() for s in spec.split("+")]
    for name in steps:
        if name not in DEFENSES:
            raise UsageError(f"--strategy {spec!r}: use one of {', '.join(STRATEGIES)}, or a chain like redundancy+pin")
    if any(DEFENSES[n].kind == "runtime" for n in steps[:-1]):
        raise UsageError(f"--strategy {spec!r}: a runtime guard (pin) can only be the last step of a chain")
    return steps


def auto_order(fp, request: HardenRequest | None = None) -> list[str]:
    """Candidates `auto` tries, cheapest first: the runtime guard, then one-shot weight edits that fit the
    family and the sets, then the chain of the two, then fine-tuning (only with --data)."""
    paper_units = {r.component for r in fp.neurons if (r.critical or r.attacks)} & {"mlp_act", "mlp_gate", "mlp_up"}
    order = ["pin"]
    if fp.model_type in redundancy.REDUNDANT:
        order.append("redundancy")
    elif paper_units and fp.model_type in split.SPLITTABLE:
        order.append("split")
    if fp.model_type in rotate.ROTATABLE:
        order.append("rotate")
    if fp.model_type in redundancy.REDUNDANT:
        order.append("redundancy+pin")
    if fp.model_type in heads.DUPLICABLE and any(r.component == "attn_in" for r in fp.neurons):
        order.append("redundancy+heads")
    if request is not None and request.finetune.get("data"):
        order.append("finetune")
    return order


def harden(req: HardenRequest, *, progress=None, log=None) -> HardenOutcome:
    """Run the requested strategy (or `auto`'s candidates) and verify each step by re-attack.

    `progress(name, stage, done, total, detail="")` (cli.common.progress_bar's update): stages
    "finetune" (detail: the loss), then the re-attack's "rank" and "search".
    """
    if req.strategy != "auto":
        parse_strategy(req.strategy)
    if req.max_cost < 0:
        raise UsageError(f"--max-cost must be >= 0 (got {req.max_cost})")
    if req.min_margin < 1:
        raise UsageError(f"--min-margin must be >= 1 (got {req.min_margin})")
    if req.out.resolve() == req.model_dir.resolve() or req.model_dir.resolve() in req.out.resolve().parents:
        raise UsageError(
            f"--out {req.out} is (inside) the model directory; guard never writes in place: choose a new directory"
        )
    fp = load_fingerprint(req.fingerprint)
    report_path = req.report or req.fingerprint.parent / "report.json"
    doc = read_document(
        report_path,
        schema=SCAN_SCHEMA,
        option="scan report",
        hint="; give --report, or keep report.json next to the fingerprint",
    )
    try:
        before = AttackSummary.of_report(doc)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"scan report {report_path}: incomplete ({type(err).__name__}: {err})") from None
    known = collapsing_sets(doc, str(report_path))
    for path in req.known_sets:
        known += collapsing_sets(read_document(path, schema=SCAN_SCHEMA, option="--known-sets"), str(path))
    known = tuple(dict.fromkeys(known))
    candidates = auto_order(fp, req) if req.strategy == "auto" else [req.strategy]
    for candidate in candidates:
        for name in parse_strategy(candidate):
            DEFENSES[name].check(req, fp)
    original = load_model(req.model_dir, dtype=req.dtype, device=req.device)
    if original.config_sha256 != fp.config_sha256:
        raise InputError(
            f"fingerprint {req.fingerprint} was made for another model (config sha256 differs from {req.model_dir})"
        )
    params = ScanParams(**fp.scan_params).validated()
    attempts = []
    for candidate in candidates:
        out = req.out / candidate if req.strategy == "auto" else req.out
        attempt = _attempt(candidate, out, req, fp, original, before, doc, params, log, progress, known)
        attempts.append(attempt)
        if req.strategy == "auto":
            write_json(out / "harden-report.json", HardenOutcome(req, (attempt,)).as_dict())
        if attempt.verification.verdict == "mitigated":
            break
    stopped = _why_auto_stopped(attempts) if req.strategy == "auto" else ""  # one strategy: its verdict says why
    outcome = HardenOutcome(req, tuple(attempts), stopped)
    write_json(req.out / "harden-report.json", outcome.as_dict())
    return outcome


def collapsing_sets(doc: dict, where: str) -> tuple[tuple[Neuron, ...], ...]:
    """Every set a scan report says collapses its model (each text's converged attacks, PCICN included)."""
    try:
        found = []
        for text in doc.get("texts", []):
            for a in [{"converged": text.get("converged"), "critical_set": text.get("critical_set")},
                      *text.get("attacks", [])]:
                if a.get("converged") and a.get("critical_set"):
                    found.append(tuple(Neuron(str(x["module"]), int(x["channel"])) for x in a["critical_set"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"scan report {where}: a critical set is malformed ({type(err).__name__}: {err})") from None
    return tuple(dict.fromkeys(found))


def _why_auto_stopped(attempts: list) -> str:
    last = attempts[-1]
    if last.verification.verdict == "mitigated":
        return f"{last.strategy} is mitigated (margin {last.verification.margin_text}): cheaper candidates came first"
    return "nothing left to try: " + "; ".join(f"{a.strategy}: {a.verification.reasons[0]}" for a in attempts)


def _found(result) -> tuple[tuple[Neuron, ...], ...]:
    return tuple(
        tuple(a.critical_set)
        for t in result.texts
        for a in (t.portfolio.attacks if t.portfolio else ())
        if a.converged and a.critical_set
    )


def _step_labels(names: list[str]) -> list[str]:
    """A directory / details key per step: the defence's name, `name-2`, `name-3`, ... when a chain repeats
    it (so `redundancy+redundancy` keeps both steps' checkpoints and re-scans)."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return labels


def _attempt(
    candidate: str,
    out: Path,
    req: HardenRequest,
    fp,
    original,
    before: AttackSummary,
    doc: dict,
    params: ScanParams,
    log,
    progress,
    known: tuple[tuple[Neuron, ...], ...] = (),
) -> Attempt:
    """Apply each step of `candidate`, re-attacking after each; the last step's verification decides. Every
    re-attack re-tries `known` and the sets the earlier steps' re-attacks found (the `known` attack)."""
    names = parse_strategy(candidate)
    t0 = time.perf_counter()
    model_dir, lm, step_fp = req.model_dir, original, fp
    checkpoint, same_basis, details, steps = None, True, {}, []
    for name, label in zip(names, _step_labels(names)):
        step_out = out / label if len(names) > 1 else out
        step_out.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"hardening with {name}…")
        s0 = time.perf_counter()
        applied = DEFENSES[name].apply(Step(model_dir, lm, step_fp, req, step_out, original, log, progress))
        same_basis = same_basis and applied.same_basis
        hardened = applied.lm
        probes = [
            tokenize_probe(hardened, f"probe-{i + 1}", t, allow_short=req.allow_short)
            for i, t in enumerate(fp.probe_texts)
        ]
        held = [
            (
                tokenize_probe(original, n, t, allow_short=True).input_ids,
                tokenize_probe(hardened, n, t, allow_short=True).input_ids,
            )
            for n, t in req.held_out
        ]
        if log:
            log(f"re-attacking the {name} model with the whole attack portfolio…")
        verification, result = reattack(
            original.model,
            hardened,
            strategy=candidate,
            before=before,
            before_doc=doc,
            original_set=fp.critical_set,
            probes=probes,
            held_out=held,
            params=params,
            same_basis=same_basis,
            max_cost=req.max_cost,
            min_margin=req.min_margin,
            progress=progress,
            demote=applied.guarded,
            known_sets=known,
        )
        known = tuple(dict.fromkeys(known + _found(result)))
        if applied.guarded:
            applied.details["ranked_last_by_the_reattack"] = len(applied.guarded)
        if isinstance(hardened.model, torch.nn.Module):
            write_json(step_out / "report.json", scan_report(result))
            write_fingerprint(step_out / "fingerprint.safetensors", result)
        else:  # a runtime guard: the weights are unchanged; the report is the re-scan under the guard
            write_json(step_out / "report.json", scan_report(replace(result, lm=replace(hardened, model=lm.model))))
            applied.details["interventions_during_verification"] = hardened.model.guard.interventions
        details[label] = applied.details
        steps.append(
            {
                "defense": name,
                "kind": DEFENSES[name].kind,
                "verdict": verification.verdict,
                "margin": verification.margin,
                "margin_text": verification.margin_text,
                "clean_cost": verification.clean_cost,
                "seconds": round(time.perf_counter() - s0, 3),
            }
        )
        if applied.checkpoint is not None:
            checkpoint, model_dir, lm = applied.checkpoint, applied.checkpoint, hardened
            step_fp = load_fingerprint(step_out / "fingerprint.safetensors")
    return Attempt(
        candidate,
        out,
        verification,
        details if len(names) > 1 else details[names[0]],
        time.perf_counter() - t0,
        checkpoint,
        tuple(steps),
    )
