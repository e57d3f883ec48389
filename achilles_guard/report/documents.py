"""Serialisation in one place: the scan report (achilles-guard/scan/v1), the verification document
(achilles-guard/verify/v1), their SARIF, JSON numbers and atomic writes.

    doc = scan_report(result)                 # plain dict, JSON-ready
    write_json(out / "report.json", doc)      # atomic: a reader sees the old file or the new one
    sarif = scan_sarif(doc)
    doc = verify_document(verify_model(path, fp)); sarif = verify_sarif(doc)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from achilles_guard import __version__
from achilles_guard.errors import InputError

if TYPE_CHECKING:  # annotations only: writing a document never needs torch
    from achilles_guard.engine.neurons import Neuron

__all__ = [
    "SCAN_SCHEMA",
    "VERIFY_SCHEMA",
    "VERIFY_RULES",
    "scan_report",
    "scan_sarif",
    "verify_document",
    "verify_sarif",
    "sarif_log",
    "fingerprint_doc",
    "write_json",
    "atomic_write_bytes",
    "json_number",
    "neuron_record",
    "attack_record",
    "strongest_record",
    "gate_size",
    "dumps",
    "read_document",
]

SCAN_SCHEMA = "achilles-guard/scan/v1"
TOOL = {"name": "achilles-guard", "version": __version__}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
PAPER_URI = "https://arxiv.org/abs/2510.10238"  # the paper: informationUri and helpUri of every rule


def json_number(x: Any) -> Any:
    """The one non-finite -> null rule: inf/nan become None (JSON has no infinity); finite numbers,
    None and anything that is not a number pass through unchanged."""
    if x is None or isinstance(x, (bool, str)):
        return x
    try:
        return x if math.isfinite(x) else None
    except TypeError:
        return x


def neuron_record(neuron: Neuron, candidates_by_name: dict, **extra: Any) -> dict:
    cand = candidates_by_name.get(neuron.module)
    return {
        "module": neuron.module,
        "channel": neuron.channel,
        "layer": cand.layer if cand else None,
        "component": cand.component if cand else None,
        **extra,
    }


def scan_report(result, *, demo: bool = False) -> dict:
    """The scan report document (docs/design.md, "The scan report")."""
    lm, params = result.lm, result.params
    by_name = result.candidates.by_name()
    texts = [_text_record(t, by_name, params.keep) for t in result.texts]
    primary = texts[0]
    return {
        "schema": SCAN_SCHEMA,
        "tool": dict(TOOL),
        "model": {
            "path": lm.path,
            "architecture": lm.architecture,
            "model_type": lm.model_type,
            "config_sha256": lm.config_sha256,
            "dtype": str(lm.dtype).removeprefix("torch."),
            "device": lm.device,
            "num_parameters": lm.num_parameters,
            "candidate_neurons": result.candidates.total,
            "candidate_modules": len(result.candidates.candidates),
            "synthetic_demo": demo,
        },
        "params": {**params.as_dict(), "text_tokens": primary["tokens"]},
        "baseline": primary["baseline"],
        "converged": primary["converged"],
        "n_star": primary["n_star"],
        "critical_set": primary["critical_set"],
        "delta_log10": primary["delta_log10"],
        "curve": primary["curve"],
        "ranking": primary["ranking"],
        "texts": [{k: v for k, v in t.items() if k != "ranking"} for t in texts],
        "intersection": [neuron_record(n, by_name) for n in result.intersection],
        "smallest_critical_set": result.smallest_set,
        "attacks": primary.get("attacks", []),
        "strongest": strongest_record(result.strongest, by_name),
        "timings": {
            "load_s": round(result.load_s, 4),
            "rank_s": round(sum(t.rank_s for t in result.texts), 4),
            "search_s": round(sum(t.search_s for t in result.texts), 4),
            "portfolio_s": round(sum(t.portfolio_s for t in result.texts), 4),
            "attacks": primary["timings"].get("attacks", {}),
        },
    }


def attack_record(a, by_name: dict) -> dict:
    """One portfolio attack (portfolio.AttackResult) as JSON."""
    return {
        "attack": a.attack,
        "converged": a.converged,
        "n": a.n,
        "delta_log10": json_number(a.delta_log10) if a.delta_log10 is not None else None,
        "critical_set": [neuron_record(n, by_name) for n in a.critical_set],
        "curve": [{"n": n, "delta_log10": json_number(d)} for n, d in a.curve],
        "n_found": a.n_found,
        "note": a.note,
    }


def strongest_record(s, by_name: dict) -> dict | None:
    """portfolio.Strongest as JSON (null when no attack collapsed the model)."""
    if s is None:
        return None
    doc = {
        "attack": s.attack,
        "n": s.n,
        "delta_log10": json_number(s.delta_log10),
        "critical_set": [neuron_record(n, by_name) for n in s.critical_set],
    }
    if s.text is not None:
        doc["text"] = s.text
    return doc


def _text_record(scan, by_name: dict, keep: int) -> dict:
    from achilles_guard.engine.perplexity import log10_ppl  # a scan result in hand: torch is loaded

    res, ranking = scan.result, scan.ranking
    top = ranking.top(min(keep, len(ranking)))
    importance = ranking.importance[: len(top)].tolist()
    rank_of = {n: i + 1 for i, n in enumerate(ranking.top(res.n_star or 0))}
    return {
        "name": scan.probe.name,
        "tokens": scan.probe.tokens,
        "text": scan.probe.text,
        "baseline": {"loss": res.baseline_loss, "log10_ppl": log10_ppl(res.baseline_loss)},
        "converged": res.converged,
        "n_star": res.n_star,
        "critical_set": [
            neuron_record(
                n,
                by_name,
                rank=rank_of[n],
                importance=json_number(importance[rank_of[n] - 1]) if rank_of[n] <= len(importance) else None,
            )
            for n in res.critical_set
        ],
        "delta_log10": json_number(res.delta_log10),
        "curve": [{"n": n, "delta_log10": json_number(d)} for n, d in res.curve],
        "ranking": [neuron_record(n, by_name, importance=json_number(v)) for n, v in zip(top, importance)],
        "timings": {
            "rank_s": round(scan.rank_s, 4),
            "search_s": round(scan.search_s, 4),
            "portfolio_s": round(scan.portfolio_s, 4),
            # each attack's seconds (its ranking included) live here, with the other timings, so
            # that everything outside `timings` is reproducible from the seed
            **({"attacks": {a.attack: round(a.seconds, 4) for a in scan.portfolio.attacks}} if scan.portfolio else {}),
            # clean-prefix reuse (engine/prefix.py): decoder blocks a whole forward would run vs skipped
            **({"prefix_reuse": asdict(scan.prefix)} if scan.prefix is not None else {}),
        },
        **(
            {
                "attacks": [attack_record(a, by_name) for a in scan.portfolio.attacks],
                "strongest": strongest_record(scan.portfolio.strongest, by_name),
            }
            if scan.portfolio is not None
            else {}
        ),
    }


def scan_sarif(doc: dict, *, fail_under: int | None = None) -> dict:
    """SARIF 2.1.0: one result per critical neuron, located at the model's config.json."""
    rules = [
        {
            "id": "AG001",
            "name": "CriticalNeuron",
            "shortDescription": {"text": "Neuron whose masking (with the rest of its set) collapses the model"},
            "fullDescription": {
                "text": "PCICN found a small set of neurons whose joint masking raises perplexity by at least "
                "epsilon orders of magnitude. Anyone who can write the weights can sabotage the model "
                "by zeroing the weight slices that produce them."
            },
            "helpUri": PAPER_URI,
            "properties": {"security-severity": "8.1", "tags": ["security", "model-integrity"]},
        },
        {
            "id": "AG002",
            "name": "CriticalSetBelowGate",
            "shortDescription": {"text": "The critical set is no larger than the --fail-under gate"},
            "properties": {"security-severity": "9.0", "tags": ["security", "gate"]},
        },
    ]
    location = _location(doc["model"]["path"], "config.json")
    results = []
    delta = doc["delta_log10"]
    for neuron in doc["critical_set"]:
        results.append(
            {
                "ruleId": "AG001",
                "level": "warning",
                "message": {
                    "text": f"{neuron['module']} channel {neuron['channel']} (layer {neuron['layer']}, "
                            f"{neuron['component']}) "
                    f"is in a critical set of {doc['n_star']}: masking the set raises log10 perplexity by "
                    f"{'inf' if delta is None else f'{delta:.2f}'}"
                },
                "locations": [location],
                "properties": {k: neuron[k] for k in ("module", "channel", "layer", "component", "rank")},
            }
        )
    smallest = gate_size(doc)
    if fail_under is not None and smallest is not None and smallest <= fail_under:
        results.append({
            "ruleId": "AG002",
            "level": "error",
            "message": {"text": f"critical set of {smallest} neuron(s) <= --fail-under {fail_under}" + _by(doc)},
            "locations": [location],
            # the gated set itself: the strongest attack's (AG001 lists the paper's PCICN set)
            **({"properties": {"attack": doc["strongest"]["attack"], "text": doc["strongest"].get("text"),
                               "critical_set": [{k: n[k] for k in ("module", "channel", "layer", "component")}
                                                for n in doc["strongest"]["critical_set"]]}}
               if doc.get("strongest") else {}),
        })
    return sarif_log(rules, results)


