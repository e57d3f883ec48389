"""`guard fleet scan|verify`: gate a whole model registry with the single-model commands (docs/fleet.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from achilles_guard.cli.app import app
from achilles_guard.cli.common import (
    AllowPickleOption,
    AllowShortOption,
    AlphaOption,
    AttacksOption,
    ComponentsOption,
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
    rows_progress,
    stderr,
    stdout,
)
from achilles_guard.errors import EXIT_OK, InputError, UsageError

__all__ = ["fleet_app", "fleet_scan_command", "fleet_verify_command"]

_EXIT_HELP = (
    "Exit code: the worst over the models, 3 runtime failure (crash, out of memory, killed worker, "
    "time-out) > 2 bad input (unloadable or unsafe model, missing fingerprint) > 1 finding (gate failed, "
    "tampered) > 0 all ok; 130 interrupted (finished models are kept; rerun to do the rest)."
)

fleet_app = typer.Typer(
    name="fleet", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Scan or verify every model of a registry (a folder tree or a list file); resumable, local or on Ray.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(fleet_app, name="fleet")

_SOURCE_HELP = ("A folder (every model directory with config.json + weights, and every .gguf, under it) or a "
                "list file (one model path per line, # comments).")


def _opts() -> dict:  # the options both commands share
    return dict(
        jobs=typer.Option(1, "--jobs", help="Models at a time (local worker processes, or Ray CPUs for --ray local)."),
        ray=typer.Option(None, "--ray", help="Run one Ray task per model: local (a private instance), auto (the "
                         "cluster RAY_ADDRESS names) or a cluster address. Needs achilles-guard[ray].",
                         show_default=False),
        force=typer.Option(False, "--force", help="Re-run every model, even those unchanged since their last result."),
        model_timeout=typer.Option(None, "--model-timeout", help="Kill a model's worker after this many seconds "
                                   "(its row: runtime failure).", show_default=False),
        pushgateway=typer.Option(None, "--pushgateway", help="Push every model's row to this Prometheus "
                                 "Pushgateway (job achilles_guard_fleet, grouped by model id).", show_default=False),
        format=typer.Option(Format.table, "--format", help="What stdout carries: table, json (fleet.json) or sarif "
                            "(fleet.sarif)."),
    )


_O = _opts()


@contextmanager
def _locked(out: Path):
    """One fleet run per OUT at a time (a second one would race on the same model directories)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".fleet.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"--out {out}: another guard fleet run is using it") from None
        yield
    finally:
        handle.close()


def _key_id(key: bytes | None) -> str | None:
    """A tag that changes with the signing key without revealing it (part of the cache key)."""
    return None if key is None else hmac.new(key, b"achilles-guard fleet cache", hashlib.sha256).hexdigest()[:16]


def _render(doc: dict, models) -> Table:
    rel = {str(e.path): e.rel for e in models}
    table = Table(title=f"guard fleet {doc['command']}: {len(doc['models'])} model(s), exit {doc['exit_code']}",
                  title_justify="left")
    for col, justify in (("model", "left"), ("n*", "right"), ("verdict", "left"), ("seconds", "right"),
                         ("note", "left")):
        table.add_column(col, justify=justify)
    for row in doc["models"]:
        code = row["exit_code"]
        style = "green" if code == 0 else "yellow" if code is None else "bold red"
        note = "cached" if row["cached"] else (row["error"] or "")
        table.add_row(rel.get(row["path"], row["path"]), "-" if row["n_star"] is None else str(row["n_star"]),
                      Text(row["verdict"], style=style),
                      "-" if row["seconds"] is None else f"{row['seconds']:.1f}", Text(note, style="dim"))
    return table


