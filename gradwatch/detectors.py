"""Detectors: pure functions of one window's rows plus their own state -> alerts.

They see the model only through the topology (``run.json``), never the live
model, and use per-layer rows (``layers.csv``). Each condition is tracked per
(kind, layer): an alert fires when it has held for ``patience`` consecutive
windows, a reminder at most every ``remind_every`` windows while it persists,
and an ``info`` row of the same kind when it clears.

Rules and defaults (calibrated on the examples and scenarios in tests/; see
NOTES.md for the published rules they are derived from):

* ``vanishing_gradient``: a layer's RMS gradient (L2 mean over the window /
  sqrt(entries)) is below ``vanishing_rms`` absolutely, or below
  ``vanishing_ratio`` times the output-most layer's RMS while also below
  ``vanishing_ratio_rms`` (the AUTOTRAINER form: relative and absolute).
* ``exploding_gradient``: a layer's largest L2 norm in the window exceeds
  ``exploding_l2``, or its mean L2 grew at least ``exploding_growth``-fold in
  each of the last ``patience`` windows while above ``exploding_growth_floor``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradwatch.alerts import HINTS, Alert
from gradwatch.topology import Topology


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Detector thresholds; every value is validated."""

    vanishing_rms: float = 1e-8
    vanishing_ratio: float = 1e-3
    vanishing_ratio_rms: float = 1e-5
    exploding_l2: float = 1e4
    exploding_growth: float = 2.0
    exploding_growth_floor: float = 10.0
    patience: int = 3
    remind_every: int = 100

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(
                        f"Thresholds.{field.name} must be an int >= 1; received {value!r}."
                    )
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                value > 0 and math.isfinite(value)
            ):
                raise ValueError(
                    f"Thresholds.{field.name} must be a finite number > 0; received {value!r}."
                )


@dataclasses.dataclass
class _Condition:
    streak: int = 0  # consecutive windows the condition held
    alerted_at: int | None = None  # window index of the last alert while it persists


@dataclasses.dataclass
class DetectorState:
    """Everything the detectors remember between windows (per run)."""

    window: int = 0
    last_step: int = 0
    conditions: dict[tuple[str, str], _Condition] = dataclasses.field(default_factory=dict)
    previous_l2: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def _rms(row: dict[str, Any], entries: int) -> float:
    value = row["l2_mean"]
    if value is None or not math.isfinite(value) or entries <= 0:
        return float("nan")
    return value / math.sqrt(entries)


def detect(
    layer_rows: list[dict[str, Any]],
    topology: Topology,
    state: DetectorState,
    thresholds: Thresholds,
) -> list[Alert]:
    """Alerts for one window's layer rows; updates ``state`` in place."""
    state.window += 1
    if layer_rows:
        state.last_step = int(layer_rows[0]["step"])
    entries = {layer.name: 0 for layer in topology.layers}
    for variable in topology.variables:
        size = 1
        for dim in variable.shape:
            size *= int(dim)
        entries[variable.layer] = entries.get(variable.layer, 0) + size
    rows = [row for row in layer_rows if row["grad_steps"]]
    if not rows:
        return []
    step = int(rows[0]["step"])
    output_rms = _rms(rows[-1], entries.get(rows[-1]["layer"], 0))
    alerts: list[Alert] = []
    for index, row in enumerate(rows):
        layer = row["layer"]
        if row.get("nonfinite", 0):
            # NaN/Inf gradients are the non-finite alert's business; their finite
            # part says nothing about vanishing or exploding.
            continue
        rms = _rms(row, entries.get(layer, 0))
        # vanishing: not for the output-most layer (it is the reference)
        if index < len(rows) - 1 and math.isfinite(rms) and output_rms > 0:
            ratio = rms / output_rms
            absolute = rms < thresholds.vanishing_rms
            relative = ratio < thresholds.vanishing_ratio and rms < thresholds.vanishing_ratio_rms
            message = (
                f"Layer {layer!r}: RMS gradient {rms:.3g} "
                f"({ratio:.2g} x the output layer's {output_rms:.3g}) since "
                f"{thresholds.patience} windows: its weights barely move."
            )
            alerts += _track(
                state, thresholds, "vanishing_gradient", layer, absolute or relative, step,
                rms, thresholds.vanishing_rms if absolute else thresholds.vanishing_ratio, message,
            )
        # exploding
        l2_max, l2_mean = row["l2_max"], row["l2_mean"]
        history = state.previous_l2.setdefault(layer, [])
        history.append(l2_mean)
        del history[: -(thresholds.patience + 1)]
        grew = len(history) == thresholds.patience + 1 and all(
            later >= thresholds.exploding_growth * earlier > 0
            for earlier, later in zip(history, history[1:])
        )
        big = math.isfinite(l2_max) and l2_max > thresholds.exploding_l2
        growing = grew and l2_mean > thresholds.exploding_growth_floor
        message = (
            f"Layer {layer!r}: gradient norm up to {l2_max:.3g} in this window"
            + (f", growing >= {thresholds.exploding_growth:g}x per window" if growing else "")
            + "."
        )
        alerts += _track(
            state, thresholds, "exploding_gradient", layer, big or growing, step, l2_max,
            thresholds.exploding_l2, message, immediate=big or growing,  # growth has its own patience
        )
    return alerts


def track_alert(state: DetectorState, thresholds: Thresholds, alert: Alert | None, key: str) -> list[Alert]:
    """Applies the start / reminder / recovered life cycle to an alert computed
    elsewhere (e.g. the non-finite one): ``alert`` is None when the condition is absent."""
    condition = state.conditions.setdefault((key, ""), _Condition())
    if alert is None:
        if condition.alerted_at is not None:
            condition.alerted_at = None
            return [Alert(state.last_step, "", "", key, "info", 0.0, 0.0,
                          f"{key.replace('_', ' ').capitalize()}: cleared (recovered).", "")]
        return []
    if condition.alerted_at is None or state.window - condition.alerted_at >= thresholds.remind_every:
        reminder = condition.alerted_at is not None
        condition.alerted_at = state.window
        if reminder:
            alert.message = "Still: " + alert.message
        return [alert]
    return []


def _track(
    state: DetectorState,
    thresholds: Thresholds,
    kind: str,
    layer: str,
    active: bool,
    step: int,
    value: float,
    threshold: float,
    message: str,
    immediate: bool = False,
) -> list[Alert]:
    condition = state.conditions.setdefault((kind, layer), _Condition())
    if not active:
        condition.streak = 0
        if condition.alerted_at is not None:
            condition.alerted_at = None
            return [Alert(step, layer, "*", kind, "info", value, threshold,
                          f"Layer {layer!r}: {kind.replace('_', ' ')} has cleared (recovered).", "")]
        return []
    condition.streak += 1
    due = condition.streak >= thresholds.patience or immediate
    if not due:
        return []
    if condition.alerted_at is None or state.window - condition.alerted_at >= thresholds.remind_every:
        reminder = condition.alerted_at is not None
        condition.alerted_at = state.window
        text = ("Still: " if reminder else "") + message
        return [Alert(step, layer, "*", kind, "warning", value, threshold, text, HINTS[kind])]
    return []