def sarif_log(rules: list[dict], results: list[dict]) -> dict:
    """A SARIF 2.1.0 log of one run: the one tool/driver block (name, version, informationUri), shared
    by the scan and the verification SARIF."""
    driver = {"name": TOOL["name"], "version": TOOL["version"], "informationUri": PAPER_URI, "rules": rules}
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [{"tool": {"driver": driver}, "results": results}]}


def gate_size(doc: dict) -> int | None:
    """What --fail-under gates on: `strongest.n` when the portfolio ran, else the smallest PCICN set."""
    if doc.get("attacks"):
        s = doc["strongest"]
        return s["n"] if s else None
    return doc.get("smallest_critical_set")


def _by(doc: dict) -> str:
    s = doc.get("strongest")
    if not s:
        return ""
    return f" (found by the {s['attack']} attack" + (f" on text {s['text']}" if s.get("text") else "") + ")"


def _uri(model_path: str, name: str) -> str:
    return Path(model_path, name).as_posix()


# --- verify-checkpoint: the JSON document (schema achilles-guard/verify/v1) and its SARIF ----------

VERIFY_SCHEMA = "achilles-guard/verify/v1"

# Stable SARIF rule ids, one per finding kind, with their GitHub security-severity.
VERIFY_RULES: dict[str, tuple[str, str, str]] = {
    # status or finding: (rule id, rule name, security-severity)
    "zeroed": ("AG101", "CriticalSliceZeroed", "9.5"),
    "scaled": ("AG102", "CriticalSliceScaled", "8.5"),
    "sign-flipped": ("AG103", "CriticalSliceSignFlipped", "8.5"),
    "perturbed": ("AG104", "CriticalSlicePerturbed", "7.5"),
    "missing": ("AG105", "CriticalSliceMissing", "8.0"),
    "shape-mismatch": ("AG106", "CriticalSliceShapeMismatch", "8.0"),
    "ambiguous": ("AG107", "AmbiguousCheckpointLayout", "8.0"),
    "config": ("AG110", "ConfigChanged", "6.5"),
    "tensor:bytes": ("AG120", "TensorBytesDiffer", "8.0"),
    "tensor:beyond-rounding": ("AG121", "TensorChangedBeyondRounding", "8.0"),
    "tensor:missing": ("AG122", "TensorMissing", "8.0"),
    "tensor:extra": ("AG123", "TensorExtra", "7.0"),
    "tensor:reshaped": ("AG124", "TensorReshaped", "8.0"),
    "tensor:dtype": ("AG125", "TensorDtypeChanged", "7.0"),
    "tensor:requantized": ("AG126", "TensorRequantized", "7.0"),
    "tensor:format": ("AG127", "CheckpointFormatDiffers", "7.0"),
    "incomplete": ("AG128", "VerificationIncomplete", "7.0"),
    "file": ("AG129", "LoaderFileChanged", "8.0"),
    "functional": ("AG111", "FunctionalRegression", "9.0"),
}


