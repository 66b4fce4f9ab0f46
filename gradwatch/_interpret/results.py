"""The data that crosses the seams: a fetched window (recorder -> interpreter) and a
window result (interpreter -> output). Plain numpy and Python values only."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np


@dataclasses.dataclass
class FetchedWindow:
    """One host read of the recorder, as numpy values.

    Attributes:
        columns: per-column window accumulators by name (variables, then layers).
        globals: the window's global accumulators by name.
        units: the unit probe's (zero-gradient run, silent flag) per tracked unit.
        updates: the update probe's result rows, or None without the probe.
        histograms: the histogram probe's (step, counts, signed counts, bounds), or None.
        dead_by_activation: per layer, the activation probe's dead fraction, or None.
    """

    columns: dict[str, np.ndarray]
    globals: dict[str, float]
    units: tuple[np.ndarray, np.ndarray]
    updates: np.ndarray | None = None
    histograms: tuple[np.ndarray, ...] | None = None
    dead_by_activation: np.ndarray | None = None

    @property
    def steps(self) -> int:
        """Returns the number of steps folded into the window."""
        return int(self.globals["steps"])

    @property
    def last_step(self) -> int:
        """Returns the window's last step."""
        return int(self.globals["last_step"])

    @property
    def nonfinite(self) -> bool:
        """Returns whether a step of the window had a non-finite gradient."""
        return self.globals["nonfinite_steps"] > 0


@dataclasses.dataclass
class WindowResult:
    """What one window says, ready for the sinks.

    Attributes:
        window_row: the ``windows.csv`` row.
        stats_rows: one ``stats.csv`` row per variable.
        layer_rows: one ``layers.csv`` row per layer.
        alerts: the window's alerts (``gradwatch._interpret.alerts.Alert``).
        histograms: per layer (and kind), the histogram of the window's histogram step.
        first_step: the window's first step.
    """

    window_row: dict[str, Any]
    stats_rows: list[dict[str, Any]]
    layer_rows: list[dict[str, Any]]
    alerts: list[Any]
    histograms: list[dict[str, Any]]
    first_step: int

    @functools.cached_property
    def alert_rows(self) -> list[dict[str, Any]]:
        """Returns the alerts as ``alerts.csv`` rows (built once, for every sink)."""
        return [alert.to_row() for alert in self.alerts]
