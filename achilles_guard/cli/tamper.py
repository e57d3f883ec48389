"""`guard tamper`: RED-TEAM HELPER. Writes a deliberately sabotaged copy of a checkpoint.

It applies the PCICN weight attack (or a variant) to chosen neurons' producing weight slices so a
team can prove that its deployment gate (`guard verify-checkpoint`, `guard monitor`) catches it.
The input is never modified: the copy is built in a temporary directory next to `--out` and
renamed into place; the shard layout and `model.safetensors.index.json` are kept. The copy carries
`TAMPERED_BY_GUARD.json` saying what was done.

    tamper_checkpoint(src, out, targets, kind="scale", scale=0.3)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.table import Table

from achilles_guard.cli import app
from achilles_guard.cli.common import guarded, stderr, stdout
from achilles_guard.errors import InputError, UsageError, first_line
from achilles_guard.neurons import Neuron

__all__ = ["TamperKind", "TamperTarget", "select_targets", "tamper_checkpoint", "check_out", "tamper_command", "MARKER"]

MARKER = "TAMPERED_BY_GUARD.json"
BANNER = "RED-TEAM TOOL: this writes a deliberately SABOTAGED copy of the checkpoint, for testing gates. Never deploy it."


class TamperKind(str, Enum):
    zero = "zero"  # slice := its null value (the paper's attack)
    scale = "scale"  # slice := β · slice (the paper's β study)
    sign_flip = "sign-flip"  # slice := -slice
    noise = "noise"  # slice += Gaussian noise with ||noise|| = rel · ||slice||


@dataclass(frozen=True)
class TamperTarget:
    """One weight slice to change: `checkpoint_key[index]` along `axis`."""

    neuron: Neuron
    checkpoint_key: str
    axis: int
    index: int
    null_value: float = 0.0


@app.command("tamper")
@guarded
def tamper_command(
    checkpoint_dir: Path = typer.Argument(..., help="Checkpoint to copy (never modified).", show_default=False),
    out: Path = typer.Option(..., "--out", help="Where the sabotaged copy goes (must not exist).", show_default=False),
    neurons: Optional[Path] = typer.Option(None, "--neurons", help="report.json or fingerprint.safetensors naming the neurons."),
    neuron: List[str] = typer.Option([], "--neuron", help="A neuron as MODULE:CHANNEL (repeatable)."),
    top: Optional[int] = typer.Option(None, help="With --neurons: the top-N ranked neurons instead of the critical set."),
    kind: TamperKind = typer.Option(TamperKind.zero, "--kind", help="zero, scale, sign-flip or noise."),
    scale: float = typer.Option(0.3, help="--kind scale: the factor β."),
    noise: float = typer.Option(0.1, help="--kind noise: relative L2 size of the added noise."),
    seed: int = typer.Option(0, help="--kind noise: seed."),
) -> None:
    """RED-TEAM HELPER: write a sabotaged copy of a checkpoint to test your gates. Never deploy it.

    Zeroes (or scales, sign-flips, perturbs) the weight slices that produce the chosen neurons:
    the critical set of a report.json / fingerprint, its top-N, or explicit --neuron MODULE:CHANNEL.
    Refuses to write over its input or an existing --out. Exit 0 written, 2 bad input.
    """
    import math

    if kind is TamperKind.scale and (not math.isfinite(scale) or scale == 1.0):
        raise UsageError(f"--scale {scale}: must be a finite factor other than 1.0 (1.0 changes nothing; nothing was written)")
    if kind is TamperKind.noise and not (math.isfinite(noise) and noise > 0):
        raise UsageError(f"--noise {noise}: must be a finite number > 0 (nothing was written)")
    check_out(checkpoint_dir, out)
    from achilles_guard.gguf_file import is_gguf

    gguf = is_gguf(checkpoint_dir)  # a .gguf: its quantized blocks are edited in a copy (gguf_tamper.py)
    if gguf:
        from achilles_guard.gguf_tamper import select_gguf_targets, tamper_gguf

        targets = select_gguf_targets(checkpoint_dir, neurons, neuron, top)
    else:
        targets = select_targets(checkpoint_dir, neurons, neuron, top)
    stderr().print(f"[bold yellow]{BANNER}[/]", soft_wrap=True)  # after every input check: errors stay one line
    if gguf:
        written = tamper_gguf(checkpoint_dir, out, targets, kind=kind.value, scale=scale, noise=noise, seed=seed)
    else:
        written = tamper_checkpoint(checkpoint_dir, out, targets, kind=kind, scale=scale, noise=noise, seed=seed)
    table = Table(title=f"RED-TEAM: sabotaged copy written to {written} ({kind.value})", title_justify="left")
    for col in ("neuron", "slice", "axis", "index"):
        table.add_column(col)
    for t in targets:
        table.add_row(str(t.neuron), t.checkpoint_key, str(t.axis), str(t.index))
    console = stdout()
    console.print(table)
    console.print(f"[bold red]{BANNER}[/]", soft_wrap=True)


def select_targets(src: Path, source: Path | None, explicit: list[str], top: int | None) -> list[TamperTarget]:
    """Resolve the chosen neurons to checkpoint weight slices."""
    from achilles_guard.checkpoint import Checkpoint, resolve_key

    if (source is None) == (not explicit):
        raise UsageError("give either --neurons REPORT_OR_FINGERPRINT or --neuron MODULE:CHANNEL (exactly one way)")
    if top is not None and top < 1:
        raise UsageError(f"--top must be >= 1 (got {top})")
    with Checkpoint.open(src) as ckpt:
        weight_map = dict(ckpt.weight_map)
    if source is not None and source.suffix == ".safetensors":
        return _targets_from_fingerprint(source, top, weight_map)
    chosen = _neurons_from_report(source, top) if source is not None else [_parse_neuron(s) for s in explicit]
    model = _meta_model(src)
    from achilles_guard.neurons import producing_slices

    targets = []
    for n in chosen:
        try:
            slices = producing_slices(model, n)
        except AttributeError:
            raise InputError(f"neuron {n}: the model has no module {n.module}") from None
        except (IndexError, ValueError) as err:
            raise InputError(f"neuron {n}: channel {n.channel} is out of range for {n.module} ({first_line(err)})") from None
        for ws in slices:
            try:
                size = model.get_parameter(ws.param).shape[ws.axis]
            except (AttributeError, IndexError):
                continue
            if not 0 <= ws.index < size:
                raise InputError(f"neuron {n}: channel {n.channel} is out of range ({ws.param} has {size} along axis {ws.axis})")
        if not slices:
            raise InputError(f"neuron {n}: no weight produces it (not a linear, norm or activation module)")
        for ws in slices:
            key = resolve_key(weight_map, ws.param)
            if key is None:
                raise InputError(f"{src}: parameter {ws.param} (producing {n}) is not in the checkpoint")
            targets.append(TamperTarget(n, key, ws.axis, ws.index, ws.null_value))
    return targets


def tamper_checkpoint(
    src: str | Path, out: str | Path, targets: list[TamperTarget], *, kind: TamperKind = TamperKind.zero,
    scale: float = 0.3, noise: float = 0.1, seed: int = 0,
) -> Path:
    """Copy `src` to `out` with every target slice changed; atomic (temp dir, then rename)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from achilles_guard.checkpoint import Checkpoint

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
    from achilles_guard.staging import staged_dir

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
        (tmp / MARKER).write_text(json.dumps({
            "warning": BANNER, "source": str(src), "kind": kind.value, "scale": scale if kind is TamperKind.scale else None,
            "noise": noise if kind is TamperKind.noise else None,
            "slices": [{"neuron": str(t.neuron), "module": t.neuron.module, "channel": t.neuron.channel,
                        "key": t.checkpoint_key, "axis": t.axis, "index": t.index, "shard": shard_of[t.checkpoint_key]}
                       for t in targets],
        }, indent=2) + "\n")
    return out