def verify_document(report) -> dict:
    """The JSON document of a verification (`integrity.slices.VerifyResult`); inf/nan become null."""
    fc = report.functional
    return {
        "schema": VERIFY_SCHEMA,
        "tool": dict(TOOL),
        "checkpoint": {
            "path": report.checkpoint,
            "config_sha256": report.config.actual_sha256,
            "architecture": report.config.actual_architecture,
            "shards_read": list(report.shards_read),
        },
        "fingerprint": {
            "path": report.fingerprint,
            "config_sha256": report.config.expected_sha256,
            "architecture": report.config.expected_architecture,
            "signature": report.signature,
            "slices": len(report.slices),
            "neurons": len(report.neurons),
        },
        "verdict": report.verdict,
        "layout": {"loaded_files": list(report.loaded_files), "ambiguities": list(report.ambiguities)},
        "config_matches": report.config.matches,
        "counts": report.counts,
        "tampered_neurons": [_neuron_doc(n) for n in report.tampered_neurons],
        "slices": [_slice_doc(v) for v in report.slices],
        "functional": None
        if fc is None
        else {
            "baseline_loss": json_number(fc.baseline_loss),
            "loss": json_number(fc.loss),
            "delta_log10": json_number(fc.delta_log10),
            "tolerance": fc.max_delta_log10,
            "loss_ok": fc.loss_ok,
            "masked_loss": json_number(fc.masked_loss),
            "masked_delta_log10": json_number(fc.masked_delta_log10),
            "epsilon": fc.epsilon,
            "still_critical": fc.still_critical,
            "ok": fc.ok,
            "load_s": round(fc.load_s, 4),
        },
        "functional_skipped": report.functional_skipped,
        "timings": {"verify_s": round(report.verify_s, 6)},
        "mode": report.mode,
        "not_checked": report.not_checked,
        "tensors": tensor_check_doc(report.tensor_check),
        "files": file_check_doc(report.file_check),
    }


