"""Perplexity on a local corpus with neurons masked: the paper's "Original -> Masked" columns.

    docs = load_corpus(Path("wiki.test.raw"))             # .txt, .jsonl (text field) or a directory
    corpus = Corpus.build(tokenize_corpus(lm, docs), max_length=1024, stride=512)
    ranked = ReportRanking.load(Path("guard-out/report.json"), lm)
    levels = parse_levels("0,1,2,n*", ranked)
    losses = config_losses(lm.model, corpus, ranked.plan(levels))  # (len(levels),) mean NLL in nats

Sliding windows: window w covers tokens [end_w - L, end_w) and scores only the targets it adds, so
every token after the first is predicted exactly once, each with at least one token of context
(`Corpus.scored` says which label of which window counts). A *configuration* is one row of a
`MaskPlan` (a set of masked neurons and their factors); `config_losses` runs every (configuration,
window) pair as one row of a batch, through the shared per-sample masking mechanism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from achilles_guard.engine.corpus import CORPUS_SUFFIXES, load_corpus
from achilles_guard.engine.masking import MaskPlan, masked
from achilles_guard.engine.neurons import Neuron, output_width
from achilles_guard.engine.pcicn import search_batch_size
from achilles_guard.engine.perplexity import LN10, token_nll
from achilles_guard.errors import InputError, UsageError

__all__ = [
    "CORPUS_SUFFIXES",
    "load_corpus",
    "tokenize_corpus",
    "Corpus",
    "build_corpus",
    "default_max_length",
    "ReportRanking",
    "parse_levels",
    "config_losses",
    "select_rows",
    "LevelResult",
    "EvalResult",
    "evaluate_levels",
]

EVAL_SCHEMA = "achilles-guard/eval/v1"

# progress(done_rows, total_rows)
RowProgress = Callable[[int, int], None]


# --- corpus ----------------------------------------------------------------------------------


def tokenize_corpus(lm, docs: Sequence[str], *, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (N,) of the documents joined by blank lines (the usual WikiText protocol)."""
    ids = lm.tokenizer("\n\n".join(docs), return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise InputError(f"the corpus tokenizes to {ids.numel()} token(s); perplexity needs at least 2")
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab:
        raise InputError(f"the tokenizer produced id {int(ids.max())} but the model has {vocab} embeddings")
    return ids


@dataclass(frozen=True)
class Corpus:
    """Token ids cut into equal-length sliding windows, with the labels each window scores."""

    ids: torch.Tensor  # (N,)
    windows: torch.Tensor  # (W, L) token ids of each window
    scored: torch.Tensor  # (W, L - 1) bool: label j+1 of window w is scored
    starts: torch.Tensor  # (W,) position of each window's first token in `ids`
    max_length: int
    stride: int

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def scored_tokens(self) -> int:
        return int(self.scored.sum())

    @staticmethod
    def build(ids: torch.Tensor, *, max_length: int, stride: int | None = None) -> "Corpus":
        """Windows of L = min(max_length, N) tokens; each new window adds `stride` new targets."""
        if max_length < 2:
            raise UsageError(f"--max-length must be >= 2 (got {max_length})")
        n = int(ids.numel())
        length = min(max_length, n)
        stride = stride if stride is not None else max(1, max_length // 2)
        if not 1 <= stride <= max_length - 1:
            raise UsageError(
                f"--stride must be between 1 and --max-length - 1 = {max_length - 1} (got {stride}): "
                "each window needs at least one token of context for its first scored target"
            )
        # Targets 1..L-1 come from window 0; then each window ends `stride` targets later (the last one at N).
        ends = torch.arange(length, n, stride) + stride  # (W-1,)
        ends = torch.cat([torch.tensor([length]), ends.clamp(max=n)])  # (W,)
        starts = ends - length  # (W,)
        previous_end = torch.cat([torch.tensor([1]), ends[:-1]])  # first target each window scores
        windows = ids[starts[:, None] + torch.arange(length)[None, :]]  # (W, L)
        target_pos = starts[:, None] + torch.arange(1, length)[None, :]  # (W, L-1) position of label j+1
        scored = target_pos >= previous_end[:, None]
        return Corpus(ids, windows, scored, starts, max_length, stride)


def default_max_length(lm, cap: int = 1024) -> int:
    """Window length when none is given: min(cap, the model's context)."""
    config = lm.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or cap
    return int(min(cap, limit))


def build_corpus(lm, data: Path | None, *, fallback_ids=None, text_field: str = "text", max_length: int | None,
                 stride: int | None, max_tokens: int | None = None) -> tuple[Corpus, str, int]:
    """(Corpus, source name, documents): `data` (--data) if given, else `fallback_ids` as one window."""
    length = max_length or default_max_length(lm)
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (got {max_tokens})")
    if data is None:
        ids = fallback_ids.reshape(-1).cpu()  # (T,)
        return Corpus.build(ids, max_length=max(length, 2), stride=stride), "probe text", 1
    docs = load_corpus(data, text_field=text_field)
    ids = tokenize_corpus(lm, docs, max_tokens=max_tokens)
    return Corpus.build(ids, max_length=length, stride=stride), str(data), len(docs)


# --- which neurons a report ranked -----------------------------------------------------------


@dataclass(frozen=True)
class ReportRanking:
    """The ranked neurons of a scan report.json, ready to build mask plans for a loaded model."""

    path: str
    module_names: tuple[str, ...]
    module_index: torch.Tensor  # (N,) index into module_names of rank i
    channels: torch.Tensor  # (N,) channel of rank i
    n_star: int | None
    critical_set: tuple[Neuron, ...]
    epsilon: float
    mask_scale: float
    doc: dict

    def __len__(self) -> int:
        return int(self.channels.numel())

    def top(self, n: int) -> list[Neuron]:
        return [
            Neuron(self.module_names[m], c) for m, c in zip(self.module_index[:n].tolist(), self.channels[:n].tolist())
        ]

    def plan(self, ns: Sequence[int], scale: float = 0.0) -> MaskPlan:
        """Row b masks the top ns[b] ranked neurons."""
        return MaskPlan.top_n(self.module_names, self.module_index, self.channels, ns, scale=scale)

    def require_critical_set(self) -> tuple[Neuron, ...]:
        if not self.critical_set:
            raise UsageError(f"--report {self.path}: the scan did not converge, so there is no critical set to use")
        return self.critical_set

    @staticmethod
    def load(path: Path, lm=None) -> "ReportRanking":
        """Read a scan report; with `lm`, check it was made for this model and its modules exist."""
        doc = read_scan_report(path)
        records = doc["ranking"]
        names: dict[str, int] = {}
        module_index = torch.tensor([names.setdefault(r["module"], len(names)) for r in records], dtype=torch.long)
        channels = torch.tensor([int(r["channel"]) for r in records], dtype=torch.long)
        critical = tuple(Neuron(r["module"], int(r["channel"])) for r in doc.get("critical_set") or [])
        ranking = ReportRanking(
            str(path), tuple(names), module_index, channels, doc.get("n_star"), critical,
            float(doc["params"].get("epsilon", 1.0)), float(doc["params"].get("mask_scale", 0.0)), doc,
        )
        if lm is not None:
            ranking.check_model(lm)
        return ranking

    def check_model(self, lm, *, cross_model: bool = False) -> None:
        """Refuse a report made for another model. `cross_model=True` accepts a report of another model
        of the same architecture (the paper's Table 10: one family's critical set applied to its
        base / instruct / fine-tuned variants) as long as every module and channel exists."""
        model_doc = self.doc.get("model", {})
        expected = model_doc.get("config_sha256")
        if cross_model:
            theirs = model_doc.get("architecture")
            if theirs and theirs != lm.architecture:
                raise InputError(
                    f"--report {self.path} was made for a {theirs}, this model is a {lm.architecture}; "
                    "--cross-model needs the same architecture"
                )
        elif expected and lm.config_sha256 != expected:
            raise InputError(
                f"--report {self.path} was made for another model (config sha256 {expected[:12]}…, this model "
                f"{lm.config_sha256[:12]}…); scan this model first, or pass --cross-model to apply that model's "
                "neurons to a variant of the same architecture"
            )
        for name in {*self.module_names, *(n.module for n in self.critical_set)}:
            try:
                module = lm.model.get_submodule(name)
            except AttributeError:
                raise InputError(
                    f"--report {self.path} names module {name!r}, which this model does not have"
                ) from None
            width = output_width(module)
            used = [n.channel for n in self.critical_set if n.module == name]
            used += (
                self.channels[self.module_index == self.module_names.index(name)].tolist()
                if name in self.module_names
                else []
            )
            if width is not None and used and max(used) >= width:
                raise InputError(f"--report {self.path} names channel {max(used)} of {name}, which has only {width}")



def read_scan_report(path: Path, option: str = "--report") -> dict:
    from achilles_guard.report.documents import SCAN_SCHEMA, read_document

    return read_document(path, schema=SCAN_SCHEMA, option=option,
                         hint=" (run 'guard scan' first; it writes OUT/report.json)")


def parse_levels(spec: str, ranking: ReportRanking) -> list[int]:
    """'0,1,2,n*' -> [0, 1, 2, n*]; each level must lie within the report's ranking."""
    levels = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in ("n*", "nstar", "n_star"):
            if ranking.n_star is None:
                raise UsageError(
                    f"--levels {spec!r}: n* is undefined because the scan in {ranking.path} did not converge"
                )
            levels.append(int(ranking.n_star))
            continue
        try:
            level = int(part)
        except ValueError:
            raise UsageError(f"--levels {spec!r}: {part!r} is not an integer or n*") from None
        if level < 0:
            raise UsageError(f"--levels {spec!r}: {level} is negative; levels count masked neurons")
        if level > len(ranking):
            raise UsageError(
                f"--levels {spec!r}: {level} is beyond the ranking in {ranking.path} ({len(ranking)} neurons); "
                "rescan with a larger --keep"
            )
        levels.append(level)
    if not levels:
        raise UsageError("--levels is empty; give e.g. 0,1,2,n*")
    return sorted(set(levels))


# --- batched masked losses -------------------------------------------------------------------


def select_rows(plan: MaskPlan, rows: torch.Tensor) -> MaskPlan:
    """The plan restricted to the given configuration rows (a plan with one row stays as it is)."""
    factors = {m: (f if f.shape[0] == 1 else f[rows]) for m, f in plan.factors.items()}
    return MaskPlan(dict(plan.channels), factors)


def config_losses(
    model,
    corpus: Corpus,
    plan: MaskPlan | None,
    *,
    configs: int | None = None,
    batch_size: int | None = None,
    progress: RowProgress | None = None,
) -> torch.Tensor:
    """Mean next-token NLL (nats) over the corpus for each configuration (row of `plan`); shape (C,).

    Rows of a forward are (configuration, window) pairs; each row gets its configuration's mask.
    """
    configs = configs if configs is not None else (plan.rows if plan is not None else 1)
    n_windows, length = corpus.windows.shape
    per_batch = batch_size or search_batch_size(model, length)
    config_of = torch.arange(configs).repeat_interleave(n_windows)  # (C*W,)
    window_of = torch.arange(n_windows).repeat(configs)  # (C*W,)
    sums = torch.zeros(configs, dtype=torch.float64)
    device = model.get_input_embeddings().weight.device
    total = int(config_of.numel())
    for start in range(0, total, per_batch):
        c_idx, w_idx = config_of[start : start + per_batch], window_of[start : start + per_batch]
        batch = corpus.windows[w_idx].to(device)  # (B, L)
        with torch.no_grad():
            if plan is None:
                logits = model(input_ids=batch, use_cache=False).logits  # (B, L, V)
            else:
                with masked(model, select_rows(plan, c_idx)):
                    logits = model(input_ids=batch, use_cache=False).logits
        nll = token_nll(logits, batch).cpu()  # (B, L-1) float32 on CPU
        row_sums = (nll.double() * corpus.scored[w_idx]).sum(dim=1)  # (B,)
        sums.index_add_(0, c_idx, row_sums)
        if progress:
            progress(min(start + per_batch, total), total)
    return (sums / corpus.scored_tokens).float()



# --- guard eval ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelResult:
    n: int
    loss: float  # mean NLL in nats
    log10_ppl: float
    delta_log10: float  # vs level 0 (the unmasked model)

    @property
    def ppl(self) -> float | None:
        """Perplexity when it fits a float, else None (report log10_ppl)."""
        return 10.0**self.log10_ppl if self.log10_ppl < 300 else None


@dataclass(frozen=True)
class EvalResult:
    data: str
    documents: int
    corpus: Corpus
    baseline_loss: float
    levels: tuple[LevelResult, ...]
    mask_scale: float

    def as_dict(self, model: dict | None = None) -> dict:
        from achilles_guard.report.documents import TOOL, json_number

        return {
            "schema": EVAL_SCHEMA,
            "tool": dict(TOOL),
            "model": model or {},
            "data": {
                "path": self.data,
                "documents": self.documents,
                "tokens": self.corpus.tokens,
                "scored_tokens": self.corpus.scored_tokens,
                "windows": int(self.corpus.windows.shape[0]),
                "max_length": self.corpus.max_length,
                "stride": self.corpus.stride,
            },
            "mask_scale": self.mask_scale,
            "baseline": {
                "loss": self.baseline_loss,
                "log10_ppl": self.baseline_loss / LN10,
                "ppl": math.exp(self.baseline_loss),
            },
            "levels": [
                {
                    "n": r.n,
                    "loss": json_number(r.loss),
                    "log10_ppl": json_number(r.log10_ppl),
                    "ppl": json_number(r.ppl) if r.ppl is not None else None,
                    "delta_log10": json_number(r.delta_log10),
                }
                for r in self.levels
            ],
        }


def evaluate_levels(
    lm, corpus: Corpus, ranking: ReportRanking, levels: Sequence[int], *, data: str = "", documents: int = 0,
    scale: float = 0.0, batch_size: int | None = None, progress: RowProgress | None = None,
) -> EvalResult:
    """Loss with the top n ranked neurons masked, for n = 0 (the baseline) and every level."""
    ns = [0, *levels]
    losses = config_losses(
        lm.model, corpus, ranking.plan(ns, scale), configs=len(ns), batch_size=batch_size, progress=progress
    ).tolist()
    baseline = losses[0]
    results = tuple(
        LevelResult(n, loss, loss / LN10 if math.isfinite(loss) else math.inf,
                    (loss - baseline) / LN10 if math.isfinite(loss) else math.inf)
        for n, loss in zip(levels, losses[1:])
    )
    return EvalResult(data, documents, corpus, baseline, results, scale)
