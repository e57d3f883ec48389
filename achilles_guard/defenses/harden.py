"""`guard harden` as a library: apply one defence (or several, `auto`), then verify it by re-attack.

    outcome = harden(HardenRequest(model_dir, fp_path, report_path, "split", out_dir, copies=8))
    outcome.verdict, outcome.attempts[0].verification.table()

Layout of OUT for one strategy: `model/` (hardened HF directory; none for `pin`, which is a runtime
guard), `report.json` (re-scan of the hardened model), `fingerprint.safetensors` (of the hardened
model), `harden-report.json` (before/after table and verdict). `auto` writes one such set per
strategy it tried under `OUT/<strategy>/` and one `OUT/harden-report.json`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from achilles_guard import __version__
from achilles_guard.errors import InputError, UsageError
from achilles_guard.fingerprint import Fingerprint, load_fingerprint, write_fingerprint
from achilles_guard.model import LoadedModel, load_model
from achilles_guard.neurons import discover
from achilles_guard.report import SCAN_SCHEMA, read_document, scan_report, write_json
from achilles_guard.scan import ScanParams, tokenize_probe

from achilles_guard.defenses.reattack import HELD_OUT_TEXTS, AttackSummary, Verification, verify

__all__ = ["STRATEGIES", "HardenRequest", "Attempt", "HardenOutcome", "harden", "auto_order"]

STRATEGIES = ("rotate", "split", "finetune", "pin", "auto")
HARDEN_SCHEMA = "achilles-guard/harden/v1"


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


@dataclass(frozen=True)
class Attempt:
    strategy: str
    out: Path
    verification: Verification
    details: dict
    seconds: float


@dataclass(frozen=True)
class HardenOutcome:
    request: HardenRequest
    attempts: tuple[Attempt, ...]

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
            "verdict": self.verdict,
            "chosen": self.best.strategy,
            "attempts": [
                {"strategy": a.strategy, "out": str(a.out), "seconds": round(a.seconds, 3), "details": a.details,
                 **a.verification.as_dict()}
                for a in self.attempts
            ],
        }


def auto_order(fp: Fingerprint) -> list[str]:
    """Strategies `auto` tries, in order, from the critical set's components and the family."""
    from achilles_guard.defenses.rotate import ROTATABLE
    from achilles_guard.defenses.split import SPLITTABLE

    # the paper's set decides (rotate/split plan from fp.critical_set); the fingerprint's `critical`
    # flag also marks every portfolio attack's set, which the re-attack checks anyway
    paper = set(fp.critical_set)
    components = {r.component for r in fp.critical_records if r.neuron in paper}
    order = []
    if components & {"mlp_act", "mlp_gate", "mlp_up"} and fp.model_type in SPLITTABLE:
        order.append("split")
    if components & {"mlp_out", "attn_out", "norm"} and fp.model_type in ROTATABLE:
        order.append("rotate")
    order.append("pin")  # the runtime guard works for any family
    return order


def harden(req: HardenRequest, *, progress=None, log=None) -> HardenOutcome:
    """Run the requested strategy (or `auto`'s sequence) and verify each by re-attack.

    `progress(name, stage, done, total, detail="")` (cli.common.progress_bar's update): stages
    "finetune" (detail: the loss), then the re-attack's "rank" and "search".
    """
    if req.strategy not in STRATEGIES:
        raise UsageError(f"--strategy {req.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if req.max_cost < 0:
        raise UsageError(f"--max-cost must be >= 0 (got {req.max_cost})")
    if req.out.resolve() == req.model_dir.resolve() or req.model_dir.resolve() in req.out.resolve().parents:
        raise UsageError(f"--out {req.out} is (inside) the model directory; guard never writes in place: choose a new directory")
    fp = load_fingerprint(req.fingerprint)
    report_path = req.report or req.fingerprint.parent / "report.json"
    doc = read_document(report_path, schema=SCAN_SCHEMA, option="scan report",
                        hint="; give --report, or keep report.json next to the fingerprint")
    try:
        before = AttackSummary.of_report(doc)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"scan report {report_path}: incomplete ({type(err).__name__}: {err})") from None
    if req.strategy in ("split",) and req.copies < 2:
        raise UsageError(f"--copies must be >= 2 (got {req.copies}): a unit needs at least two copies to be split")
    if req.strategy == "rotate":
        from achilles_guard.defenses.rotate import check_rotatable

        check_rotatable(fp.model_type)
    if req.strategy == "finetune":
        from achilles_guard.defenses.finetune import FinetuneConfig

        FinetuneConfig(**req.finetune).validated()
    original = load_model(req.model_dir, dtype=req.dtype, device=req.device)
    if original.config_sha256 != fp.config_sha256:
        raise InputError(f"fingerprint {req.fingerprint} was made for another model (config sha256 differs from {req.model_dir})")
    params = ScanParams(**fp.scan_params).validated()
    order = auto_order(fp) if req.strategy == "auto" else [req.strategy]
    attempts = []
    for strategy in order:
        out = req.out / strategy if req.strategy == "auto" else req.out
        out.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"hardening with {strategy}…")
        t0 = time.perf_counter()
        hardened, details, same_basis = _apply(strategy, req, fp, original, out, log, progress)
        probes = [tokenize_probe(hardened, f"probe-{i + 1}", t, allow_short=req.allow_short) for i, t in enumerate(fp.probe_texts)]
        held = [(tokenize_probe(original, n, t, allow_short=True).input_ids, tokenize_probe(hardened, n, t, allow_short=True).input_ids)
                for n, t in req.held_out]
        if log:
            log(f"re-attacking the {strategy} model with the same PCICN parameters…")
        verification, result = verify(
            original.model, hardened, strategy=strategy, before=before, original_set=fp.critical_set,
            probes=probes, held_out=held, params=params, same_basis=same_basis, max_cost=req.max_cost, progress=progress,
        )
        if isinstance(hardened.model, torch.nn.Module):
            write_json(out / "report.json", scan_report(result))
            write_fingerprint(out / "fingerprint.safetensors", result)
        else:  # pin: the model is unchanged; the report is the re-scan under the guard
            write_json(out / "report.json", scan_report(replace(result, lm=replace(hardened, model=original.model))))
            details["interventions_during_verification"] = hardened.model.guard.interventions
        attempt = Attempt(strategy, out, verification, details, time.perf_counter() - t0)
        attempts.append(attempt)
        if req.strategy == "auto":
            write_json(out / "harden-report.json", HardenOutcome(req, (attempt,)).as_dict())
        if verification.verdict == "mitigated":
            break
    outcome = HardenOutcome(req, tuple(attempts))
    write_json(req.out / "harden-report.json", outcome.as_dict())
    return outcome