def file_check_doc(check) -> dict | None:
    """The loader files part of a verification (`integrity.files.FileCheck`); None for a GGUF (its metadata)."""
    if check is None:
        return None
    return {
        "recorded": check.recorded,
        "compared": list(check.compared),
        "findings": [
            {"name": f.name, "role": f.role, "kind": f.kind, "detail": f.detail,
             "expected_sha256": f.expected_sha256, "actual_sha256": f.actual_sha256}
            for f in check.findings
        ],
        "not_compared": list(check.unchecked),
        "not_covered": list(check.uncovered),
    }


def tensor_check_doc(check) -> dict | None:
    """The whole-model part of a verification (`records.TensorCheck`), None when it did not run."""
    if check is None:
        return None
    counts: dict[str, int] = {}
    severities = {"critical": 0, "ranked": 0, "other": 0}
    for f in check.findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
        severities[f.severity] += 1
    return {
        "present": check.tensors,
        "recorded": check.recorded,
        "identical": check.identical,
        "equivalent": check.equivalent,
        "findings_count": len(check.findings),
        "kinds": counts,
        "severities": severities,
        "bytes_hashed": check.bytes_hashed,
        "bytes_total": check.bytes_total,
        "sketched": check.sketched,
        "projections_checked": not check.keyless,
        "seconds": round(check.seconds, 6),
        "findings": [
            {
                "tensor": f.tensor,
                "file": f.file,
                "kind": f.kind,
                "severity": f.severity,
                "detail": f.detail,
                "rows": list(f.rows),
                "rows_changed": f.rows_changed,
                "rows_total": f.rows_total,
                "ranked_rows": [{"row": row, "rank": rank} for row, rank in f.ranked_hits[:32]],
                "critical_rows": list(f.critical_hits[:32]),
                "expected_dtype": f.expected_dtype,
                "actual_dtype": f.actual_dtype,
                "expected_shape": None if f.expected_shape is None else list(f.expected_shape),
                "actual_shape": None if f.actual_shape is None else list(f.actual_shape),
            }
            for f in check.findings
        ],
    }


