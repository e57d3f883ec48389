"""RED-TEAM HELPER behind `guard tamper`: write a deliberately sabotaged copy of a checkpoint.

It applies the PCICN weight attack (or a variant) to chosen neurons' producing weight slices so a
team can prove that its deployment gate (`guard verify-checkpoint`, `guard monitor`) catches it.
The input is never modified: the copy is built in a temporary directory next to `--out` and
renamed into place; the shard layout and `model.safetensors.index.json` are kept. The copy carries
`TAMPERED_BY_GUARD.json` saying what was done.

    tamper_checkpoint(src, out, targets, kind="scale", scale=0.3)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from achilles_guard.engine.neurons import Neuron, parse_neuron
from achilles_guard.errors import InputError, UsageError, first_line
from achilles_guard.integrity.tamper_options import BANNER, TamperKind, check_kind_options, check_out

__all__ = [
    "TamperKind",
    "TamperTarget",
    "select_targets",
    "tamper_checkpoint",
    "check_out",
    "check_kind_options",
    "scaled_slice",
    "MARKER",
    "BANNER",
]

MARKER = "TAMPERED_BY_GUARD.json"


@dataclass(frozen=True)
class TamperTarget:
    """One weight slice to change: `checkpoint_key[index]` along `axis`."""

    neuron: Neuron
    checkpoint_key: str
    axis: int
    index: int
    null_value: float = 0.0


def scaled_slice(value: torch.Tensor, factor: float, null_value: float = 0.0) -> torch.Tensor:
    """The one meaning of "scale": multiply the slice by `factor`, measured from its null value.

    `null + factor · (value − null)`: for an ordinary slice (null 0) that is `factor · value`; for a
    `1 + w` norm weight (null −1) it multiplies the effective weight `1 + w`. Factor 0 gives the null
    value, the paper's zeroing attack. Computed in float64, returned in `value`'s dtype.
    """
    wide = value.double()  # (k,)
    if null_value == 0:
        return (wide * factor).to(value.dtype)  # exactly factor · value, -0.0 included
    return (null_value + factor * (wide - null_value)).to(value.dtype)


def select_targets(src: Path, source: Path | None, explicit: list[str], top: int | None) -> list[TamperTarget]:
    """Resolve the chosen neurons to checkpoint weight slices."""
    from achilles_guard.formats.checkpoint import Checkpoint, resolve_key

    if (source is None) == (not explicit):
        raise UsageError("give either --neurons REPORT_OR_FINGERPRINT or --neuron MODULE[CHANNEL] (exactly one way)")
    if top is not None and top < 1:
        raise UsageError(f"--top must be >= 1 (got {top})")
    with Checkpoint.open(src) as ckpt:
        weight_map = dict(ckpt.weight_map)
    if source is not None and source.suffix == ".safetensors":
        from achilles_guard.formats.checkpoint import find_slice

        # the same slice lookup as verify-checkpoint and repair
        return targets_from_fingerprint(source, top, lambda record: find_slice(weight_map, record))
    chosen = neurons_from_report(source, top) if source is not None else [neuron_option(s) for s in explicit]
    model = _meta_model(src)
    targets = []
    for n in chosen:
        slices = neuron_slices(model, n)
        for ws in slices:
            try:
                size = model.get_parameter(ws.param).shape[ws.axis]
            except (AttributeError, IndexError):
                continue
            if not 0 <= ws.index < size:
                raise InputError(
                    f"neuron {n}: channel {n.channel} is out of range ({ws.param} has {size} along axis {ws.axis})"
                )
        for ws in slices:
            key = resolve_key(weight_map, ws.param)
            if key is None:
                raise InputError(f"{src}: parameter {ws.param} (producing {n}) is not in the checkpoint")
            targets.append(TamperTarget(n, key, ws.axis, ws.index, ws.null_value))
    return targets


def neuron_slices(model, n: Neuron) -> tuple:
    """The weight slices that produce neuron `n` of a (meta) model, in either file format's tamper;
    InputError, one line, for a module the model lacks, a channel out of range, or a neuron no weight makes."""
    from achilles_guard.engine.neurons import producing_slices

    try:
        slices = producing_slices(model, n)
    except AttributeError:
        raise InputError(f"neuron {n}: the model has no module {n.module}") from None
    except (IndexError, ValueError) as err:
        raise InputError(
            f"neuron {n}: channel {n.channel} is out of range for {n.module} ({first_line(err)})"
        ) from None
    if not slices:
        raise InputError(f"neuron {n}: no weight produces it (not a linear, norm or activation module)")
    return slices


def tamper_checkpoint(
    src: str | Path,
    out: str | Path,
    targets: list[TamperTarget],
    *,
    kind: TamperKind = TamperKind.zero,
    scale: float = 0.3,
    noise: float = 0.1,
    seed: int = 0,
) -> Path:
    """Copy `src` to `out` with every target slice changed; atomic (temp dir, then rename)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from achilles_guard.formats.checkpoint import Checkpoint

    src, out = Path(src), Path(out)
    kind = TamperKind(kind)
    if not targets:
        raise UsageError("no weight slice to tamper with")
    check_out(src, out)
    with Checkpoint.open(src) as ckpt:
        shard_of = {t.checkpoint_key: ckpt.shard_of(t.checkpoint_key) for t in targets}
    by_shard: dict[str, list[TamperTarget]] = {}
    for t in targets:
        by_shard.setdefault(shard_of[t.checkpoint_key], []).append(t)
    generator = torch.Generator().manual_seed(seed)
    from achilles_guard.formats.staging import staged_dir

    with staged_dir(out) as tmp:
        for item in src.iterdir():
            if item.name in by_shard:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        for shard, shard_targets in by_shard.items():
            with safe_open(str(src / shard), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}
            for t in shard_targets:
                view = tensors[t.checkpoint_key].select(t.axis, t.index)  # (k,) view into the tensor
                view.copy_(_tampered(view, t, kind, scale, noise, generator))
            save_file(tensors, str(tmp / shard), metadata=metadata)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "warning": BANNER,
                    "source": str(src),
                    "kind": kind.value,
                    "scale": scale if kind is TamperKind.scale else None,
                    "noise": noise if kind is TamperKind.noise else None,
                    "slices": [
                        {
                            "neuron": str(t.neuron),
                            "module": t.neuron.module,
                            "channel": t.neuron.channel,
                            "key": t.checkpoint_key,
                            "axis": t.axis,
                            "index": t.index,
                            "shard": shard_of[t.checkpoint_key],
                        }
                        for t in targets
                    ],
                },
                indent=2,
            )
            + "\n"
        )
    return out


