"""What every study shares: its inputs (`StudyContext`), its result (`StudyResult`) and its plot spec.

A study returns a table (columns + rows, printed and written as JSON) and a `PlotSpec` that
`achilles_guard.research.plots` turns into a PNG. Perplexity is measured on `ctx.corpus`: the user's
`--data` corpus, or the probe text itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from achilles_guard.engine.masking import MaskPlan
from achilles_guard.engine.neurons import CandidateSet, Neuron, discover
from achilles_guard.engine.pcicn import Ranking, rank, search
from achilles_guard.engine.perplexity import LN10
from achilles_guard.engine.scan import ProbeText, ScanParams
from achilles_guard.errors import UsageError
from achilles_guard.formats.load import LoadedModel
from achilles_guard.report.documents import json_number
from achilles_guard.research.evaluation import Corpus, ReportRanking, config_losses

__all__ = ["Series", "PlotSpec", "StudyResult", "StudyContext", "STUDY_SCHEMA", "fmt", "scale_plan"]

STUDY_SCHEMA = "achilles-guard/study/v1"


@dataclass(frozen=True)
class Series:
    label: str
    x: tuple[float, ...]
    y: tuple[float | None, ...]  # None: no value (not converged, unsupported)
    err: tuple[float, ...] | None = None


@dataclass(frozen=True)
class PlotSpec:
    """A line or bar chart, rendered by `plots.render_spec`."""

    kind: str  # "line" | "bar"
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    xticklabels: tuple[str, ...] | None = None  # bar charts: one label per x position
    hline: float | None = None
    hline_label: str = ""
    logx: bool = False

    def as_dict(self) -> dict:
        return {
            "kind": self.kind, "title": self.title, "xlabel": self.xlabel, "ylabel": self.ylabel,
            "xticklabels": list(self.xticklabels) if self.xticklabels else None,
            "hline": self.hline, "hline_label": self.hline_label, "logx": self.logx,
            "series": [{"label": s.label, "x": list(s.x), "y": [json_number(v) for v in s.y],
                        "err": list(s.err) if s.err else None} for s in self.series],
        }

    @staticmethod
    def from_dict(doc: dict) -> "PlotSpec":
        series = tuple(Series(s["label"], tuple(s["x"]), tuple(s["y"]), tuple(s["err"]) if s.get("err") else None)
                       for s in doc["series"])
        return PlotSpec(doc["kind"], doc["title"], doc["xlabel"], doc["ylabel"], series,
                        tuple(doc["xticklabels"]) if doc.get("xticklabels") else None,
                        doc.get("hline"), doc.get("hline_label", ""), bool(doc.get("logx")))


@dataclass(frozen=True)
class StudyResult:
    study: str
    title: str  # which table / figure of the paper it reproduces
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    params: dict
    plot: PlotSpec
    notes: tuple[str, ...] = ()

    def as_dict(self, model: dict | None = None) -> dict:
        from achilles_guard.report.documents import TOOL

        return {
            "schema": STUDY_SCHEMA,
            "tool": dict(TOOL),
            "study": self.study,
            "title": self.title,
            "model": model or {},
            "params": self.params,
            "columns": list(self.columns),
            "rows": [{c: json_number(v) for c, v in zip(self.columns, row)} for row in self.rows],
            "notes": list(self.notes),
            "plot": self.plot.as_dict(),
        }


@dataclass(frozen=True)
class StudyContext:
    """Everything a study may need. `report` is optional: without it the critical set is scanned."""

    lm: LoadedModel
    probe: ProbeText
    corpus: Corpus
    params: ScanParams
    report: ReportRanking | None = None
    batch_size: int | None = None
    load_kwargs: dict = field(default_factory=dict)
    progress: Callable[[str, str, int, int], None] | None = None

    def candidates(self, components: str | None = None) -> CandidateSet:
        return discover(self.lm.model, components or self.params.components)

    def rank(self, *, candidates: CandidateSet | None = None, method: str | None = None, alpha: float | None = None,
             samples: int | None = None, seed: int | None = None, input_ids: torch.Tensor | None = None,
             label: str = "") -> Ranking:
        p = self.params
        report = (
            (lambda stage, done, total: self.progress(label or "rank", stage, done, total)) if self.progress else None
        )
        return rank(
            self.lm.model, self.probe.input_ids if input_ids is None else input_ids, candidates or self.candidates(),
            method=method or p.ranking, alpha=p.alpha if alpha is None else alpha,
            samples=p.samples if samples is None else samples, seed=p.seed if seed is None else seed, progress=report,
        )

    def search(self, ranking: Ranking, *, epsilon: float | None = None, input_ids: torch.Tensor | None = None):
        p = self.params
        return search(
            self.lm.model,
            self.probe.input_ids if input_ids is None else input_ids,
            ranking,
            epsilon=p.epsilon if epsilon is None else epsilon,
            step=p.step,
            max_neurons=p.max_neurons,
            scale=p.mask_scale,
        )

    def critical_set(self) -> tuple[Neuron, ...]:
        """The report's critical set, else one found now on the probe text."""
        if self.report is not None:
            return self.report.require_critical_set()
        result = self.search(self.rank(label="critical set"))
        if not result.converged:
            raise UsageError(
                f"no critical set within --max-neurons {self.params.max_neurons} on the probe text; "
                "this study needs one (pass --report from a converged scan)"
            )
        return result.critical_set

    def losses(self, plan: MaskPlan | None, configs: int) -> list[float]:
        """Mean NLL (nats) on the corpus for each of `configs` rows of `plan`."""
        return config_losses(self.lm.model, self.corpus, plan, configs=configs, batch_size=self.batch_size).tolist()


def scale_plan(neurons: tuple[Neuron, ...], scales: list[float]) -> MaskPlan:
    """Row r multiplies every neuron of the set by scales[r] (one per-sample plan, R = len(scales))."""
    base = MaskPlan.fixed(neurons, 0.0)
    column = torch.tensor(scales, dtype=torch.float32)[:, None]  # (R, 1)
    factors = {m: column.expand(len(scales), idx.numel()).contiguous() for m, idx in base.channels.items()}
    return MaskPlan(base.channels, factors)


def log10(loss: float) -> float:
    return loss / LN10 if math.isfinite(loss) else math.inf


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)