def verify_sarif(doc: dict) -> dict:
    """SARIF 2.1.0: one result per changed slice (located at its shard file), config, functional."""
    rules = [
        {"id": rid, "name": name, "shortDescription": {"text": _VERIFY_RULE_TEXT[kind]},
         "helpUri": PAPER_URI,
         "properties": {"security-severity": severity, "tags": ["security", "model-integrity"]}}
        for kind, (rid, name, severity) in VERIFY_RULES.items()
    ]
    root = doc["checkpoint"]["path"]
    results = []
    for s in doc["slices"]:
        if s["status"] in ("intact", "equivalent"):
            continue
        rid = VERIFY_RULES[s["status"]][0]
        who = ", ".join(
            f"{n['module']}[{n['channel']}]" + (" (critical)" if n["critical"] else "") for n in s["neurons"]
        )
        results.append(
            {
                "ruleId": rid,
                "level": "error",
                "message": {
                    "text": f"{s['key']} in {s['shard']}: {s['description']}; produces {who or 'no recorded neuron'}"
                },
                "locations": [_location(root, s["shard"])],
                "properties": {k: s[k] for k in ("key", "param", "status", "factor", "rel_l2", "shard")},
            }
        )
    for line in doc.get("layout", {}).get("ambiguities", []):
        results.append({
            "ruleId": VERIFY_RULES["ambiguous"][0], "level": "error",
            "message": {"text": f"ambiguous checkpoint layout: {line}"},
            "locations": [_location(root, ".")],
        })
    if not doc["config_matches"]:
        results.append(
            {
                "ruleId": VERIFY_RULES["config"][0],
                "level": "error",
                "message": {
                    "text": f"config.json sha256 {doc['checkpoint']['config_sha256'][:12]}… differs from the "
                            "fingerprinted "
                    f"{doc['fingerprint']['config_sha256'][:12]}… (same architecture "
                    f"{doc['checkpoint']['architecture']})"
                },
                "locations": [_location(root, "config.json")],
            }
        )
    for f in (doc.get("tensors") or {}).get("findings", []):
        rows = "" if f["rows_changed"] is None else f" ({f['rows_changed']:,} of {f['rows_total']:,} rows)"
        results.append(
            {
                "ruleId": VERIFY_RULES["tensor:" + f["kind"]][0],
                "level": "error",  # every finding fails the gate; `severity` ranks them
                "message": {"text": f"{f['tensor']} in {f['file']}: {f['detail']}{rows}; severity {f['severity']}"},
                "locations": [_location(root, f["file"].split(",")[0])],
                "properties": {k: f[k] for k in ("tensor", "kind", "severity", "rows", "rows_changed", "file")},
            }
        )
    for f in (doc.get("files") or {}).get("findings", []):
        results.append(
            {
                "ruleId": VERIFY_RULES["file"][0],
                "level": "error",
                "message": {"text": f"{f['name']} ({f['role']}): {f['detail']}"},
                "locations": [_location(root, f["name"])],
                "properties": {k: f[k] for k in ("name", "role", "kind", "expected_sha256", "actual_sha256")},
            }
        )
    if doc.get("verdict") == "incomplete":
        results.append({
            "ruleId": VERIFY_RULES["incomplete"][0], "level": "error",
            "message": {"text": doc.get("not_checked") or "verification incomplete"},
            "locations": [_location(root, ".")],
        })
    fc = doc["functional"]
    if fc is not None and not fc["ok"]:
        results.append(
            {
                "ruleId": VERIFY_RULES["functional"][0],
                "level": "error",
                "message": {
                    "text": f"probe loss Δ = {fc['delta_log10']} orders of magnitude (tolerance {fc['tolerance']}); "
                    f"critical set still critical: {fc['still_critical']}"
                },
                "locations": [_location(root, "config.json")],
            }
        )
    return sarif_log(rules, results)


