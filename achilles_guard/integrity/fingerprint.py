"""The critical-weight fingerprint: a safetensors file written by `guard scan`.

Tensors: the exact bytes (checkpoint dtype) of every weight slice that produces a fingerprinted
neuron — the critical set(s) plus the top-R ranked neurons — named `WeightSlice.key`, e.g.
`model.layers.0.mlp.down_proj.weight@0:17`. Metadata (str -> str, JSON-encoded structure):

    format, schema_version, tool_version, config_sha256, model_type, architecture,
    scan_params, critical_set, neurons (with slices, activation baselines, and `attacks`: the
    portfolio attacks whose set holds the neuron; `critical` stays the paper's PCICN sets), slices (param,
    checkpoint key, axis, index, null value, shard, dtype, shape, sha256), baseline (probe loss),
    probe_texts, tensors (every loaded tensor's record), files (sha256 of the tokenizer, chat template,
    generation config and other loader files: integrity.files; safetensors directories), and optionally
    hmac_sha256 (HMAC-SHA256 over tensors + metadata).

Readable with plain `safetensors.safe_open`; `load_fingerprint` checks every slice's sha256 and,
given a key, the HMAC (fail closed).

    write_fingerprint(out / "fingerprint.safetensors", result, top=64, sign_key=None)
    fp = load_fingerprint(path, verify_key=None)
    fp.critical_set, fp.neurons[0].baseline.max_abs, fp.tensors[key]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from achilles_guard import __version__
from achilles_guard.engine.masking import hooks
from achilles_guard.engine.neurons import Neuron, producing_slices
from achilles_guard.engine.perplexity import log10_ppl
from achilles_guard.errors import EXIT_FINDING, GuardError, InputError, UsageError, first_line
from achilles_guard.formats.checkpoint import Checkpoint, resolve_key, tensor_sha256
from achilles_guard.integrity.keys import read_key
from achilles_guard.integrity.records import SKETCH_TENSOR, TensorRecords
from achilles_guard.report.documents import json_number

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "SignatureError",
    "ActivationBaseline",
    "SliceRecord",
    "NeuronRecord",
    "Fingerprint",
    "write_fingerprint",
    "load_fingerprint",
    "activation_baselines",
    "read_key",
]

FORMAT = "achilles-guard/fingerprint"
SCHEMA_VERSION = 1


class SignatureError(GuardError):
    """The fingerprint's HMAC is missing or wrong: it cannot be trusted (a finding, exit 1)."""

    exit_code = EXIT_FINDING


@dataclass(frozen=True)
class ActivationBaseline:
    """A neuron's activation over every position of the probe texts."""

    mean: float
    std: float
    max_abs: float
    mean_abs: float
    # per-position profile (absent in fingerprints written before it): the first position of each probe
    # vs every later one - an attention-sink massive activation lives at the first position only
    first_mean: float | None = None  # mean of a[0] over the probes
    first_min_abs: float | None = None  # min |a[0]| over the probes
    first_max_abs: float | None = None  # max |a[0]| over the probes
    rest_max_abs: float | None = None  # max |a[t]|, t >= 1
    min_abs: float | None = None  # min |a| over every position


@dataclass(frozen=True)
class SliceRecord:
    key: str  # tensor name in the fingerprint
    param: str  # model parameter name
    checkpoint_key: str  # tensor name in the checkpoint (usually == param)
    axis: int
    index: int
    null_value: float
    shard: str
    dtype: str  # safetensors dtype string of the checkpoint tensor ("F32", "F16", "BF16"...)
    shape: tuple[int, ...]  # shape of the whole checkpoint tensor
    sha256: str  # of the slice's exact bytes


@dataclass(frozen=True)
class NeuronRecord:
    neuron: Neuron
    layer: int
    component: str
    rank: int  # 1-based rank in the primary ranking
    importance: float
    critical: bool
    slices: tuple[str, ...]  # SliceRecord keys
    baseline: ActivationBaseline
    attacks: tuple[str, ...] = ()  # the portfolio attacks whose set holds the neuron


@dataclass(frozen=True)
class NormWeights:
    """A norm module's whole weight (and bias) as the checkpoint stores them; `offset` is added to the weight
    to get the gain (1 for Gemma's x_hat * (1 + w), else 0)."""

    module: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    offset: float


