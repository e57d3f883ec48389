"""Disrupt fingerprinted neurons in memory, and restore them: for tests, demos and drills only.

This is the attack the monitor exists to catch: set the weight slices that produce a neuron to
their null value (docs/design.md: zeroing them is the same attack as masking the neuron).

    with disrupted(model, fingerprint, [neuron]):
        ...                            # the monitor should now alarm
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from achilles_guard.engine.neurons import Neuron
from achilles_guard.errors import UsageError
from achilles_guard.integrity.tamper import scaled_slice

__all__ = ["Disruption", "disrupt", "disrupted"]


class Disruption:
    """Originals of the slices a `disrupt` call overwrote; `restore()` puts them back (once)."""

    def __init__(self, saved: list[tuple[torch.Tensor, int, int, torch.Tensor]], neurons: tuple[Neuron, ...]):
        self._saved = saved
        self.neurons = neurons

    def restore(self) -> None:
        with torch.no_grad():
            for param, axis, index, original in reversed(self._saved):
                param.select(axis, index).copy_(original)
        self._saved = []


def disrupt(model, fingerprint, neurons: Iterable[Neuron], *, scale: float = 0.0) -> Disruption:
    """Scale each neuron's producing slices by `scale` in memory (`tamper.scaled_slice`; 0 = the null value)."""
    records = {r.neuron: r for r in fingerprint.neurons}
    chosen = tuple(neurons)
    unknown = [str(n) for n in chosen if n not in records]
    if unknown:
        raise UsageError(f"neuron {unknown[0]} is not in the fingerprint; pick one of its fingerprinted neurons")
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = []
    with torch.no_grad():
        for neuron in chosen:
            for key in records[neuron].slices:
                rec = fingerprint.slices[key]
                row = params[rec.param].select(rec.axis, rec.index)
                saved.append((params[rec.param], rec.axis, rec.index, row.clone()))
                row.copy_(scaled_slice(row, scale, rec.null_value))
    return Disruption(saved, chosen)


@contextmanager
def disrupted(model, fingerprint, neurons: Iterable[Neuron], *, scale: float = 0.0) -> Iterator[Disruption]:
    handle = disrupt(model, fingerprint, neurons, scale=scale)
    try:
        yield handle
    finally:
        handle.restore()
