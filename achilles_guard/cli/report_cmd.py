"""`guard report report.json [--html out.html]`: the scan (and any studies) in the terminal or one
static, offline HTML page with the plots embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import List, Optional

import typer

from achilles_guard.cli.app import app
from achilles_guard.cli.common import guarded, stdout

__all__ = ["report_command", "html_page"]


def _load_study(path: Path) -> dict:
    from achilles_guard.report.documents import read_document

    return read_document(path, schema="achilles-guard/study/v1", option="--study")


@app.command("report")
@guarded
def report_command(
    report: Path = typer.Argument(..., help="report.json written by 'guard scan'."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write one static HTML page (plots embedded)."),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Write Fig. 2 (phase transition + layer distribution) as PNG."
    ),
    study: List[Path] = typer.Option([], "--study", help="A study-NAME.json to include (repeatable)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Embed plots in the HTML page (needs matplotlib)."),
) -> None:
    """Show a scan report; with --html, write a static page readable offline."""
    from achilles_guard.report.documents import atomic_write_bytes
    from achilles_guard.report.tables import scan_summary
    from achilles_guard.research.evaluation import read_scan_report

    doc = read_scan_report(report)
    studies = [_load_study(p) for p in study]
    if png is not None or (html_out is not None and plots):
        from achilles_guard.research.plots import require_matplotlib

        require_matplotlib()
    console = stdout()
    if png is not None:
        from achilles_guard.research.plots import scan_png

        atomic_write_bytes(png, scan_png(doc))
    if html_out is not None:
        atomic_write_bytes(html_out, html_page(doc, studies, plots=plots).encode())
    if html_out is None and png is None:
        from achilles_guard.report.tables import study_table

        console.print(scan_summary(doc))
        for s in studies:
            console.print(study_table(s))
        return
    console.print(f"[dim]wrote {', '.join(str(p) for p in (html_out, png) if p is not None)}[/]")


def html_page(doc: dict, studies: list[dict], *, plots: bool = True) -> str:
    """One self-contained page: no script, no external asset."""
    e = html.escape
    model = doc["model"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>achilles-guard report: {e(model['path'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}"
        "img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:.9em}</style></head><body>",
        "<h1>achilles-guard scan report</h1>",
    ]
    if model.get("synthetic_demo"):
        parts.append("<p class='note'>Synthetic demonstration model (planted critical set). Not a real LLM.</p>")
    parts.append(
        _kv_table(
            {
                "model": model["path"],
                "architecture": model["architecture"],
                "parameters": f"{model['num_parameters']:,}",
                "dtype / device": f"{model['dtype']} / {model['device']}",
                "candidate neurons": f"{model['candidate_neurons']:,}",
                "config sha256": model["config_sha256"],
                "tool": f"{doc['tool']['name']} {doc['tool']['version']}",
                "params": ", ".join(f"{k}={v}" for k, v in doc["params"].items()),
            }
        )
    )
    if doc["converged"]:
        delta = doc["delta_log10"]
        parts.append(f"<p class='bad'>Critical set: masking {doc['n_star']} neuron(s) raises perplexity by "
                     f"{'inf' if delta is None else f'{delta:.2f}'} orders of magnitude.</p>")
    else:
        parts.append("<p class='ok'>No critical set within the search budget.</p>")
    if doc["critical_set"]:
        parts.append("<h2>Critical neurons</h2>")
        parts.append(_table(["rank", "layer", "component", "module", "channel", "importance"],
                            [[n.get("rank"), n["layer"], n["component"], n["module"], n["channel"], n.get("importance")]
                             for n in doc["critical_set"]], left={"component", "module"}))
    if plots:
        from achilles_guard.research.plots import scan_png

        parts.append("<h2>Phase transition and layer distribution (Fig. 2)</h2>")
        parts.append(_img(scan_png(doc), "phase transition and layer distribution"))
    if len(doc.get("texts", [])) > 1:
        parts.append("<h2>Probe texts</h2>")
        parts.append(_table(["text", "tokens", "baseline log10 PPL", "n*", "Δ log10 PPL"],
                            [[t["name"], t["tokens"], t["baseline"]["log10_ppl"], t["n_star"], t["delta_log10"]]
                             for t in doc["texts"]], left={"text"}))
    parts.append("<h2>Δ curve</h2>")
    parts.append(_table(["n", "Δ log10 PPL"], [[p["n"], p["delta_log10"]] for p in doc["curve"][:200]]))
    for s in studies:
        parts.append(f"<h2>Study: {e(s['study'])}</h2><p>{e(s['title'])}</p>")
        parts.append(_table(s["columns"], [[r[c] for c in s["columns"]] for r in s["rows"]],
                            left={"subset", "text", "genre", "language", "component", "ranking", "dtype"}))
        for note in s.get("notes", []):
            parts.append(f"<p class='note'>{e(note)}</p>")
        if plots:
            from achilles_guard.research.plots import spec_png
            from achilles_guard.research.studies.base import PlotSpec

            parts.append(_img(spec_png(PlotSpec.from_dict(s["plot"])), s["title"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _img(png: bytes, alt: str) -> str:
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"


def _kv_table(items: dict) -> str:
    rows = "".join(
        f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(str(v))}</td></tr>"
        for k, v in items.items()
    )
    return f"<table>{rows}</table>"


def _table(columns, rows, *, left=frozenset()) -> str:
    head = "".join(f"<th class='{'l' if c in left else ''}'>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{'l' if c in left else ''}'>{html.escape(_cell(v))}</td>" for c, v in zip(columns, row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
