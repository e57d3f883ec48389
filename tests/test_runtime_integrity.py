"""monitor.runtime_integrity: live slices re-hashed; offloaded (meta) slices are counted as skipped, not checked."""

from __future__ import annotations

import torch

from achilles_guard.formats.load import load_model
from achilles_guard.integrity.fingerprint import load_fingerprint
from achilles_guard.monitor.runtime_integrity import RuntimeIntegrityChecker


def test_offloaded_slices_are_skipped_not_counted_as_checked(planted_scan):
    path, _, out = planted_scan
    fp = load_fingerprint(out / "fingerprint.safetensors")
    lm = load_model(path, dtype="float32", device="cpu")
    total = len(fp.slices)
    assert RuntimeIntegrityChecker(lm.model, fp).check().checked == total

    param_name = fp.slices[sorted(fp.slices)[0]].param  # as accelerate leaves an offloaded weight: on "meta"
    module_name, _, attr = param_name.rpartition(".")
    module = lm.model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(torch.empty_like(getattr(module, attr), device="meta")))
    offloaded = sum(1 for s in fp.slices.values() if s.param == param_name)
    result = RuntimeIntegrityChecker(lm.model, fp).check()
    assert result.ok and result.skipped == offloaded >= 1
    assert result.checked == total - offloaded  # only what was actually hashed
