"""`guard verify-checkpoint`, whole: the fingerprinted slices, then every loaded tensor, one verdict.

    report = verify_model("path/to/model", fp)               # full (default): every tensor the loader loads
    report = verify_model("model.gguf", fp, quick=True)       # the critical slices and norm gains only
    report.verdict, report.tensor_findings[0].severity         # "tampered", "critical"

Full mode runs the slice check (`verify_slices`: one loop, the format's judge classifies a
change: zeroed, scaled...) and the tensor check (`records.check_tensors`, which
finds it anywhere), and ranks each tensor finding:

- `critical`: it touches a fingerprinted neuron's slice (a changed slice verdict in that tensor, or
  a changed row that is a slice) or a scanned norm;
- `ranked`: a changed row produces one of the top `RANKED_TOP` neurons of a stored ranking (or
  the change could not be localized in a tensor holding such rows);
- `other`: anywhere else.

Both modes compare the loader files (tokenizer, chat template, generation config: `files.py`) of a
safetensors directory: a changed, added or removed one is a finding.

A fingerprint without tensor records (written before them) gives verdict `incomplete` (exit 1)
in full mode: its slices are verified, the rest of the model is not, and the verdict says so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from achilles_guard.formats.source import open_source
from achilles_guard.integrity.files import check_loader_files
from achilles_guard.integrity.records import TensorCheck, TensorFinding, check_tensors

__all__ = ["verify_slices", "verify_model", "rank_findings", "quick_coverage", "files_not_checked"]


def verify_slices(path: str | Path, fp, *, functional=None, signature: str = "not checked"):
    """The slice check of `path` (a checkpoint directory or a .gguf) against `fp`: config / metadata digest,
    every fingerprinted slice, the norm gains, optionally the model's behaviour. A VerifyResult; never raises
    on tampering; InputError (exit 2) for unusable input or a fingerprint of another architecture.

    The loop is one for every format; the format's judge (`slices.CheckpointJudge`,
    `gguf_slices.GGUFJudge`) reads and judges each slice."""
    from achilles_guard.formats.gguf import is_gguf
    from achilles_guard.integrity.slices import CheckpointJudge, SliceStatus, VerifyResult, functional_check

    if is_gguf(path):
        from achilles_guard.integrity.gguf_slices import GGUFJudge as Judge
    else:
        Judge = CheckpointJudge
    t0 = time.perf_counter()
    by_key: dict[str, list] = {}
    for record in fp.neurons:
        for key in record.slices:
            by_key.setdefault(key, []).append(record)
    with Judge(path, fp) as judge:
        verdicts = [judge.judge(key, tuple(by_key.get(key, ()))) for key in sorted(fp.slices)]
        verdicts.extend(judge.finish(verdicts))
        config, where = judge.config, judge.where()
    verify_s = time.perf_counter() - t0
    check, skipped = None, None
    if functional is not None:
        broken = [v for v in verdicts if v.status in (SliceStatus.missing, SliceStatus.shape_mismatch)]
        if broken:  # the model cannot load consistently; the slices already fail the check
            skipped = (
                f"skipped: {broken[0].param} is {broken[0].status.value}, the model cannot be loaded as fingerprinted"
            )
        else:
            check = functional_check(Path(path), fp, functional)
    return VerifyResult(checkpoint=str(path), fingerprint=fp.path, signature=signature, config=config,
                        slices=tuple(verdicts), neurons=fp.neurons, functional=check, verify_s=verify_s,
                        functional_skipped=skipped, **where)


def verify_model(path: str | Path, fp, *, quick: bool = False, functional=None, signature: str = "not checked",
                 sign_key: bytes | None = None):
    """A VerifyResult for `path` against fingerprint `fp`; InputError (exit 2) for unusable input."""
    report = verify_slices(path, fp, functional=functional, signature=signature)
    with open_source(path) as src:
        if src.kind != "gguf":  # a GGUF's tokenizer and template are metadata, in its metadata digest
            report = dataclasses.replace(report, file_check=check_loader_files(src.root, fp.files))
        if quick:
            return dataclasses.replace(report, mode="quick", not_checked=_join(quick_coverage(src, fp, report),
                                                                               files_not_checked(fp, report)))
        if fp.records is None:
            return dataclasses.replace(
                report, mode="full",
                not_checked=_join(
                    f"the fingerprint (written by guard {fp.tool_version}) has no tensor records: only its "
                    f"{len(fp.slices)} slices and {len(_norm_records(fp))} norm tensors were checked, the "
                    f"other tensors of the {len(src.entries)} loaded were not; re-scan the trusted model to "
                    "record them, or pass --quick to accept a slice-only check",
                    files_not_checked(fp, report),
                ),
            )
        check = check_tensors(src, fp.records, sign_key=sign_key, critical_rows=_slice_rows(fp))
    return dataclasses.replace(report, mode="full", tensor_check=rank_findings(check, report, fp),
                               not_checked=files_not_checked(fp, report))


def files_not_checked(fp, report) -> str | None:
    """In words, the loader files a fingerprint without file records could not vouch for (None: nothing left out)."""
    check = report.file_check
    if check is None or check.recorded or not check.unchecked:
        return None
    more = len(check.unchecked) - 8
    names = ", ".join(check.unchecked[:8]) + (f" and {more} more" if more > 0 else "")
    return (f"the fingerprint (written by guard {fp.tool_version}) records no tokenizer, chat template or generation "
            f"files: {names} were not compared; re-scan the trusted model to record them")


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


def _norm_records(fp) -> dict:
    return json.loads(fp.metadata.get("norms", "{}"))


def _slice_rows(fp) -> dict[str, set[int]]:
    """tensor name -> rows of the row view that are fingerprinted slices (axis 0)."""
    out: dict[str, set[int]] = {}
    for r in fp.slices.values():
        if r.axis == 0:
            out.setdefault(r.checkpoint_key, set()).add(r.index)
    return out


def rank_findings(check: TensorCheck, report, fp) -> TensorCheck:
    """Each finding's severity: critical, ranked or other (module docstring)."""
    changed_slices = {v.checkpoint_key for v in report.slices if not v.ok and v.checkpoint_key}
    slice_tensors = {r.checkpoint_key for r in fp.slices.values()}
    norms = {rec.get("checkpoint_key") for rec in _norm_records(fp).values()}
    ranked = fp.records.ranked

    def severity(f: TensorFinding) -> str:
        if f.kind == "format":
            return "critical"  # nothing of the fingerprinted model could be vouched for
        whole = f.kind in ("missing", "reshaped", "dtype", "requantized") or f.rows_changed is None
        if f.tensor in changed_slices or f.tensor in norms or f.critical_hits or (whole and f.tensor in slice_tensors):
            return "critical"
        if f.ranked_hits or (whole and ranked.get(f.tensor)):
            return "ranked"
        return "other"

    findings = tuple(dataclasses.replace(f, severity=severity(f)) for f in check.findings)
    order = {"critical": 0, "ranked": 1, "other": 2}
    return dataclasses.replace(check, findings=tuple(sorted(findings, key=lambda f: order[f.severity])))


def quick_coverage(src, fp, report) -> str:
    """What a quick check leaves out, in words: the tensors and bytes holding no compared slice or norm."""
    norms = [] if src.kind == "gguf" else [rec.get("checkpoint_key") for rec in _norm_records(fp).values()]
    covered = {v.checkpoint_key for v in report.slices if v.checkpoint_key} | set(norms)
    rest = [e for e in src.entries if e.name not in covered]
    total = sum(e.nbytes for e in src.entries)
    gains = (f"{len(norms)} norm tensors" if norms or src.kind != "gguf"
             else "no norm gains (a GGUF slice check compares none)")
    return (f"quick: only {len(report.slices)} fingerprinted slices and {gains} were compared; {len(rest)} of the "
            f"{len(src.entries)} loaded tensors hold none of them and were not read "
            f"({sum(e.nbytes for e in rest):,} of {total:,} bytes), and the other rows of the rest were not read "
            "either; run without --quick to check every tensor")
