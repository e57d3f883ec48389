"""`guard scan`: run PCICN on a model, report the critical set, write artifacts, gate a deployment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from achilles_guard.cli.app import app
from achilles_guard.cli.common import (
    AllowPickleOption,
    AllowShortOption,
    AlphaOption,
    AttacksOption,
    ComponentsOption,
    DeviceOption,
    DtypeOption,
    EpsilonOption,
    FingerprintTopOption,
    Format,
    MaxNeuronsOption,
    SamplesOption,
    SeedOption,
    SignKeyOption,
    TextFileOption,
    TextOption,
    TrustRemoteCodeOption,
    guarded,
    info,
    prepare_out_dir,
    progress_bar,
    stdout,
)
from achilles_guard.engine.paper import PAPER
from achilles_guard.errors import EXIT_FINDING, EXIT_OK, InputError, UsageError
from achilles_guard.formats.staging import publish_files

__all__ = ["scan_command"]


def _check_fingerprintable(directory) -> None:
    """Before the long scan: the fingerprint reads safetensors slices, so pickle-only weights cannot be
    fingerprinted."""
    from achilles_guard.formats.checkpoint import check_readable_weights

    try:
        check_readable_weights(directory)
    except InputError as err:
        raise InputError(
            f"{err}; a scan writes report.json and fingerprint.safetensors together, so nothing was written"
        ) from None


@app.command("scan")
@guarded
def scan_command(
    model_dir: Optional[str] = typer.Argument(
        None, help="Local Hugging Face model directory (or hub id with network).", show_default=False
    ),
    demo: bool = typer.Option(
        False, "--demo", help="Scan the built-in synthetic demonstration model (built once into the cache)."
    ),
    text: List[str] = TextOption(),
    text_file: List[Path] = TextFileOption(),
    alpha: float = AlphaOption(),
    samples: int = SamplesOption(),
    seed: int = SeedOption(),
    epsilon: float = EpsilonOption(),
    step: int = typer.Option(PAPER.step, help="Search step Δn."),
    max_neurons: int = MaxNeuronsOption(),
    components: str = ComponentsOption(),
    ranking: str = typer.Option("pcicn", help="Stage-1 ranking: pcicn, activation, gradient or random."),
    mask_scale: float = typer.Option(PAPER.mask_scale, help="β: a masked neuron's output becomes β × its value."),
    keep: int = typer.Option(1000, help="How many top-ranked neurons report.json lists."),
    attacks: str = AttacksOption(),
    greedy_pool: Optional[int] = typer.Option(
        None, "--greedy-pool", help="Greedy's pool: the top-M of each ranking (default 64).", show_default=False
    ),
    allow_short: bool = AllowShortOption(),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    out: Path = typer.Option(Path("guard-out"), help="Directory for report.json (and the fingerprint, SARIF)."),
    format: Format = typer.Option(Format.table, "--format", help="What stdout carries: table, json or sarif."),
    fail_under: Optional[int] = typer.Option(None, help="Gate: exit 1 when a critical set has <= N neurons."),
    fingerprint_top: int = FingerprintTopOption(),
    sign_key: Optional[str] = SignKeyOption(),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
) -> None:
    """Find the model's critical neurons with PCICN and gate on how few there are.

    Writes OUT/report.json (schema achilles-guard/scan/v1) and OUT/fingerprint.safetensors
    atomically; stdout carries only the result. Exit 0 ok, 1 gate failed (--fail-under), 2 bad input, 3 runtime failure.
    """
    # torch and transformers load here, not when `guard` starts (`guard fleet` and --help never need them)
    from achilles_guard.engine.scan import ScanParams, read_probe_texts, run_scan, tokenize_probe
    from achilles_guard.formats.load import load_model
    from achilles_guard.integrity.fingerprint import fingerprint_bytes, read_key
    from achilles_guard.report.documents import dumps, scan_report, scan_sarif

    if demo == (model_dir is not None):
        raise UsageError("give either MODEL_DIR or --demo (exactly one)")
    if fail_under is not None and fail_under < 0:
        raise UsageError(f"--fail-under must be >= 0 (got {fail_under})")
    params = ScanParams(
        alpha=alpha, samples=samples, seed=seed, epsilon=epsilon, step=step, max_neurons=max_neurons,
        components=components, ranking=ranking, mask_scale=mask_scale, keep=keep,
        attacks=attacks, greedy_pool=greedy_pool,
    ).validated()
    if fingerprint_top < 0:
        raise UsageError(f"--fingerprint-top must be >= 0 (got {fingerprint_top})")
    key = read_key(sign_key) if sign_key else None
    raw_texts = read_probe_texts(text, text_file)
    out = prepare_out_dir(out)
    t0 = time.perf_counter()
    if demo:
        from achilles_guard.engine.demo import demo_model_dir

        info("[dim]preparing the synthetic demonstration model (built once, then cached)…[/]")
        model_dir = str(demo_model_dir())
    lm = load_model(
        model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    _check_fingerprintable(lm.directory)
    load_s = time.perf_counter() - t0
    probes = [tokenize_probe(lm, name, body, allow_short=allow_short) for name, body in raw_texts]
    with progress_bar() as update:
        result = run_scan(lm, probes, params, progress=update)
    result = result.with_load_time(load_s)

    doc = scan_report(result, demo=demo)
    # every output is produced in memory first, then published together (staging dir + renames)
    files = {"report.json": dumps(doc).encode(),
             "fingerprint.safetensors": fingerprint_bytes(result, top=fingerprint_top, sign_key=key)}
    if format is Format.sarif:
        files["report.sarif"] = dumps(scan_sarif(doc, fail_under=fail_under)).encode()
    written = publish_files(out, files)

    console = stdout()
    if format is Format.json:
        console.file.write(dumps(doc))
    elif format is Format.sarif:
        console.file.write(dumps(scan_sarif(doc, fail_under=fail_under)))
    else:
        from achilles_guard.report.tables import scan_summary

        console.print(scan_summary(doc, fail_under=fail_under))
        console.print(f"[dim]wrote {', '.join(str(p) for p in written)}[/]")
    smallest = result.gate_size
    gate_failed = fail_under is not None and smallest is not None and smallest <= fail_under
    raise typer.Exit(EXIT_FINDING if gate_failed else EXIT_OK)
