"""The interpreter: a fetched window in, a window result out (rows, histograms,
alerts), with every detector and alert life cycle and their state. No TensorFlow."""

from __future__ import annotations

import math

import numpy as np

from gradwatch._interpret import alerts as alerts_lib
from gradwatch._interpret import detectors as detectors_lib
from gradwatch._interpret import rows as rows_lib
from gradwatch._interpret.probe_layout import (
    UpdateDecoding,
    dead_after,
    decode_histograms,
    decode_units,
    unit_tracks,
)
from gradwatch._interpret.results import FetchedWindow, WindowResult
from gradwatch._topology import Topology


class Interpreter:
    """Turns the windows of one run into rows and alerts, in window order.

    Args:
        topology: the run's topology.
        thresholds: the detectors' thresholds.
        clipping: whether the run clips (the clip columns are meaningful).
        loss_scale_optimizer: whether a ``LossScaleOptimizer`` skips overflow steps
            itself (such a non-finite step is ``info``, not an error).
        signed_histograms: whether signed histograms were counted.
    """

    def __init__(self, topology: Topology, thresholds: detectors_lib.Thresholds, clipping: bool,
                 loss_scale_optimizer: bool = False, signed_histograms: bool = False):
        self._topology = topology
        self._thresholds = thresholds
        self._clipping = clipping
        self._loss_scale_optimizer = loss_scale_optimizer
        self._signed = signed_histograms
        self._tracks = unit_tracks(topology)
        self._updates = UpdateDecoding(topology)
        self._state = detectors_lib.DetectorState()
        self._no_gradient_reported: set[str] = set()
        # the first step of the non-finite stretch that runs to the last window (None: none)
        self._unclean_since: int | None = None
        self._last_step = 0
        self._steps_seen = 0  # steps of every window read so far (the unit probe's counters since bind)

    def interpret(self, fetched: FetchedWindow, fallback_loss: float | None = None) -> WindowResult:
        """Interprets one window.

        Args:
            fetched: the recorder's read.
            fallback_loss: the loss to report when the window's own is unknown.

        Returns:
            The window's rows, histograms and alerts.
        """
        self._steps_seen += int(fetched.steps)
        self._state.dead_after = dead_after(self._thresholds.dead_steps, self._steps_seen)
        columns = self._columns(fetched)
        window_row, stats_rows, layer_rows = rows_lib.build_rows(
            columns, fetched.globals, self._topology, clipping=self._clipping)
        if not math.isfinite(window_row["loss"]) and fallback_loss is not None:
            window_row["loss"] = float(fallback_loss)
        # detect() first: it advances the detectors' window and step, which the
        # non-finite alert's life cycle dates its rows by
        glob = fetched.globals
        clean = not glob["nonfinite_steps"] and not glob.get("loss_nonfinite_steps", 0.0)
        self._unclean_since = alerts_lib.divergence_since(self._unclean_since, window_row)
        self._last_step = fetched.last_step
        evidence = (self._updates.evidence(fetched.updates, self._topology.variable_names)
                    if fetched.updates is not None else {})
        detected = detectors_lib.detect(layer_rows, self._topology, self._state, self._thresholds, stats_rows,
                                        clean=bool(clean), cos_evidence=evidence)
        alerts = self._nonfinite(window_row, columns) + self._no_gradient(window_row, stats_rows) + detected
        histograms = (decode_histograms(self._topology, fetched.histograms, self._signed)
                      if fetched.histograms is not None else [])
        return WindowResult(window_row, stats_rows, layer_rows, alerts, histograms,
                            first_step=fetched.last_step - fetched.steps + 1)

    def finish(self) -> list[alerts_lib.Alert]:
        """The run's last word, at its end: an error row when it ended diverged (every step
        non-finite from some step on; one last non-finite step, e.g. a stop, is not a divergence)."""
        if self._unclean_since is None or self._unclean_since >= self._last_step:
            return []
        return [alerts_lib.diverged_alert(self._unclean_since, self._last_step)]

    def _columns(self, fetched: FetchedWindow) -> dict[str, np.ndarray]:
        """Returns the per-column values: the accumulators and the probes' decoded values."""
        columns = dict(fetched.columns)
        num_vars = len(self._topology.variables)
        dead, no_signal = decode_units(self._tracks, len(self._topology.layers), fetched.units,
                                       self._state.dead_after)
        if fetched.dead_by_activation is not None:
            by_activation = fetched.dead_by_activation
            dead = np.where(np.isnan(by_activation), dead, by_activation)
        columns["dead_frac"] = np.concatenate([np.full(num_vars, np.nan), dead])
        columns["no_signal_frac"] = np.concatenate([np.full(num_vars, np.nan), no_signal])
        if fetched.updates is not None:
            columns["update_ratio"], columns["update_cos"] = self._updates.decode(fetched.updates)
        return columns

    def _nonfinite(self, window_row, columns) -> list[alerts_lib.Alert]:
        """Returns the non-finite alert rows: errors follow the alert life cycle (no storm
        while training stays NaN); loss-scale overflow info rows come as they are."""
        alert = alerts_lib.nonfinite_alert(window_row, columns["nonfinite_at_first"], self._topology,
                                           loss_scale_optimizer=self._loss_scale_optimizer)
        if alert is not None and alert.severity == "info":
            return [alert]
        return detectors_lib.track_alert(self._state, self._thresholds, alert, "nonfinite_gradient")

    def _no_gradient(self, window_row, stats_rows) -> list[alerts_lib.Alert]:
        """Returns a warning, once per variable, for a variable that got no gradient."""
        alerts = []
        for row in stats_rows:
            if row["grad_steps"] == 0 and row["variable"] not in self._no_gradient_reported:
                self._no_gradient_reported.add(row["variable"])
                alerts.append(alerts_lib.Alert(
                    window_row["step"], row["layer"], row["variable"], "no_gradient", "warning", 0.0, 0.0,
                    f"Variable {row['variable']!r} got no gradient (None): it is trainable but "
                    "disconnected from the loss.",
                    alerts_lib.HINTS["no_gradient"]))
        return alerts