@dataclass(frozen=True)
class Fingerprint:
    path: str
    tensors: dict[str, torch.Tensor]
    slices: dict[str, SliceRecord]
    neurons: tuple[NeuronRecord, ...]
    critical_set: tuple[Neuron, ...]
    config_sha256: str
    model_type: str
    architecture: str
    tool_version: str
    scan_params: dict
    baseline_loss: float
    probe_texts: tuple[str, ...]
    signed: bool
    metadata: dict[str, str]
    # every scanned norm module's whole gain (and bias), for the runtime guard's exact rule: {module: NormWeights}
    norms: dict = field(default_factory=dict)
    # every loaded tensor's name, dtype, shape, sha256 and row sketch (None: written before tensor records)
    records: TensorRecords | None = None
    # the loader files' sha256 (integrity.files): {name: sha256}; None: written before guard recorded them,
    # or a GGUF (its tokenizer lives in the metadata the GGUF digest covers)
    files: dict | None = None

    @property
    def critical_records(self) -> tuple[NeuronRecord, ...]:
        return tuple(r for r in self.neurons if r.critical)


def activation_baselines(model, neurons: list[Neuron], probes: list[torch.Tensor]) -> dict[Neuron, ActivationBaseline]:
    """Mean, std, max |a| and mean |a| of each neuron over every position of every probe (1, T)."""
    per_module: dict[str, torch.Tensor] = {}
    for n in neurons:
        per_module.setdefault(n.module, []).append(n.channel)
    idx = {m: torch.tensor(cs, dtype=torch.long) for m, cs in per_module.items()}
    stats = {m: torch.zeros(4, len(cs), dtype=torch.float64) for m, cs in idx.items()}  # sum, sumsq, max|a|, sum|a|
    first = {m: [] for m in idx}  # per probe: (k,) value at position 0
    rest = {m: torch.zeros(len(cs), dtype=torch.float64) for m, cs in idx.items()}  # max |a[t]|, t >= 1
    low = {m: torch.full((len(cs),), math.inf, dtype=torch.float64) for m, cs in idx.items()}  # min |a|
    count = 0

    def collect(name):
        def fn(output):
            a = output[..., idx[name].to(output.device)].double().reshape(-1, len(idx[name])).cpu()  # (T, k)
            s = stats[name]
            s[0] += a.sum(0)
            s[1] += (a * a).sum(0)
            s[2] = torch.maximum(s[2], a.abs().amax(0))
            s[3] += a.abs().sum(0)
            first[name].append(a[0])
            low[name] = torch.minimum(low[name], a.abs().amin(0))
            if a.shape[0] > 1:
                rest[name] = torch.maximum(rest[name], a[1:].abs().amax(0))

        return fn

    with torch.no_grad(), hooks(model, {m: collect(m) for m in idx}):
        for ids in probes:
            model.base_model(input_ids=ids, use_cache=False)
            count += ids.shape[1]
    out = {}
    for m, cs in idx.items():
        s = stats[m]
        mean = s[0] / count
        std = (s[1] / count - mean**2).clamp_min(0).sqrt()
        a0 = torch.stack(first[m])  # (probes, k)
        for j, c in enumerate(cs.tolist()):
            out[Neuron(m, c)] = ActivationBaseline(
                float(mean[j]),
                float(std[j]),
                float(s[2, j]),
                float(s[3, j] / count),
                float(a0[:, j].mean()),
                float(a0[:, j].abs().min()),
                float(a0[:, j].abs().max()),
                float(rest[m][j]),
                float(low[m][j]),
            )
    return out


def check_fingerprint_nonempty(n_neurons: int) -> None:
    """UsageError for a fingerprint of 0 neurons: it would verify every checkpoint as intact."""
    if n_neurons < 1:
        raise UsageError(
            "the fingerprint would hold 0 slices (no critical set was found and --fingerprint-top is 0), "
            "so it would call every checkpoint intact; use --fingerprint-top >= 1 (nothing was written)"
        )


def write_fingerprint(path: str | Path, result, *, top: int = 64, sign_key: bytes | None = None) -> Path:
    """Fingerprint the critical sets and top-`top` neurons of a ScanResult; atomic write."""
    from achilles_guard.report.documents import atomic_write_bytes

    return atomic_write_bytes(path, fingerprint_bytes(result, top=top, sign_key=sign_key))


