"""Runtime monitoring of the critical neurons: live activations, weight integrity, canary, metrics.

    from prometheus_client import CollectorRegistry
    from achilles_guard.monitor import ActivationMonitor

    with ActivationMonitor(model, fingerprint, registry=CollectorRegistry(), tokenizer=tok) as monitor:
        model(input_ids)
        monitor.state().last.score      # 0.0 when the critical neurons look like their baseline
"""

from achilles_guard.monitor.activation import ActivationMonitor, ForwardReading, MonitorConfig, MonitorState
from achilles_guard.monitor.canary import Canary, CanaryResult
from achilles_guard.monitor.metrics import EXPORTED_NAMES, MonitorMetrics
from achilles_guard.monitor.runtime_integrity import RuntimeIntegrityChecker, RuntimeIntegrityResult
from achilles_guard.monitor.tamper import Disruption, disrupt, disrupted

__all__ = [
    "ActivationMonitor",
    "MonitorConfig",
    "MonitorState",
    "ForwardReading",
    "Canary",
    "CanaryResult",
    "RuntimeIntegrityChecker",
    "RuntimeIntegrityResult",
    "MonitorMetrics",
    "EXPORTED_NAMES",
    "Disruption",
    "disrupt",
    "disrupted",
]