def _drive(job, source: Path, *, jobs: int, ray: Optional[str], device: str, format: Format,
           pushgateway: Optional[str]) -> None:
    from achilles_guard.fleet import backends, summary
    from achilles_guard.fleet.inventory import discover
    from achilles_guard.report.documents import dumps

    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1 (got {jobs})")
    if job.timeout_s is not None and not job.timeout_s > 0:
        raise UsageError(f"--model-timeout must be > 0 (got {job.timeout_s})")
    if ray is not None:
        try:
            import ray as _ray  # noqa: F401
        except ImportError:
            raise UsageError(backends.RAY_HINT) from None
    models = discover(source, exclude=tuple(p for p in (job.out, job.fingerprints) if p is not None))
    prepare_out_dir(job.out)
    results: dict = {}
    t0 = time.perf_counter()
    with _locked(job.out):
        if swept := backends.sweep_staging(job.out):
            info(f"[dim]removed {swept} half-written model output(s) of an interrupted run[/]")
        summary.write(job, str(source), models, results, 0.0, sarif=False)
        with rows_progress(f"fleet {job.command}") as update:
            update(0, len(models))

            def on_result(row) -> None:
                results[row.id] = row
                update(len(results), len(models))
                summary.write(job, str(source), models, results, time.perf_counter() - t0, sarif=False)

            try:
                backends.run(models, job, jobs=jobs, ray_address=ray, device=device, on_result=on_result)
            except KeyboardInterrupt:
                backends.sweep_staging(job.out)
                summary.write(job, str(source), models, results, time.perf_counter() - t0)
                stderr().print(f"interrupted: {len(results)} of {len(models)} model(s) done and kept in "
                               f"{job.out / 'fleet.json'}; run the same command again to do the rest")
                raise typer.Exit(130) from None
        backends.sweep_staging(job.out)  # what a worker killed mid-task (a lost Ray node) left behind
        doc = summary.write(job, str(source), models, results, time.perf_counter() - t0)
    if pushgateway:
        from achilles_guard.fleet.push import push_results

        for line in push_results(pushgateway, job.command, [results[e.id] for e in models]):
            stderr().print(f"[yellow]warning:[/] --pushgateway {pushgateway}: {line}")
    console = stdout()
    if format is Format.json:
        console.file.write(dumps(doc))
    elif format is Format.sarif:
        console.file.write((job.out / "fleet.sarif").read_text())
    else:
        console.print(_render(doc, models))
        console.print(f"[dim]wrote {job.out / 'fleet.json'}, {job.out / 'fleet.sarif'}[/]")
    raise typer.Exit(doc["exit_code"] if doc["models"] else EXIT_OK)


