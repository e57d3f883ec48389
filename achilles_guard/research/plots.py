"""PNG plots with matplotlib (optional extra `plots`, Agg backend: no display needed).

    require_matplotlib()                          # UsageError (exit 2) with the fix when missing
    png = spec_png(result.plot)                   # bytes of a PNG for a study's PlotSpec
    png = scan_png(report_doc)                    # Fig. 2: phase transition + layer distribution
"""

from __future__ import annotations

import io
import math
from collections import Counter

from achilles_guard.errors import UsageError

__all__ = ["require_matplotlib", "spec_png", "scan_png", "topk_png", "PNG_MAGIC"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MISSING = (
    "matplotlib is not installed, so no PNG can be drawn: pip install 'achilles-guard[plots]' "
    "(or pass --no-plot)"
)


def require_matplotlib():
    """The pyplot module on the Agg backend, or a UsageError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(MISSING) from None
    return plt


def spec_png(spec) -> bytes:
    """Render a studies.PlotSpec (line or bar chart)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    try:
        if spec.kind == "bar":
            _bars(ax, spec)
        else:
            for s in spec.series:
                xs = [x for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y)]
                ys = [y for y in s.y if y is not None and math.isfinite(y)]
                errs = [e for e, y in zip(s.err, s.y) if y is not None and math.isfinite(y)] if s.err else None
                ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, label=s.label)
            if spec.logx:
                ax.set_xscale("symlog", linthresh=1)
        if spec.hline is not None:
            ax.axhline(spec.hline, color="red", ls="--", lw=1, label=spec.hline_label or None)
        ax.set_title(spec.title, fontsize=9)
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(spec.ylabel)
        if any(s.label for s in spec.series) or spec.hline_label:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)


def _bars(ax, spec) -> None:
    width = 0.8 / max(1, len(spec.series))
    for i, s in enumerate(spec.series):
        xs = [x + (i - (len(spec.series) - 1) / 2) * width for x in s.x]
        ys = [y if y is not None and math.isfinite(y) else 0.0 for y in s.y]
        ax.bar(xs, ys, width=width, label=s.label)
    if spec.xticklabels:
        ax.set_xticks(range(len(spec.xticklabels)))
        ax.set_xticklabels(spec.xticklabels, rotation=60 if len(spec.xticklabels) > 8 else 0, fontsize=7)


def scan_png(doc: dict) -> bytes:
    """Fig. 2 for one scan report: Δ against n masked (phase transition) and critical neurons per layer."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    try:
        curve = doc.get("curve") or []
        ns = [0] + [p["n"] for p in curve]
        deltas = [0.0] + [p["delta_log10"] if p["delta_log10"] is not None else float("nan") for p in curve]
        left.plot(ns, deltas, "o-", color="tab:red", ms=4, label="Δ log10 PPL")
        eps = doc["params"].get("epsilon", 1.0)
        left.axhline(eps, color="grey", ls=":", lw=1, label=f"ε = {eps:g}")
        if doc.get("n_star"):
            left.axvline(doc["n_star"], color="black", ls="--", lw=1, label=f"n* = {doc['n_star']}")
        left.set_xlabel("neurons masked (in ranking order)")
        left.set_ylabel("Δ log10 perplexity")
        left.set_title("Phase transition", fontsize=10)
        left.legend(fontsize=7)
        left.grid(alpha=0.3)
        critical = doc.get("critical_set") or []
        counts = Counter((n["layer"], n["component"] == "mlp_out") for n in critical)
        seen = [n["layer"] for n in [*critical, *(doc.get("ranking") or [])] if n.get("layer") is not None]
        layers = list(range(0, max(seen) + 1)) if seen else []  # every layer up to the deepest ranked one
        down = [counts.get((layer, True), 0) for layer in layers]
        other = [counts.get((layer, False), 0) for layer in layers]
        right.bar(layers, down, color="tab:blue", label="MLP output (down_proj)")
        right.bar(layers, other, bottom=down, color="tab:orange", label="other components")
        right.set_xlabel("layer")
        right.set_ylabel("critical neurons")
        right.set_title(f"Layer distribution ({len(critical)} critical neurons)", fontsize=10)
        if layers:
            right.set_xticks(layers)
            right.legend(fontsize=7)
        fig.suptitle(f"{doc['model'].get('architecture', '')} · {doc['model'].get('path', '')}", fontsize=8)
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)


def topk_png(levels: list[dict], title: str) -> bytes:
    """Fig. 1 (bottom): the top-k next-token probabilities with 0, 1, ..., n* neurons masked."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.4), dpi=110, squeeze=False)
    try:
        for ax, level in zip(axes[0], levels):
            tokens = [t["token"] for t in level["top"]]
            ax.barh(range(len(tokens))[::-1], [t["prob"] for t in level["top"]], color="tab:blue")
            ax.set_yticks(range(len(tokens))[::-1])
            ax.set_yticklabels([repr(t)[1:-1][:12] for t in tokens], fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_title(f"{level['n']} masked", fontsize=9)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
