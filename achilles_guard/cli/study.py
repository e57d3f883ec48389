"""`guard study NAME MODEL_DIR`: the paper's studies, each writing JSON + PNG and printing a table."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from achilles_guard.cli.app import app
from achilles_guard.cli.common import (
    AllowPickleOption,
    DeviceOption,
    DtypeOption,
    Format,
    TrustRemoteCodeOption,
    guarded,
    parse_list,
    prepare_out_dir,
    progress_bar,
    stdout,
)
from achilles_guard.engine.paper import PAPER
from achilles_guard.errors import UsageError
from achilles_guard.report.tables import study_table

__all__ = ["study_command"]

HELP = {
    "alpha": "n* as α varies (Fig. 4 left)",
    "samples": "n* as K varies (Fig. 4 right)",
    "epsilon": "n* per ε (Table 6)",
    "scale": "Δ per mask factor β (Table 11)",
    "precision": "clean/masked PPL per dtype (Table 4)",
    "texts": "sets across texts, languages, lengths (Fig. 7, Table 19)",
    "lesion": "every subset of the critical set (Table 5)",
    "components": "top-n / random masks per component (Table 3, Tables 12-15)",
    "compare": "PPL vs n masked per ranking method (Fig. 3)",
}


@app.command("study")
@guarded
def study_command(
    name: str = typer.Argument(..., help="Study: " + "; ".join(f"{k}: {v}" for k, v in HELP.items()) + "."),
    model_dir: str = typer.Argument(..., help="Local model directory."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="report.json of 'guard scan': its critical set is used (else one is scanned)."
    ),
    text: List[str] = typer.Option(
        [], "--text", help="Probe text (repeatable; the first one is ranked). Default: the packaged texts."
    ),
    text_file: List[Path] = typer.Option([], "--text-file", help="File holding a probe text (repeatable)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Corpus for PPL (.txt/.jsonl/dir). Default: the probe text."
    ),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl files."),
    max_length: Optional[int] = typer.Option(None, help="Window length for --data."),
    stride: Optional[int] = typer.Option(None, help="Window stride for --data."),
    max_tokens: Optional[int] = typer.Option(None, help="Use only the first N tokens of --data."),
    alpha: float = typer.Option(PAPER.alpha, help="α of stage 1 (where it is not the varied parameter)."),
    samples: int = typer.Option(PAPER.samples, help="K of stage 1 (where it is not the varied parameter)."),
    seed: int = typer.Option(PAPER.seed, help="Noise / random-ranking seed."),
    epsilon: float = typer.Option(PAPER.epsilon, help="Collapse threshold ε."),
    max_neurons: int = typer.Option(PAPER.max_neurons, help="Search budget."),
    components: str = typer.Option("all", help="Candidate modules for rankings."),
    mask_scale: float = typer.Option(PAPER.mask_scale, help="β of a masked neuron."),
    alphas: str = typer.Option("1,2,3,4,5,6,7,8", help="[alpha] α values."),
    samples_list: str = typer.Option("10,20,40,60,80,100,120", help="[samples] K values."),
    epsilons: str = typer.Option("0.8,1,2,3,10,20", help="[epsilon] ε values."),
    betas: str = typer.Option("-5,-1,0,0.3,0.5,0.8,5", help="[scale] β values (β=1 is always added as the reference)."),
    dtypes: str = typer.Option("float16,bfloat16,float32,float64", help="[precision] dtypes."),
    lengths: str = typer.Option("2,3,4,5,6,8,10,12,15,20,30,40", help="[texts] prefix lengths in tokens."),
    presets: str = typer.Option("mlp-out,up,gate,attention,norms", help="[components] component presets."),
    counts: str = typer.Option("10,100,1000", help="[components] numbers of neurons masked."),
    ns: str = typer.Option("0,1,2,3,4,5,10,20,50,100,200,500,1000", help="[compare] numbers of neurons masked."),
    rankings: str = typer.Option("pcicn,activation,gradient,random", help="[compare] ranking methods."),
    runs: int = typer.Option(3, help="[compare, components] random-ranking repetitions (paper: 10 and 100)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per forward (default: from free memory)."),
    allow_short: bool = typer.Option(False, "--allow-short", help="Accept a probe text under 10 tokens."),
    dtype: str = DtypeOption(),
    device: str = DeviceOption(),
    out: Path = typer.Option(Path("guard-study"), help="Directory for study-NAME.json and study-NAME.png."),
    format: Format = typer.Option(Format.table, "--format", help="table or json."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the PNG (needs the 'plots' extra: matplotlib)."),
    trust_remote_code: bool = TrustRemoteCodeOption(),
    allow_pickle: bool = AllowPickleOption(),
) -> None:
    """Run one of the paper's studies; write OUT/study-NAME.json (+ .png) and print its table.

    Exit 0 ok, 2 bad input (unknown study, bad list, matplotlib missing for a PNG), 3 runtime failure.
    """
    from achilles_guard.engine.scan import ScanParams, read_probe_texts, tokenize_probe
    from achilles_guard.formats.load import load_model
    from achilles_guard.report.documents import atomic_write_bytes, dumps, write_json
    from achilles_guard.research import studies
    from achilles_guard.research.evaluation import ReportRanking, build_corpus

    if name not in studies.STUDIES:
        raise UsageError(f"unknown study {name!r}; use one of {', '.join(studies.STUDIES)}")
    if format is Format.sarif:
        raise UsageError("--format sarif is for scans; use table or json")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
    if plot:
        from achilles_guard.research.plots import require_matplotlib

        require_matplotlib()  # fail before any long work
    params = ScanParams(alpha=alpha, samples=samples, seed=seed, epsilon=epsilon, max_neurons=max_neurons,
                        components=components, mask_scale=mask_scale).validated()
    ranked = ReportRanking.load(report) if report is not None else None
    run = _runner(
        name,
        studies,
        alphas=alphas,
        samples_list=samples_list,
        epsilons=epsilons,
        betas=betas,
        dtypes=dtypes,
        lengths=lengths,
        presets=presets,
        counts=counts,
        ns=ns,
        rankings=rankings,
        runs=runs,
        user_texts=[(f"text-{i + 1}", t) for i, t in enumerate(text)],
    )
    out = prepare_out_dir(out)  # checked writable now, created only once there is a result (bad input leaves none)
    load_kwargs = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    lm = load_model(model_dir, dtype=dtype, device=device, **load_kwargs)
    if ranked is not None:
        ranked.check_model(lm)
    probe_name, probe_text = read_probe_texts(text, text_file)[0]
    probe = tokenize_probe(lm, probe_name, probe_text, allow_short=allow_short or name == "texts")
    corpus, source, _ = build_corpus(
        lm,
        data,
        fallback_ids=probe.input_ids,
        text_field=text_field,
        max_length=max_length if data is not None else probe.tokens,
        stride=stride if data is not None else max(1, probe.tokens - 1),
        max_tokens=max_tokens,
    )
    with progress_bar() as update:
        ctx = studies.StudyContext(lm, probe, corpus, params, ranked, batch_size, load_kwargs, update)
        result = run(ctx)
    model = {"path": lm.path, "architecture": lm.architecture, "dtype": str(lm.dtype).removeprefix("torch."),
             "device": lm.device, "config_sha256": lm.config_sha256, "probe": probe.name, "probe_tokens": probe.tokens,
             "corpus": source, "corpus_tokens": corpus.tokens}
    doc = result.as_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / f"study-{name}.json", doc)
    written = [json_path]
    if plot:
        from achilles_guard.research.plots import spec_png

        written.append(atomic_write_bytes(out / f"study-{name}.png", spec_png(result.plot)))
    if format is Format.json:
        stdout().file.write(dumps(doc))
        return
    console = stdout()
    console.print(study_table(doc))
    console.print(f"[dim]wrote {', '.join(str(p) for p in written)}[/]")


def _runner(name, studies, *, alphas, samples_list, epsilons, betas, dtypes, lengths, presets, counts, ns, rankings,
            runs, user_texts):
    """Parse the study's own options now (bad input fails before the model loads)."""
    if name == "alpha":
        values = parse_list(alphas, float, "--alphas")
        return lambda ctx: studies.alpha_study(ctx, values)
    if name == "samples":
        values = parse_list(samples_list, int, "--samples-list")
        return lambda ctx: studies.samples_study(ctx, values)
    if name == "epsilon":
        values = parse_list(epsilons, float, "--epsilons")
        return lambda ctx: studies.epsilon_study(ctx, values)
    if name == "scale":
        values = parse_list(betas, float, "--betas")
        return lambda ctx: studies.scale_study(ctx, values)
    if name == "precision":
        from achilles_guard.formats.load import DTYPES

        values = parse_list(dtypes, str, "--dtypes")
        bad = [v for v in values if v not in DTYPES]
        if bad:
            raise UsageError(f"--dtypes: unknown {', '.join(bad)}; use float16, bfloat16, float32, float64")
        return lambda ctx: studies.precision_study(ctx, values)
    if name == "texts":
        values = parse_list(lengths, int, "--lengths")
        return lambda ctx: studies.texts_study(ctx, lengths=values, texts=user_texts[1:])
    if name == "lesion":
        return lambda ctx: studies.lesion_study(ctx)
    if name == "components":
        names, sizes = parse_list(presets, str, "--presets"), parse_list(counts, int, "--counts")
        return lambda ctx: studies.components_study(ctx, presets=names, counts=sizes, runs=runs)
    values, methods = parse_list(ns, int, "--ns"), parse_list(rankings, str, "--rankings")
    return lambda ctx: studies.compare_study(ctx, ns=values, rankings=methods, runs=runs)