@fleet_app.command("scan", epilog=_EXIT_HELP)
@guarded
def fleet_scan_command(
    source: Path = typer.Argument(..., help=_SOURCE_HELP, show_default=False),
    out: Path = typer.Option(Path("guard-fleet"), "--out", help="OUT: OUT/<model id>/ per model, fleet.json, "
                             "fleet.sarif."),
    text: List[str] = TextOption(),
    text_file: List[Path] = TextFileOption(),
    alpha: float = AlphaOption(),
    samples: int = SamplesOption(),
    seed: int = SeedOption(),
    epsilon: float = EpsilonOption(),
    max_neurons: int = MaxNeuronsOption(),
    components: str = ComponentsOption(),
    attacks: str = AttacksOption(),
    allow_short: bool = AllowShortOption(),
    dtype: str = DtypeOption(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (with --ray: cuda asks one GPU "
                               "per task)."),
    fail_under: Optional[int] = typer.Option(None, help="Gate: a model fails (exit 1) when a critical set has <= "
                                             "N neurons.", show_default=False),
    fingerprint_top: int = FingerprintTopOption(),
    sign_key: Optional[str] = SignKeyOption(),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
    jobs: int = _O["jobs"], ray: Optional[str] = _O["ray"], force: bool = _O["force"],
    model_timeout: Optional[float] = _O["model_timeout"], pushgateway: Optional[str] = _O["pushgateway"],
    format: Format = _O["format"],
) -> None:
    """Scan every model of SOURCE with `guard scan` (one worker process per model) into OUT/<id>/.

    Each OUT/<id>/ holds what `guard scan --format sarif` writes (report.json, fingerprint.safetensors,
    report.sarif) plus fleet-model.json (the file digests and options it was made from); a model
    whose files and options are unchanged is skipped as cached unless --force.
    """
    from achilles_guard.engine.params import ScanParams, read_probe_texts
    from achilles_guard.fleet.worker import Job
    from achilles_guard.integrity.keys import read_key

    ScanParams(alpha=alpha, samples=samples, seed=seed, epsilon=epsilon, max_neurons=max_neurons,
               components=components, attacks=attacks).validated()
    if fail_under is not None and fail_under < 0:
        raise UsageError(f"--fail-under must be >= 0 (got {fail_under})")
    if fingerprint_top < 0:
        raise UsageError(f"--fingerprint-top must be >= 0 (got {fingerprint_top})")
    key = read_key(sign_key) if sign_key else None
    texts = read_probe_texts(text, text_file)
    args: list[str] = []
    for t in text:
        args += ["--text", t]
    for f in text_file:
        args += ["--text-file", str(f.absolute())]
    args += ["--alpha", repr(alpha), "--samples", str(samples), "--seed", str(seed), "--epsilon", repr(epsilon),
             "--max-neurons", str(max_neurons), "--components", components, "--attacks", attacks,
             "--dtype", dtype, "--device", device, "--fingerprint-top", str(fingerprint_top)]
    if fail_under is not None:
        args += ["--fail-under", str(fail_under)]
    if sign_key:
        args += ["--sign-key", sign_key if sign_key.startswith("env:") else str(Path(sign_key).absolute())]
    args += [flag for flag, on in (("--allow-short", allow_short), ("--trust-remote-code", trust_remote_code),
                                   ("--allow-pickle", allow_pickle)) if on]
    cache_key = json.dumps({"args": args, "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
                            "key": _key_id(key)}, sort_keys=True)
    job = Job("scan", out.absolute(), tuple(args), cache_key, None, force, model_timeout)
    _drive(job, source, jobs=jobs, ray=ray, device=device, format=format, pushgateway=pushgateway)


@fleet_app.command("verify", epilog=_EXIT_HELP)
@guarded
def fleet_verify_command(
    source: Path = typer.Argument(..., help=_SOURCE_HELP, show_default=False),
    fingerprints: Path = typer.Option(..., "--fingerprints", help="OUT of a previous `guard fleet scan`: model "
                                      "<id> is checked against DIR/<id>/fingerprint.safetensors.",
                                      show_default=False),
    out: Path = typer.Option(Path("guard-fleet-verify"), "--out", help="OUT: OUT/<model id>/verify.json and "
                             "verify.sarif per model, fleet.json, fleet.sarif."),
    quick: bool = typer.Option(False, "--quick", help="Only the fingerprinted slices and norm gains."),
    functional: bool = typer.Option(False, "--functional", help="Also load each model and re-measure its loss."),
    verify_key: Optional[str] = typer.Option(None, help="Require a valid HMAC signature on every fingerprint: a "
                                             "key file path or env:VAR.", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="--functional: dtype to load the models in."),
    device: str = typer.Option("auto", "--device", help="--functional: auto, cpu, cuda or cuda:N."),
    jobs: int = _O["jobs"], ray: Optional[str] = _O["ray"], force: bool = _O["force"],
    model_timeout: Optional[float] = _O["model_timeout"], pushgateway: Optional[str] = _O["pushgateway"],
    format: Format = _O["format"],
) -> None:
    """Verify every model of SOURCE with `guard verify-checkpoint` against the fingerprints of a fleet scan.

    Each OUT/<id>/ holds verify.json (what `verify-checkpoint --format json` prints) and verify.sarif
    (the same document as `--format sarif` renders it), plus fleet-model.json.
    """
    from achilles_guard.fleet.worker import Job
    from achilles_guard.integrity.keys import read_key

    if not fingerprints.is_dir():
        raise InputError(f"--fingerprints {fingerprints}: not a directory (give the OUT of guard fleet scan)")
    key = read_key(verify_key) if verify_key else None
    args: list[str] = []
    if quick:
        args.append("--quick")
    if functional:
        args += ["--functional", "--dtype", dtype, "--device", device]
    if verify_key:
        args += ["--verify-key", verify_key if verify_key.startswith("env:") else str(Path(verify_key).absolute())]
    cache_key = json.dumps({"args": args, "key": _key_id(key)}, sort_keys=True)
    job = Job("verify", out.absolute(), tuple(args), cache_key, fingerprints.absolute(), force, model_timeout)
    _drive(job, source, jobs=jobs, ray=ray, device=device if functional else "cpu", format=format,
           pushgateway=pushgateway)