_VERIFY_RULE_TEXT = {
    "zeroed": "A weight slice producing a fingerprinted neuron was set to its null value (the PCICN attack)",
    "scaled": "A weight slice producing a fingerprinted neuron was multiplied by a factor",
    "sign-flipped": "A weight slice producing a fingerprinted neuron had its sign flipped",
    "perturbed": "A weight slice producing a fingerprinted neuron changed beyond dtype rounding",
    "missing": "A fingerprinted weight tensor is missing from the checkpoint",
    "shape-mismatch": "A fingerprinted weight tensor changed shape",
    "ambiguous": "The checkpoint's files are ambiguous: a tensor in two files, a stray safetensors file, or an index "
                 "that disagrees with the files",
    "config": "config.json differs from the one that was fingerprinted",
    "tensor:bytes": "A loaded tensor's bytes differ from the fingerprinted ones (same dtype)",
    "tensor:beyond-rounding": "A re-cast tensor's values changed beyond the rounding of its new dtype",
    "tensor:missing": "A fingerprinted tensor is missing from the loaded files",
    "tensor:extra": "The loader loads a tensor the fingerprint does not record",
    "tensor:reshaped": "A loaded tensor's shape differs from the fingerprinted one",
    "tensor:dtype": "A tensor's dtype changed in a way guard cannot judge (not a float re-cast)",
    "tensor:requantized": "A GGUF tensor was re-quantized: a different model",
    "tensor:format": "The checkpoint is in another format than the fingerprinted one: its tensors cannot be compared",
    "incomplete": "The fingerprint has no tensor records: only the critical slices were verified",
    "file": "A tokenizer, chat template, generation config or other file the loader reads changed, appeared or "
            "disappeared since the scan",
    "functional": "The probe loss rose past the tolerance, or the critical set is no longer critical",
}


def _slice_doc(v) -> dict:
    return {
        "key": v.key,
        "param": v.param,
        "checkpoint_key": v.checkpoint_key,
        "shard": v.shard,
        "status": v.status.value,
        "description": v.describe(),
        "factor": json_number(v.factor),
        "rel_l2": json_number(v.rel_l2),
        "max_abs_diff": json_number(v.max_abs_diff),
        "expected_dtype": v.expected_dtype,
        "actual_dtype": v.actual_dtype,
        "expected_shape": list(v.expected_shape),
        "actual_shape": None if v.actual_shape is None else list(v.actual_shape),
        "critical": v.critical,
        "neurons": [_neuron_doc(n) for n in v.neurons],
    }


def _neuron_doc(n) -> dict:
    return {"module": n.neuron.module, "channel": n.neuron.channel, "layer": n.layer, "component": n.component,
            "rank": n.rank, "critical": n.critical}


def _location(root: str, name: str) -> dict:
    return {"physicalLocation": {"artifactLocation": {"uri": _uri(root, name)}}}


# --- guard fingerprint show: a fingerprint as JSON ---------------------------------------------


def fingerprint_doc(fp, *, signature: str) -> dict:
    """A JSON view of a Fingerprint (metadata decoded, tensors summarised)."""
    return {
        "path": fp.path,
        "format": fp.metadata.get("format"),
        "schema_version": int(fp.metadata.get("schema_version", "0")),
        "tool_version": fp.tool_version,
        "architecture": fp.architecture,
        "model_type": fp.model_type,
        "config_sha256": fp.config_sha256,
        "signature": signature,
        "scan_params": fp.scan_params,
        "baseline_loss": fp.baseline_loss,
        "probe_texts": len(fp.probe_texts),
        "critical_set": [{"module": n.module, "channel": n.channel} for n in fp.critical_set],
        "slices": {
            k: {
                "param": s.param,
                "axis": s.axis,
                "index": s.index,
                "shard": s.shard,
                "dtype": s.dtype,
                "shape": list(s.shape),
                "sha256": s.sha256,
            }
            for k, s in sorted(fp.slices.items())
        },
        "neurons": [
            {
                "rank": r.rank,
                "module": r.neuron.module,
                "channel": r.neuron.channel,
                "layer": r.layer,
                "component": r.component,
                "critical": r.critical,
                "importance": json_number(r.importance),
                "slices": list(r.slices),
                "baseline": {
                    "mean": r.baseline.mean,
                    "std": r.baseline.std,
                    "max_abs": r.baseline.max_abs,
                    "mean_abs": r.baseline.mean_abs,
                },
            }
            for r in fp.neurons
        ],
    }


def read_document(path: str | Path, *, schema: str, option: str, hint: str = "") -> dict:
    """A JSON document of the given `schema`, or an InputError naming the option and what to do."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file{hint}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{option} {path}: not a readable JSON file ({err})") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise InputError(
            f"{option} {path}: not a {schema} document (schema "
            f"{doc.get('schema') if isinstance(doc, dict) else None!r})"
        )
    return doc


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, doc: Any) -> Path:
    return atomic_write_bytes(path, dumps(doc).encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file in the same directory + fsync + rename; never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
