"""The paper's PCICN settings (Qin et al. 2025), in one place.

Every default of `pcicn.rank`/`pcicn.search`, `scan.ScanParams` and the `guard scan` /
`guard study` options reads from `PAPER`, so changing a default changes it everywhere.

    from achilles_guard.engine.paper import PAPER
    PAPER.alpha, PAPER.samples, PAPER.seed     # 5.0, 100, 42
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperDefaults", "PAPER"]


@dataclass(frozen=True)
class PaperDefaults:
    alpha: float = 5.0  # stage 1 noise scale α
    samples: int = 100  # stage 1 Monte-Carlo samples K
    seed: int = 42  # noise generator seed
    epsilon: float = 1.0  # stage 2 collapse threshold ε, orders of magnitude of perplexity
    step: int = 1  # stage 2 search step Δn
    max_neurons: int = 1000  # stage 2 search budget
    mask_scale: float = 0.0  # β: a masked neuron outputs β · value


PAPER = PaperDefaults()