def fingerprint_bytes(result, *, top: int = 64, sign_key: bytes | None = None) -> bytes:
    """The fingerprint file's bytes (nothing written): InputError/UsageError before any output exists."""
    from safetensors.torch import save

    if top < 0:
        raise UsageError(f"--fingerprint-top must be >= 0 (got {top})")
    lm, ranking = result.lm, result.primary.ranking
    # the paper's sets, every portfolio attack's set, the top-R of the primary and of every other ranking
    critical = {n for t in result.texts for n in t.result.critical_set}
    found_by: dict[Neuron, set[str]] = {}  # portfolio attacks whose (pruned) set holds the neuron
    for t in result.texts:
        for a in t.portfolio.attacks if t.portfolio else ():
            for n in a.critical_set:
                found_by.setdefault(n, set()).add(a.attack)
    others = [
        n
        for t in result.texts
        if t.portfolio
        for r in t.portfolio.rankings.values()
        if r is not t.ranking
        for n in r.top(min(top, len(r)))
    ]
    chosen = list(
        dict.fromkeys(
            [
                *result.primary.result.critical_set,
                *sorted(critical),
                *sorted(found_by),
                *ranking.top(min(top, len(ranking))),
                *others,
            ]
        )
    )
    check_fingerprint_nonempty(len(chosen))
    by_name = result.candidates.by_name()
    # rank of every neuron: inverse permutation of the ranking order
    position = torch.empty_like(ranking.order)
    position[ranking.order] = torch.arange(len(ranking))
    offsets = result.candidates.offsets
    module_pos = {c.name: i for i, c in enumerate(result.candidates.candidates)}

    baselines = activation_baselines(lm.model, chosen, [t.probe.input_ids for t in result.texts])
    tensors: dict[str, torch.Tensor] = {}
    slices: dict[str, dict] = {}
    neurons_meta = []
    from achilles_guard.formats.gguf import is_gguf

    gguf_source = None
    if is_gguf(lm.directory):  # slices named by GGUF tensor, with their raw blocks (GGUFSliceSource)
        from achilles_guard.formats.gguf import GGUFSliceSource

        gguf_source = GGUFSliceSource(lm.directory)
    with gguf_source or Checkpoint.open(lm.directory) as ckpt:
        for neuron in chosen:
            cand = by_name[neuron.module]
            keys = []
            for ws in producing_slices(lm.model, neuron, cand):
                if gguf_source is not None:
                    keys.append(gguf_source.add(ws, tensors, slices))
                    continue
                keys.append(ws.key)
                if ws.key in tensors:
                    continue
                ckpt_key = resolve_key(ckpt.weight_map, ws.param)
                if ckpt_key is None:
                    raise InputError(
                        f"{lm.directory}: parameter {ws.param} is not in the checkpoint's safetensors files"
                    )
                shape, dtype = ckpt.shape_dtype(ckpt_key)
                value = ckpt.read_slice(ckpt_key, ws.axis, ws.index).contiguous()
                tensors[ws.key] = value
                slices[ws.key] = {
                    "param": ws.param,
                    "checkpoint_key": ckpt_key,
                    "axis": ws.axis,
                    "index": ws.index,
                    "null_value": ws.null_value,
                    "shard": ckpt.shard_of(ckpt_key),
                    "dtype": dtype,
                    "shape": list(shape),
                    "sha256": tensor_sha256(value),
                }
            gidx = int(offsets[module_pos[neuron.module]]) + neuron.channel
            rank = int(position[gidx]) + 1
            base = baselines[neuron]
            neurons_meta.append(
                {
                    "module": neuron.module,
                    "channel": neuron.channel,
                    "layer": cand.layer,
                    "component": cand.component,
                    "rank": rank,
                    "importance": json_number(float(ranking.importance[rank - 1])),
                    "critical": neuron in critical,
                    "attacks": sorted(found_by.get(neuron, ())),  # additive: the portfolio sets it is in
                    "slices": keys,
                    "baseline": asdict(base),
                }
            )
    norms = _norm_weights(lm, result.candidates, tensors, gguf=gguf_source is not None)
    records = _tensor_records(lm, result, sign_key)
    tensors[SKETCH_TENSOR] = torch.from_numpy(records.sketch)
    primary = result.primary.result
    metadata = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "tool_version": __version__,
        "config_sha256": lm.config_sha256,
        "model_type": lm.model_type,
        "architecture": lm.architecture,
        "scan_params": json.dumps(result.params.as_dict(), sort_keys=True),
        "critical_set": json.dumps([{"module": n.module, "channel": n.channel} for n in primary.critical_set]),
        "neurons": json.dumps(neurons_meta),
        "slices": json.dumps(slices, sort_keys=True),
        "baseline": json.dumps(
            {
                "loss": primary.baseline_loss,
                "log10_ppl": log10_ppl(primary.baseline_loss),
                "texts": [t.result.baseline_loss for t in result.texts],
            }
        ),
        "probe_texts": json.dumps([t.probe.text for t in result.texts]),
    }
    if norms:
        metadata["norms"] = json.dumps(norms, sort_keys=True)
    if gguf_source is not None:
        metadata["gguf"] = gguf_source.metadata_json()
    else:
        from achilles_guard.integrity.files import loader_file_digests

        metadata["files"] = json.dumps(loader_file_digests(lm.directory), sort_keys=True)
    metadata["tensors"] = records.metadata_json()
    if sign_key is not None:
        metadata["hmac_sha256"] = _mac(sign_key, tensors, metadata)
    return save(tensors, metadata=metadata)


