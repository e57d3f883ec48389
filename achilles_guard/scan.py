"""A whole scan: probe texts -> (ranking, critical set) per text, plus what they agree on.

    lm = load_model(path)
    params = ScanParams(alpha=5, samples=100).validated()
    probes = [tokenize_probe(lm, "probe", text)]
    result = run_scan(lm, probes, params)
    result.primary.result.critical_set
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Callable

import torch

from achilles_guard.errors import TextError, UsageError
from achilles_guard.model import LoadedModel
from achilles_guard.neurons import CandidateSet, Neuron, discover, parse_components
from achilles_guard.pcicn import RANKINGS, Progress, Ranking, SearchResult, rank, search

__all__ = ["ScanParams", "ProbeText", "TextScan", "ScanResult", "tokenize_probe", "run_scan", "MIN_TOKENS"]

MIN_TOKENS = 10  # the paper's minimum probe length


@dataclass(frozen=True)
class ScanParams:
    """Every knob of a scan, with the paper's defaults."""

    alpha: float = 5.0
    samples: int = 100
    seed: int = 42
    epsilon: float = 1.0
    step: int = 1
    max_neurons: int = 1000
    components: str = "all"
    ranking: str = "pcicn"
    mask_scale: float = 0.0
    keep: int = 1000

    def validated(self) -> "ScanParams":
        """Self, or a UsageError naming the first bad option."""
        checks = [
            (0 < self.alpha < float("inf"), f"--alpha must be > 0 and finite (got {self.alpha})"),
            (self.samples >= 1, f"--samples must be >= 1 (got {self.samples})"),
            (0 < self.epsilon < float("inf"), f"--epsilon must be > 0 and finite (got {self.epsilon})"),
            (self.step >= 1, f"--step must be >= 1 (got {self.step})"),
            (self.max_neurons >= 1, f"--max-neurons must be >= 1 (got {self.max_neurons})"),
            (self.keep >= 0, f"--keep must be >= 0 (got {self.keep})"),
            (self.ranking in RANKINGS, f"--ranking {self.ranking!r}: use one of {', '.join(RANKINGS)}"),
            (torch.isfinite(torch.tensor(self.mask_scale)).item(), "--mask-scale must be a finite number"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        parse_components(self.components)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProbeText:
    name: str
    text: str
    input_ids: torch.Tensor  # (1, T) on the model's input device

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class TextScan:
    probe: ProbeText
    ranking: Ranking
    result: SearchResult
    rank_s: float
    search_s: float


@dataclass(frozen=True)
class ScanResult:
    lm: LoadedModel
    params: ScanParams
    candidates: CandidateSet
    texts: tuple[TextScan, ...]
    load_s: float = 0.0

    @property
    def primary(self) -> TextScan:
        """The first probe text's scan: its set is the report's top-level `critical_set`."""
        return self.texts[0]

    @cached_property
    def intersection(self) -> tuple[Neuron, ...]:
        """Neurons in the critical set of every text (empty if any text did not converge)."""
        sets = [set(t.result.critical_set) for t in self.texts]
        if not sets or not all(t.result.converged for t in self.texts):
            return ()
        common = set.intersection(*sets)
        return tuple(n for n in self.primary.result.critical_set if n in common)

    @property
    def smallest_set(self) -> int | None:
        """Size of the smallest converged critical set over all texts (the most severe finding)."""
        sizes = [len(t.result.critical_set) for t in self.texts if t.result.converged]
        return min(sizes) if sizes else None

    def with_load_time(self, load_s: float) -> "ScanResult":
        return replace(self, load_s=load_s)


def tokenize_probe(lm: LoadedModel, name: str, text: str, *, allow_short: bool = False) -> ProbeText:
    """Tokenize a probe text; refuse empty, untokenizable or (unless allowed) < 10-token texts."""
    if not text.strip():
        raise TextError(f"probe text {name!r} is empty")
    encoded = lm.tokenizer(text, return_tensors="pt")
    input_ids = encoded["input_ids"]
    if input_ids.numel() == 0:
        raise TextError(
            f"probe text {name!r} tokenizes to nothing with this model's tokenizer "
            f"({type(lm.tokenizer).__name__}); check that the tokenizer files match the model"
        )
    if input_ids.shape[1] < 2:
        raise TextError(f"probe text {name!r} has {input_ids.shape[1]} token; the loss needs at least 2")
    if input_ids.shape[1] < MIN_TOKENS and not allow_short:
        raise TextError(
            f"probe text {name!r} has {input_ids.shape[1]} tokens; PCICN needs at least {MIN_TOKENS} "
            "(the paper's minimum): give a longer text, or pass --allow-short"
        )
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    if int(input_ids.max()) >= vocab:
        raise TextError(
            f"probe text {name!r}: the tokenizer produced id {int(input_ids.max())} but the model has only "
            f"{vocab} embeddings; the tokenizer does not belong to this model"
        )
    return ProbeText(name, text, input_ids.to(lm.input_device))


def run_scan(
    lm: LoadedModel,
    probes: list[ProbeText],
    params: ScanParams,
    *,
    progress: Callable[[str, str, int, int], None] | None = None,
    candidates: CandidateSet | None = None,
) -> ScanResult:
    """Rank and search on every probe text. `progress(text_name, stage, done, total)`."""
    params = params.validated()
    candidates = candidates or discover(lm.model, params.components)
    scans = []
    for probe in probes:
        report: Progress | None = (lambda stage, done, total, _n=probe.name: progress(_n, stage, done, total)) if progress else None
        t0 = time.perf_counter()
        ranking = rank(
            lm.model, probe.input_ids, candidates,
            method=params.ranking, alpha=params.alpha, samples=params.samples, seed=params.seed, progress=report,
        )
        t1 = time.perf_counter()
        result = search(
            lm.model, probe.input_ids, ranking,
            epsilon=params.epsilon, step=params.step, max_neurons=params.max_neurons,
            scale=params.mask_scale, progress=report,
        )
        t2 = time.perf_counter()
        scans.append(TextScan(probe, ranking, result, t1 - t0, t2 - t1))
    return ScanResult(lm, params, candidates, tuple(scans))