def _tampered(
    view: torch.Tensor, t: TamperTarget, kind: TamperKind, scale: float, noise: float, generator
) -> torch.Tensor:
    value = view.double()
    if kind is TamperKind.zero:
        return torch.full_like(view, t.null_value)
    if kind is TamperKind.scale:
        return scaled_slice(view, scale, t.null_value)
    if kind is TamperKind.sign_flip:
        return (-value).to(view.dtype)
    eps = torch.randn(value.shape, generator=generator, dtype=torch.float64)
    eps = eps * (noise * value.norm() / eps.norm().clamp_min(1e-30))
    return (value + eps).to(view.dtype)


def targets_from_fingerprint(path: Path, top: int | None, find, where: str = "the checkpoint") -> list[TamperTarget]:
    """The fingerprint's critical set (or its top-N ranked neurons) as tamper targets; `find(SliceRecord)` names
    the tensor holding each slice in the target file (None: not there), for safetensors and GGUF alike."""
    from achilles_guard.integrity.fingerprint import load_fingerprint

    fp = load_fingerprint(path)
    records = (
        sorted(fp.neurons, key=lambda r: r.rank)[:top]
        if top
        else [r for r in fp.neurons if r.critical and r.neuron in set(fp.critical_set)]
    )
    if not records:
        raise InputError(f"{path}: names no critical set (the scan did not converge); use --top N")
    targets = []
    for r in records:
        for key in r.slices:
            s = fp.slices[key]
            name = find(s)
            if name is None:
                raise InputError(f"parameter {s.param} (producing {r.neuron}) is not in {where}")
            targets.append(TamperTarget(r.neuron, name, s.axis, s.index, s.null_value))
    return targets


def neurons_from_report(path: Path, top: int | None) -> list[Neuron]:
    if not path.is_file():
        raise InputError(f"--neurons {path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["ranking"][:top] if top else doc["critical_set"]
        chosen = [Neuron(str(e["module"]), int(e["channel"])) for e in entries]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"--neurons {path}: not a guard scan report.json or fingerprint ({type(err).__name__}: {err})"
        ) from None
    if not chosen:
        raise InputError(f"--neurons {path}: names no critical set (the scan did not converge); use --top N")
    return chosen


def neuron_option(spec: str) -> Neuron:
    try:
        return parse_neuron(spec)
    except ValueError:
        raise UsageError(
            f"--neuron {spec!r}: use MODULE[CHANNEL] or MODULE:CHANNEL, e.g. model.layers.0.mlp.down_proj[11]"
        ) from None


def _meta_model(src: Path):
    """The model's module tree on the meta device: structure only, no weights read, no code run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from achilles_guard.formats.load import check_config_size, check_model_dir, quiet_transformers

    check_config_size(src, check_model_dir(src))
    quiet_transformers()
    config = AutoConfig.from_pretrained(str(src), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