NORM_PREFIX = "norms/"  # tensor names of the whole norm weights: norms/<parameter>


def _tensor_records(lm, result, sign_key: bytes | None):
    """Every loaded tensor's record (integrity.records), with the rows the rankings' top neurons are produced by."""
    from achilles_guard.formats.source import open_source
    from achilles_guard.integrity.records import RANKED_TOP, build_records

    by_name = result.candidates.by_name()
    rankings = {id(result.primary.ranking): result.primary.ranking}
    for t in result.texts:
        rankings.setdefault(id(t.ranking), t.ranking)
        for r in t.portfolio.rankings.values() if t.portfolio else ():
            rankings.setdefault(id(r), r)
    with open_source(lm.directory) as src:
        names = {e.name for e in src.entries}
        gguf = src.kind == "gguf"
        ranked: dict[str, dict[int, int]] = {}
        for ranking in rankings.values():
            for rank, neuron in enumerate(ranking.top(min(RANKED_TOP, len(ranking))), 1):
                for ws in producing_slices(lm.model, neuron, by_name.get(neuron.module)):
                    name = src.layout.gguf_name(ws.param) if gguf else resolve_key(src.weight_map, ws.param)
                    if ws.axis != 0 or name not in names:
                        continue  # a column (GPT-2 Conv1D) is no row of the row view
                    rows = ranked.setdefault(name, {})
                    rows[ws.index] = min(rows.get(ws.index, rank), rank)
        return build_records(src, sign_key=sign_key, ranked=ranked)


def _norm_weights(lm, candidates, tensors: dict, *, gguf: bool = False) -> dict:
    """Add every candidate norm module's whole weight and bias to `tensors` (a few kB per layer: the runtime
    guard recomputes any norm channel from them); their records for the metadata. From the checkpoint's exact
    bytes; for a GGUF file, the values transformers loaded from it (float32; the file is the one scanned)."""
    from contextlib import nullcontext

    from achilles_guard.engine.adapters import adapter_for

    offset = adapter_for(lm.model_type).norm_weight_offset
    out = {}
    norm_modules = [c.name for c in candidates.candidates if c.kind == "norm"]
    if not norm_modules:
        return out
    with nullcontext() if gguf else Checkpoint.open(lm.directory) as ckpt:
        for module in norm_modules:
            for pname, p in lm.model.get_submodule(module).named_parameters(recurse=False):
                param = f"{module}.{pname}"
                key = param if gguf else resolve_key(ckpt.weight_map, param)
                if key is None or pname not in ("weight", "bias"):
                    continue
                value = (p.detach().float().cpu() if gguf else ckpt.read(key)).contiguous()
                if value.dim() != 1:
                    continue
                tensors[NORM_PREFIX + param] = value
                out[param] = {
                    "module": module,
                    "role": pname,
                    "checkpoint_key": key,
                    "shard": Path(lm.directory).name if gguf else ckpt.shard_of(key),
                    "offset": offset if pname == "weight" else 0.0,
                    "sha256": tensor_sha256(value),
                }
    return out


def _load_norms(tensors: dict, metadata: dict, path) -> dict:
    """{module: NormWeights} from the fingerprint's `norms` section (absent in older fingerprints)."""
    records = json.loads(metadata.get("norms", "{}"))
    parts: dict[str, dict] = {}
    for param, rec in records.items():
        value = tensors.get(NORM_PREFIX + param)
        if value is None:
            raise InputError(f"fingerprint {path}: norm weight {param} is recorded but its tensor is missing; corrupt")
        if value.dim() != 1 or tensor_sha256(value) != rec["sha256"]:
            raise InputError(f"fingerprint {path}: norm weight {param} does not match its recorded sha256; corrupt")
        parts.setdefault(rec["module"], {})[rec["role"]] = (value, float(rec["offset"]))
    out = {}
    for module, roles in parts.items():
        if "weight" not in roles:
            continue
        weight, offset = roles["weight"]
        bias = roles.get("bias", (None, 0.0))[0]
        if bias is not None and bias.shape != weight.shape:
            raise InputError(f"fingerprint {path}: norm {module}: weight and bias shapes differ; corrupt")
        out[module] = NormWeights(module, weight, bias, offset)
    return out