def check_out(src: Path, out: Path) -> None:
    """Refuse an --out that exists (the input included), sits inside the input, or has no parent."""
    src, out = Path(src), Path(out)
    if out.exists() or out.resolve() == src.resolve():
        raise InputError(f"--out {out}: already exists; guard tamper refuses to write over anything (its input included)")
    if src.resolve() in out.resolve().parents:
        raise InputError(f"--out {out}: is inside the input checkpoint; guard tamper refuses to write into its input")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: parent directory {out.parent} does not exist")


def _tampered(view: torch.Tensor, t: TamperTarget, kind: TamperKind, scale: float, noise: float, generator) -> torch.Tensor:
    value = view.double()
    if kind is TamperKind.zero:
        return torch.full_like(view, t.null_value)
    if kind is TamperKind.scale:
        return (value * scale).to(view.dtype)
    if kind is TamperKind.sign_flip:
        return (-value).to(view.dtype)
    eps = torch.randn(value.shape, generator=generator, dtype=torch.float64)
    eps = eps * (noise * value.norm() / eps.norm().clamp_min(1e-30))
    return (value + eps).to(view.dtype)


def _targets_from_fingerprint(path: Path, top: int | None, weight_map: dict) -> list[TamperTarget]:
    from achilles_guard.checkpoint import find_slice
    from achilles_guard.fingerprint import load_fingerprint

    fp = load_fingerprint(path)
    records = sorted(fp.neurons, key=lambda r: r.rank)[:top] if top else [r for r in fp.neurons if r.critical and r.neuron in set(fp.critical_set)]
    if not records:
        raise InputError(f"{path}: names no critical set (the scan did not converge); use --top N")
    targets = []
    for r in records:
        for key in r.slices:
            s = fp.slices[key]
            name = find_slice(weight_map, s)  # the same lookup as verify-checkpoint and repair
            if name is None:
                raise InputError(f"parameter {s.param} (producing {r.neuron}) is not in the checkpoint")
            targets.append(TamperTarget(r.neuron, name, s.axis, s.index, s.null_value))
    return targets


def _neurons_from_report(path: Path, top: int | None) -> list[Neuron]:
    if not path.is_file():
        raise InputError(f"--neurons {path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["ranking"][:top] if top else doc["critical_set"]
        chosen = [Neuron(str(e["module"]), int(e["channel"])) for e in entries]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--neurons {path}: not a guard scan report.json or fingerprint ({type(err).__name__}: {err})") from None
    if not chosen:
        raise InputError(f"--neurons {path}: names no critical set (the scan did not converge); use --top N")
    return chosen


def _parse_neuron(spec: str) -> Neuron:
    module, sep, channel = spec.rpartition(":")
    if not sep or not module or not channel.isdigit():
        raise UsageError(f"--neuron {spec!r}: use MODULE:CHANNEL, e.g. model.layers.0.mlp.down_proj:11")
    return Neuron(module, int(channel))


def _meta_model(src: Path):
    """The model's module tree on the meta device: structure only, no weights read, no code run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from achilles_guard.model import check_config_size, check_model_dir, quiet_transformers

    check_config_size(src, check_model_dir(src))
    quiet_transformers()
    config = AutoConfig.from_pretrained(str(src), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
