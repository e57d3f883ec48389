"""Terminal renderings of a scan report (Rich): tables, a layer bar chart, the phase-transition curve.

Everything here reads the report *document* (the dict of `report.scan_report`), so what the
terminal shows is exactly what report.json says.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Group
from rich.table import Table
from rich.text import Text

__all__ = ["scan_summary", "layer_chart", "phase_curve", "fmt_delta", "study_table"]

_BLOCKS = " ▁▂▃▄▅▆▇█"


def fmt_delta(delta: float | None) -> str:
    if delta is None:
        return "inf"
    return f"{0.0 if abs(delta) < 0.005 else delta:.2f}"  # no "-0.00" for a loss that moved by 1e-5


def scan_summary(doc: dict, *, fail_under: int | None = None) -> Group:
    model = doc["model"]
    parts: list = []
    if model.get("synthetic_demo"):
        parts.append(Text(
            "Synthetic demonstration model: a tiny random Llama with a planted massive activation "
            "(critical set known by construction: layer 0 down_proj channels). Not a real LLM.",
            style="bold yellow",
        ))
    parts.append(Text.assemble(
        ("model ", "dim"), (f"{model['path']}", "bold"),
        (f"  {model['architecture']}, {model['num_parameters']:,} params, {model['dtype']} on {model['device']}, "
         f"{model['candidate_neurons']:,} candidate neurons", "dim"),
    ))
    for text in doc["texts"]:
        parts.append(_text_block(text))
    if len(doc["texts"]) > 1:
        common = doc["intersection"]
        parts.append(Text(
            f"Agreement over {len(doc['texts'])} texts: {len(common)} neuron(s) in every critical set"
            + (": " + ", ".join(f"{n['module']}[{n['channel']}]" for n in common) if common else ""),
            style="bold",
        ))
    if doc.get("attacks"):
        parts.append(_strongest_line(doc.get("strongest"), len(doc["texts"]) > 1))
    if doc["critical_set"]:
        parts.append(layer_chart(doc["critical_set"], title="Critical neurons by layer (first text)"))
    parts.append(_verdict(doc, fail_under))
    return Group(*parts)


def _text_block(text: dict) -> Group:
    base = text["baseline"]
    head = Text.assemble(
        ("\n■ ", "cyan"),
        (text["name"], "bold cyan"),
        (
            f"  {text['tokens']} tokens, baseline loss {base['loss']:.3f} nats (log10 PPL {base['log10_ppl']:.2f})",
            "dim",
        ),
    )
    if text["converged"]:
        line = Text(
            f"  collapse: masking {text['n_star']} neuron(s) raises perplexity by {fmt_delta(text['delta_log10'])} "
            "orders of magnitude",
            style="bold red",
        )
    else:
        tried = text["curve"][-1]["n"] if text["curve"] else 0
        line = Text(
            f"  no critical set within the budget: {tried} neurons masked, Δ = {fmt_delta(text['delta_log10'])} (< ε)",
            style="bold green",
        )
    parts = [head, line]
    if text["critical_set"]:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("rank", "layer", "component", "module", "channel", "importance"):
            table.add_column(col, justify="right" if col in ("rank", "layer", "channel", "importance") else "left")
        for n in text["critical_set"]:
            imp = n.get("importance")
            table.add_row(str(n["rank"]), str(n["layer"]), n["component"], n["module"], str(n["channel"]),
                          "inf" if imp is None else f"{imp:.4g}")
        parts.append(table)
    parts.append(phase_curve(text["curve"], text["n_star"]))
    if text.get("attacks"):
        parts.append(_attack_table(text))
    return Group(*parts)


def _attack_table(text: dict) -> Table:
    seconds = text.get("timings", {}).get("attacks", {})
    """One row per portfolio attack; the strongest (smallest pruned set) marked."""
    won = (text.get("strongest") or {}).get("attack")
    table = Table(title="  attack portfolio (sets pruned to 1-minimal)", box=None, pad_edge=False, header_style="bold",
                  title_justify="left", title_style="dim")
    for col in ("attack", "n", "Δ", "seconds", "set / note"):
        table.add_column(col, justify="right" if col in ("n", "Δ", "seconds") else "left")
    for a in text["attacks"]:
        if a["converged"]:
            names = ", ".join(f"{n['module']}[{n['channel']}]" for n in a["critical_set"][:4])
            more = f" +{len(a['critical_set']) - 4}" if len(a["critical_set"]) > 4 else ""
            detail = (
                names + more + (f" (pruned from {a['n_found']})" if a.get("n_found") and a["n_found"] != a["n"] else "")
            )
        else:
            detail = a.get("note") or "no collapsing set within the budget"
        mark = " ◀ strongest" if a["attack"] == won else ""
        table.add_row(
            a["attack"] + mark,
            str(a["n"]) if a["converged"] else "—",
            fmt_delta(a["delta_log10"]) if a["converged"] else "—",
            f"{seconds.get(a['attack'], 0.0):.2f}",
            detail,
            style="bold red" if mark else None,
        )
    return table


def _strongest_line(strongest: dict | None, several: bool) -> Text:
    if not strongest:
        return Text("\nStrongest attack: none of the attacks collapsed the model within the budget", style="bold green")
    where = f" on text {strongest['text']}" if several and strongest.get("text") else ""
    names = ", ".join(f"{n['module']}[{n['channel']}]" for n in strongest["critical_set"][:6])
    return Text(
        f"\nStrongest attack: {strongest['attack']}{where} collapses the model with {strongest['n']} neuron(s), "
        f"Δ = {fmt_delta(strongest['delta_log10'])}: {names}",
        style="bold red",
    )


def layer_chart(neurons: list[dict], *, title: str) -> Table:
    """Horizontal bars: how many neurons sit in each (layer, component)."""
    counts = Counter((n["layer"], n["component"]) for n in neurons)
    table = Table(title=title, box=None, show_header=False, title_justify="left", title_style="bold")
    table.add_column(justify="right")
    table.add_column()
    table.add_column(justify="right")
    widest = max(counts.values())
    for (layer, component), count in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        bar = "█" * max(1, round(24 * count / widest))
        table.add_row(
            f"layer {layer} {component}", Text(bar, style="red" if component == "mlp_out" else "yellow"), str(count)
        )
    return table


def phase_curve(curve: list[dict], n_star: int | None, width: int = 60) -> Text:
    """Δ against n as a one-line sparkline, with the threshold crossing marked."""
    if not curve:
        return Text("")
    values = [(p["delta_log10"] if p["delta_log10"] is not None else float("inf")) for p in curve]
    if len(curve) <= 10:  # short curves read best as numbers: the jump is the phase transition
        out = Text("  Δ(n): ", style="dim")
        for i, (p, v) in enumerate(zip(curve, values)):
            crossed = n_star is not None and p["n"] == n_star
            out.append(f"{'  ' if i else ''}n={p['n']} ", style="dim")
            out.append(fmt_delta(p["delta_log10"]), style="bold red" if crossed else "green")
        return out
    if len(values) > width:  # keep the last point (n*) and sample the rest evenly
        idx = [round(i * (len(values) - 1) / (width - 1)) for i in range(width)]
        values = [values[i] for i in idx]
    finite = [v for v in values if v != float("inf")]
    top = max(max(finite, default=1.0), 1.0)
    chars = "".join(
        _BLOCKS[-1] if v == float("inf") else _BLOCKS[max(0, min(8, round(8 * max(v, 0) / top)))] for v in values
    )
    label = f"  Δ vs n (1..{curve[-1]['n']}, max {fmt_delta(max(values) if finite or values else None)}): "
    out = Text(label, style="dim")
    out.append(chars[:-1], style="green")
    out.append(chars[-1], style="bold red" if n_star else "green")
    return out


def _verdict(doc: dict, fail_under: int | None) -> Text:
    from achilles_guard.report.documents import gate_size

    smallest = gate_size(doc)
    if fail_under is None:
        return Text("")
    if smallest is not None and smallest <= fail_under:
        return Text(
            f"\nGATE FAILED: a critical set of {smallest} neuron(s) <= --fail-under {fail_under}", style="bold red"
        )
    return Text(f"\nGate passed: no critical set of <= {fail_under} neuron(s)", style="bold green")


def study_table(doc: dict):
    """A Rich rendering of a study document (`guard study`, `guard report`)."""
    table = Table(title=doc["title"], title_justify="left", header_style="bold")
    for col in doc["columns"]:
        table.add_column(
            col,
            justify="left"
            if col in ("subset", "text", "genre", "language", "component", "ranking", "dtype")
            else "right",
        )
    for row in doc["rows"]:
        table.add_row(*(_cell(row[c]) for c in doc["columns"]))
    parts = [table, *(Text(f"  {note}", style="dim") for note in doc.get("notes", []))]
    return Group(*parts)


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.3f}"
    return str(value)