def _load_records(tensors: dict, metadata: dict, path) -> TensorRecords | None:
    text = metadata.get("tensors")
    if text is None:
        return None
    sketch = tensors.get(SKETCH_TENSOR)
    if sketch is None:
        raise InputError(f"fingerprint {path}: tensor records without their sketch tensor; corrupt")
    if sketch.dtype != torch.float32:
        raise InputError(f"fingerprint {path}: the sketch tensor is {sketch.dtype}, not float32; corrupt")
    return TensorRecords.from_metadata(text, sketch.numpy(), str(path))


def load_fingerprint(path: str | Path, *, verify_key: bytes | None = None) -> Fingerprint:
    """Read and check a fingerprint; InputError on anything malformed, SignatureError on a bad HMAC."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"fingerprint {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # SafetensorError, OSError...
        raise InputError(f"fingerprint {path}: not a readable safetensors file ({first_line(err)})") from None
    if metadata.get("format") != FORMAT:
        raise InputError(
            f"fingerprint {path}: not an achilles-guard fingerprint (metadata format={metadata.get('format')!r})"
        )
    version = metadata.get("schema_version", "0")
    if not (isinstance(version, str) and version.isdigit()):
        raise InputError(f"fingerprint {path}: schema_version {version!r} is not a whole number; the file is corrupt")
    if int(version) > SCHEMA_VERSION:
        raise InputError(
            f"fingerprint {path}: schema {metadata['schema_version']} is newer than this guard understands; upgrade "
            "achilles-guard"
        )
    if verify_key is not None:
        claimed = metadata.get("hmac_sha256")
        if not claimed:
            raise SignatureError(f"fingerprint {path}: not signed, but --verify-key was given; refusing to trust it")
        if not hmac.compare_digest(claimed, _mac(verify_key, tensors, metadata)):
            raise SignatureError(f"fingerprint {path}: HMAC signature mismatch (wrong key, or the file was modified)")
    try:
        slices = {
            k: SliceRecord(key=k, shape=tuple(v.pop("shape")), **v) for k, v in json.loads(metadata["slices"]).items()
        }
        neurons = tuple(
            NeuronRecord(
                neuron=Neuron(n["module"], n["channel"]),
                layer=n["layer"],
                component=n["component"],
                rank=n["rank"],
                importance=n["importance"] if n["importance"] is not None else float("inf"),
                critical=n["critical"],
                slices=tuple(n["slices"]),
                baseline=ActivationBaseline(**n["baseline"]),
                attacks=tuple(n.get("attacks", ())),
            )
            for n in json.loads(metadata["neurons"])
        )
        critical = tuple(Neuron(n["module"], n["channel"]) for n in json.loads(metadata["critical_set"]))
        baseline = json.loads(metadata["baseline"])
        fp = Fingerprint(
            path=str(path),
            tensors=tensors,
            slices=slices,
            neurons=neurons,
            critical_set=critical,
            config_sha256=metadata["config_sha256"],
            model_type=metadata["model_type"],
            architecture=metadata["architecture"],
            tool_version=metadata["tool_version"],
            scan_params=json.loads(metadata["scan_params"]),
            baseline_loss=float(baseline["loss"]),
            probe_texts=tuple(json.loads(metadata["probe_texts"])),
            signed="hmac_sha256" in metadata,
            metadata=metadata,
            norms=_load_norms(tensors, metadata, path),
            records=_load_records(tensors, metadata, path),
            files=_load_files(metadata),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"fingerprint {path}: malformed metadata ({type(err).__name__}: {err})") from None
    if not slices or not neurons:
        raise InputError(
            f"fingerprint {path}: holds 0 slices, so it would call every checkpoint intact; refusing to verify against "
            "it"
        )
    for key, record in slices.items():
        if key not in tensors or tensor_sha256(tensors[key]) != record.sha256:
            raise InputError(
                f"fingerprint {path}: slice {key} does not match its recorded sha256; the fingerprint is corrupt"
            )
    return fp


def _load_files(metadata: dict[str, str]) -> dict[str, str] | None:
    """The recorded loader files, {name: sha256}; ValueError (malformed metadata) for anything else."""
    if "files" not in metadata:
        return None
    files = json.loads(metadata["files"])
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()
    ):
        raise ValueError("files: expected {name: sha256 hex}")
    return files


def _mac(key: bytes, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """HMAC-SHA256 over the metadata (minus the MAC) and every tensor's name, dtype, shape and bytes."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    body = {k: v for k, v in metadata.items() if k != "hmac_sha256"}
    mac.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        mac.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        mac.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return mac.hexdigest()