# --- strategies ------------------------------------------------------------------------------


def _apply(strategy: str, req: HardenRequest, fp: Fingerprint, original: LoadedModel, out: Path, log=None, progress=None):
    """-> (hardened LoadedModel, details dict, same_basis)."""
    if strategy == "pin":
        from achilles_guard.defenses.pin import PinGuard, PinnedModel

        guard = PinGuard.from_fingerprint(fp)
        details = {
            "runtime_guard": True,
            "restorable": [str(n) for n in guard.restorable],
            "clamp_only": [str(n) for n in guard.clamp_only],
            "note": "pin is a runtime guard: load the original model and install "
                    "achilles_guard.defenses.pin.PinGuard.from_fingerprint(fp) (or guard monitor --protect)",
        }
        return replace(original, model=PinnedModel(original.model, guard)), details, True
    stored = _stored_dtype(req.model_dir)
    if strategy in ("rotate", "split"):
        work = load_model(req.model_dir, dtype="float64", device="cpu")  # exact arithmetic for the edit
    if strategy == "rotate":
        from achilles_guard.defenses.rotate import rotate_model

        record = rotate_model(work.model, seed=req.seed, kind=req.rotation)
        details = {"rotation": record.kind, "seed": record.seed, "untied_lm_head": record.untied,
                   "rotate_seconds": round(record.seconds, 4), "seconds_per_layer": round(record.seconds_per_layer, 5)}
        same_basis = False
    elif strategy == "split":
        from achilles_guard.defenses.split import plan_split, split_model

        by_name = discover(work.model, fp.scan_params.get("components", "all")).by_name()
        plan = plan_split(work.model, fp.critical_set, by_name, copies=req.copies)
        width = split_model(work.model, plan)
        details = {"copies": plan.copies, "units": {str(k): list(v) for k, v in plan.units.items()},
                   "intermediate_size": width, "protects_all": plan.protects_all, "notes": plan.notes()}
        same_basis = True
    elif strategy == "finetune":
        from achilles_guard.defenses.finetune import FinetuneConfig, finetune

        config = FinetuneConfig(**req.finetune).validated()
        work = load_model(req.model_dir, dtype="float32", device=req.device)
        steps = (lambda done, total, detail: progress("harden", "finetune", done, total, detail)) if progress else None
        details = finetune(work.model, original.model, fp, work.tokenizer, config, checkpoint_dir=out / "finetune-state",
                           log=log, progress=steps)
        same_basis = True
    else:  # pragma: no cover - validated above
        raise UsageError(f"unknown strategy {strategy}")
    _save(work, out / "model", stored)
    return load_model(out / "model", dtype=req.dtype, device=req.device), details, same_basis


def _stored_dtype(model_dir: Path) -> torch.dtype:
    from achilles_guard.checkpoint import Checkpoint

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with Checkpoint.open(model_dir) as ckpt:
        for key in ckpt.weight_map:
            _, dtype = ckpt.shape_dtype(key)
            if dtype in names:
                return names[dtype]
    return torch.float32


def _save(work: LoadedModel, target: Path, dtype: torch.dtype) -> None:
    """save_pretrained into a staging directory, then swap it in (a reader never sees half a model)."""
    model = work.model.to(dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    from achilles_guard.staging import staged_dir

    with staged_dir(target, mode="replace") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        work.tokenizer.save_pretrained(staging)
