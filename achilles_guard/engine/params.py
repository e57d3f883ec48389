"""What a scan is asked to do, checked before anything loads: no torch here.

`ScanParams` (every knob of a scan, with the paper's defaults), the names of the rankings, attacks and
candidate presets, and the probe texts read from --text / --text-file. `guard fleet scan` validates a
whole registry's options with these before it starts a single worker, without importing torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from achilles_guard.engine.adapters import PAPER_NAME_RE, PRESETS
from achilles_guard.engine.paper import PAPER
from achilles_guard.errors import InputError, UsageError

__all__ = ["RANKINGS", "ATTACKS", "ScanParams", "parse_attacks", "parse_components", "read_probe_texts"]

RANKINGS = ("pcicn", "activation", "gradient", "random")
ATTACKS = ("pcicn", "activation", "gradient", "greedy")


@dataclass(frozen=True)
class ScanParams:
    """Every knob of a scan, with the paper's defaults."""

    alpha: float = PAPER.alpha
    samples: int = PAPER.samples
    seed: int = PAPER.seed
    epsilon: float = PAPER.epsilon
    step: int = PAPER.step
    max_neurons: int = PAPER.max_neurons
    components: str = "all"
    ranking: str = "pcicn"
    mask_scale: float = PAPER.mask_scale
    keep: int = 1000
    attacks: str = "all"  # the portfolio (portfolio.ATTACKS); the paper's result is always computed
    greedy_pool: int | None = None  # top-M of each ranking form greedy's pool; None: 64 (capped at the candidates)

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
            (math.isfinite(self.mask_scale), "--mask-scale must be a finite number"),
            (self.greedy_pool is None or self.greedy_pool >= 1, f"--greedy-pool must be >= 1 (got {self.greedy_pool})"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        parse_components(self.components)
        parse_attacks(self.attacks)
        return self

    @property
    def attack_list(self) -> tuple[str, ...]:
        return parse_attacks(self.attacks)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_components(spec: str) -> tuple[str, object]:
    """`("preset", labels)`, `("paper", regex)` or `("regex", compiled)`; UsageError otherwise."""
    if spec in PRESETS:
        return "preset", PRESETS[spec]
    if spec == "paper":
        return "paper", PAPER_NAME_RE
    if spec.startswith("re:") or any(ch in spec for ch in ".*+?[]()|^$\\"):
        pattern = spec[3:] if spec.startswith("re:") else spec
        try:
            return "regex", re.compile(pattern)
        except re.error as err:
            raise UsageError(f"--components: bad regular expression {pattern!r}: {err}") from None
    known = ", ".join([*PRESETS, "paper"])
    raise UsageError(
        f"--components: unknown preset {spec!r}; use one of {known}, or a regular expression "
        "(prefix it with 're:' if it has no special characters)"
    )


def parse_attacks(spec: str) -> tuple[str, ...]:
    """`all` or a comma-separated list of ATTACKS, in canonical order; UsageError otherwise."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not names:
        raise UsageError(f"--attacks {spec!r}: give all or a comma-separated list of {', '.join(ATTACKS)}")
    if names == ["all"]:
        return ATTACKS
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise UsageError(f"--attacks: unknown attack {unknown[0]!r}; use all or some of {', '.join(ATTACKS)}")
    return tuple(a for a in ATTACKS if a in names)


def read_probe_texts(texts: list[str], text_files: list[Path]) -> list[tuple[str, str]]:
    """`[(name, text)]` from --text / --text-file, else the packaged default texts."""
    probes = [(f"text-{i + 1}", t) for i, t in enumerate(texts)]
    for path in text_files:
        if not path.is_file():
            raise InputError(f"--text-file {path}: no such file")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--text-file {path}: cannot read it as UTF-8 text ({err})") from None
        if not content.strip():
            raise InputError(f"--text-file {path}: the file is empty")
        probes.append((path.stem, content.strip()))
    if not probes:
        from achilles_guard.engine.texts import default_texts

        probes = default_texts()
    return probes
