"""gradwatch: per-step gradient-flow diagnostics for TensorFlow 2 / Keras 3.

Importing ``gradwatch`` is cheap: TensorFlow is loaded only when a name that
needs it (``GradientMonitor``, ``Watch``, ``clip``) is first used, so the CLI's
readers and the TensorBoard plugin never pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it (loaded on first use).
_LAZY = {
    "GradientMonitor": "gradwatch.monitor",
    "Watch": "gradwatch.watch",
    "read_stats": "gradwatch._io.readers",
    "read_windows": "gradwatch._io.readers",
    "read_alerts": "gradwatch._io.readers",
    "read_run": "gradwatch._io.readers",
    "read_segments": "gradwatch._io.readers",
    "list_runs": "gradwatch._io.readers",
    "GradwatchDataError": "gradwatch._io.readers",
    "NonFiniteGradientError": "gradwatch._interpret.alerts",
    "Thresholds": "gradwatch._interpret.detectors",
}
_LAZY_MODULES = {
    "clip": "gradwatch.clip",
    "detectors": "gradwatch._interpret.detectors",
}

__all__ = [
    "GradientMonitor",
    "Watch",
    "read_stats",
    "read_windows",
    "read_alerts",
    "list_runs",
    "read_run",
    "read_segments",
    "GradwatchDataError",
    "NonFiniteGradientError",
    "Thresholds",
    "clip",
    "detectors",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch import clip, detectors
    from gradwatch._interpret.alerts import NonFiniteGradientError
    from gradwatch._interpret.detectors import Thresholds
    from gradwatch._io.readers import (
        GradwatchDataError,
        list_runs,
        read_alerts,
        read_run,
        read_segments,
        read_stats,
        read_windows,
    )
    from gradwatch.monitor import GradientMonitor
    from gradwatch.watch import Watch


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    else:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
