"""Detectors: pure functions of one window's rows plus their own state -> alerts.

They see the model only through the topology (``run.json``), never the live
model, and use per-layer rows (``layers.csv``). Each condition is tracked per
(kind, layer): an alert fires when it has held for ``patience`` consecutive
windows, a reminder at most every ``remind_every`` windows while it persists,
and an ``info`` row of the same kind when it has been absent for ``patience``
windows (so a value hovering at a bound cannot start and clear it over and over).

Rules and defaults (calibrated on the examples and scenarios in tests/; see
NOTES.md for the published rules they are derived from):

* ``vanishing_gradient``: a layer's RMS gradient (L2 mean over the window /
  sqrt(entries)) is below ``vanishing_rms`` absolutely, or below
  ``vanishing_ratio`` times the output-most layer's RMS while also below
  ``vanishing_ratio_rms`` (the AUTOTRAINER form: relative and absolute).
* ``exploding_gradient``: a layer's largest L2 norm in the window exceeds
  ``exploding_l2``, or its mean L2 grew at least ``exploding_growth``-fold in
  each of the last ``patience`` windows while above ``exploding_growth_floor``.
* ``dead_relu``: at least ``dead_fraction`` of a ReLU-family layer's units have
  had an exactly-zero gradient for ``dead_steps`` consecutive steps and fed
  zeros forward (see ``probes.UnitProbe``); no patience on top (the steps are it).
* ``no_learning_signal``: the same share of units of a layer get an all-zero
  gradient for ``dead_steps`` steps without being dead ReLUs.
* ``update_ratio``: a layer's ||dw|| / ||w|| per step (its kernels) is above
  ``update_ratio_high`` or below ``update_ratio_low`` (TheDeepChecker's log10
  bounds -1 and -4) on ``patience`` consecutive measured windows.  Layers with
  only 1-D variables (biases, normalisation scales) are not judged: their norm
  starts near zero and their ratio means little.
* ``update_mismatch``: a variable with at least ``update_min_size`` entries
  whose update is consistently unrelated to its gradient — over the last
  ``update_cos_window`` measurements the cosine of its weight change with minus
  its gradient sum averages within +-``update_cos`` and its magnitude averages
  below ``update_cos_spread`` (a swapped gradient of another variable: ~0 +- 0.05)
  — or consistently opposite (mean below -``update_cos_spread``).  Healthy SGD
  gives 1, momentum/Adam/RMSprop 0.3-0.8 on average, with single measurements of
  Adam swinging from -0.7 to 0.9 (hence the average and the magnitude test).
  Layers that vanish, are dead or silent, and updates below
  ``update_ratio_floor`` x the weights (rounding noise) are not judged.  A scalar
  or small vector updated with a gradient of the same sign
  (``b2.assign_sub(lr * gb1)``) is not detectable by direction, nor is a variable
  with fewer than ``update_min_size`` entries.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradwatch._interpret.alerts import HINTS, Alert
from gradwatch._topology import Topology

#: The largest count (steps, windows, entries) a threshold takes.
MAX_COUNT = 10**9


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The detectors' thresholds (``gw.Thresholds``); every value is validated.

    Attributes:
        vanishing_rms: a layer's RMS gradient below this is vanishing.
        vanishing_ratio: ... or below this times the output layer's,
        vanishing_ratio_rms: ... while below this.
        vanishing_update_ratio: a layer whose measured update/weight ratio is at
            least this moves its weights: a small gradient there is not vanishing.
        exploding_l2: a layer norm above this is exploding.
        exploding_growth: ... or a mean norm growing by this factor per window,
        exploding_growth_floor: ... while above this.
        patience: windows a condition must hold before its alert (and be gone before it clears).
        remind_every: windows between two reminders while a condition lasts.
        dead_steps: consecutive steps of exactly-zero gradient after which a unit counts.
        dead_fraction: the fraction of a layer's units for ``dead_relu``/``no_learning_signal``.
        update_ratio_high: an update/weight ratio above this is too fast.
        update_ratio_low: ... below this, too slow.
        update_cos: ``update_mismatch`` when the update's cosine with minus the gradient stays below this,
        update_cos_spread: ... and varies less than this,
        update_cos_window: ... over this many measurements.
        update_ratio_floor: a ratio below this is a frozen layer, not a slow one.
        update_min_size: variables smaller than this are not judged for ``update_mismatch``.
    """

    vanishing_rms: float = 1e-8
    vanishing_ratio: float = 1e-3
    vanishing_ratio_rms: float = 1e-5
    exploding_l2: float = 1e4
    exploding_growth: float = 2.0
    exploding_growth_floor: float = 10.0
    patience: int = 3
    remind_every: int = 100
    dead_steps: int = 200
    dead_fraction: float = 0.5
    update_ratio_high: float = 1e-1
    update_ratio_low: float = 1e-4
    update_cos: float = 0.05
    update_cos_spread: float = 0.2
    update_cos_window: int = 8
    update_ratio_floor: float = 1e-6
    update_min_size: int = 256
    vanishing_update_ratio: float = 1e-4

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
                    raise ValueError(
                        f"Thresholds.{field.name} must be an int from 1 to {MAX_COUNT:,}; received {value!r}."
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
    clear_streak: int = 0  # consecutive windows without it since the alert


@dataclasses.dataclass
class DetectorState:
    """Everything the detectors remember between windows (per run)."""

    window: int = 0
    last_step: int = 0
    # the window had no non-finite gradient step and no non-finite loss: only such a
    # window counts towards clearing a condition (NaN norms look small, not healed)
    clean: bool = True
    conditions: dict[tuple[str, str], _Condition] = dataclasses.field(default_factory=dict)
    previous_l2: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    cosines: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    update_ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # last measured, per layer


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
    stats_rows: list[dict[str, Any]] | None = None,
    clean: bool = True,
) -> list[Alert]:
    """Runs every layer detector on one window; updates ``state`` in place.

    Args:
        layer_rows: the window's ``layers.csv`` rows, input to output.
        topology: the run's topology.
        state: the detectors' state, carried from window to window.
        thresholds: the detectors' thresholds.
        stats_rows: the window's per-variable rows (update mismatch, silent kernels).
        clean: the window had no non-finite gradient or loss step (see ``DetectorState.clean``).

    Returns:
        The window's alerts (raised, and cleared as ``info`` rows).
    """
    state.window += 1
    state.clean = clean
    if layer_rows:
        state.last_step = int(layer_rows[0]["step"])
    entries = {layer.name: 0 for layer in topology.layers}
    for variable, size in zip(topology.variables, topology.variable_sizes()):
        entries[variable.layer] = entries.get(variable.layer, 0) + size
    rows = [row for row in layer_rows if row["grad_steps"]]
    if not rows:
        return []
    step = int(rows[0]["step"])
    for row in rows:
        ratio = _finite_value(row, "update_ratio")
        if ratio is not None:
            state.update_ratios[row["layer"]] = ratio
    output_rms = _rms(rows[-1], entries.get(rows[-1]["layer"], 0))
    alerts: list[Alert] = []
    for index, row in enumerate(rows):
        # not for the output-most layer: it is the reference
        if index < len(rows) - 1:
            alerts += _vanishing(row, _rms(row, entries.get(row["layer"], 0)), output_rms, state,
                                 thresholds, step)
        alerts += _exploding(row, state, thresholds, step)
    silent = _silent_kernels(stats_rows or [], topology)
    alerts += _dead_units(rows, state, thresholds, step, silent)
    # a layer without gradient signal (or a vanishing one) has a tiny update for that
    # reason, not because of its learning rate: the root cause is alerted instead
    vanishing = {layer for (kind, layer), c in state.conditions.items()
                 if kind == "vanishing_gradient" and c.streak > 0}
    quiet = silent | vanishing | {
        row["layer"] for row in rows
        if _finite_value(row, "l2_max") == 0.0
        or (_finite_value(row, "dead_frac") or 0.0) >= thresholds.dead_fraction
        or (_finite_value(row, "no_signal_frac") or 0.0) >= thresholds.dead_fraction
    }
    alerts += _update_ratio([row for row in rows if row["layer"] not in quiet], topology, state,
                            thresholds, step)
    alerts += _update_mismatch(stats_rows or [], topology, state, thresholds, step, quiet)
    return alerts


def _vanishing(row, rms: float, output_rms: float, state: DetectorState, thresholds: Thresholds,
               step: int) -> list[Alert]:
    """A layer's RMS gradient, absolutely or against the output layer's, too small."""
    # an exactly zero gradient is no signal at all (dead units, zero inputs), not a
    # vanishing one; a window with NaN/Inf gradients is the non-finite alert's business
    if bool(row.get("nonfinite", 0)) or not math.isfinite(rms) or rms <= 0 or output_rms <= 0:
        return []
    layer = row["layer"]
    ratio = rms / output_rms
    absolute = rms < thresholds.vanishing_rms
    relative = ratio < thresholds.vanishing_ratio and rms < thresholds.vanishing_ratio_rms
    # a small gradient that moves its weights at a healthy rate (an adaptive optimizer
    # rescales it) is not a problem; one whose update is small too is
    update = state.update_ratios.get(layer)
    moving = update is not None and update >= thresholds.vanishing_update_ratio
    moved = (f"its update/weight ratio is {update:.2g}" if update is not None
             else "its update/weight ratio is not measured (several replicas, or not yet)")
    message = (
        f"Layer {layer!r}: RMS gradient {rms:.3g} "
        f"({ratio:.2g} x the output layer's {output_rms:.3g}) since "
        f"{thresholds.patience} windows, and {moved}: its weights barely move."
    )
    return _track(
        state, thresholds, "vanishing_gradient", layer, (absolute or relative) and not moving, step,
        rms, thresholds.vanishing_rms if absolute else thresholds.vanishing_ratio, message,
    )


def _exploding(row, state: DetectorState, thresholds: Thresholds, step: int) -> list[Alert]:
    """A layer's norm over the bound, or growing by a factor in each of ``patience`` windows."""
    layer = row["layer"]
    nonfinite = bool(row.get("nonfinite", 0))
    l2_max, l2_mean = row["l2_max"], row["l2_mean"]
    history = state.previous_l2.setdefault(layer, [])
    history.append(l2_mean)
    del history[: -(thresholds.patience + 1)]
    grew = len(history) == thresholds.patience + 1 and all(
        later >= thresholds.exploding_growth * earlier > 0
        for earlier, later in zip(history, history[1:])
    )
    # l2_max is of the finite entries: a blow-up is named even in the window it
    # turns into NaN (the non-finite alert says where the NaN appeared)
    big = math.isfinite(l2_max) and l2_max > thresholds.exploding_l2
    growing = grew and l2_mean > thresholds.exploding_growth_floor and not nonfinite
    message = (
        f"Layer {layer!r}: gradient norm up to {l2_max:.3g} in this window"
        + (f", growing >= {thresholds.exploding_growth:g}x per window" if growing else "")
        + "."
    )
    return _track(
        state, thresholds, "exploding_gradient", layer, big or growing, step, l2_max,
        thresholds.exploding_l2, message, immediate=big or growing,  # growth has its own patience
    )


def _finite_value(row: dict[str, Any], column: str) -> float | None:
    value = row.get(column)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _silent_kernels(stats_rows, topology: Topology) -> set[str]:
    """Layers whose kernels got an exactly-zero gradient on every step of the window
    while having one (e.g. a layer whose inputs are all dead units)."""
    kernels = {v.name for v in topology.variables if len(v.shape) >= 2}
    vectors = {v.name for v in topology.variables if len(v.shape) == 1}
    seen: dict[str, bool] = {}
    signal: set[str] = set()  # layers whose bias still gets a gradient (the units are live)
    for row in stats_rows:
        if not row["grad_steps"]:
            continue
        l2_max = _finite_value(row, "l2_max")
        if row["variable"] in kernels:
            seen[row["layer"]] = seen.get(row["layer"], True) and l2_max == 0.0
        elif row["variable"] in vectors and l2_max:
            signal.add(row["layer"])
    return {layer for layer, zero in seen.items() if zero and layer in signal}


def _dead_units(rows, state, thresholds, step, silent: set[str]) -> list[Alert]:
    alerts = []
    for row in rows:
        layer = row["layer"]
        if layer in silent and not (_finite_value(row, "no_signal_frac") or 0.0) >= thresholds.dead_fraction:
            message = (
                f"Layer {layer!r}: its kernel gradient is exactly zero on every step: its inputs are "
                "all zero (e.g. it is fed by dead units) or nothing downstream uses it."
            )
            alerts += _track(state, thresholds, "no_learning_signal", layer, True, step, 1.0,
                             thresholds.dead_fraction, message)
            continue
        for kind, column, what in (
            ("dead_relu", "dead_frac", "dead ReLU units (zero output and zero gradient)"),
            ("no_learning_signal", "no_signal_frac", "units with an all-zero gradient"),
        ):
            value = _finite_value(row, column)
            if value is None:
                continue
            message = (
                f"Layer {layer!r}: {value:.0%} {what} for at least {thresholds.dead_steps} "
                "consecutive steps."
            )
            alerts += _track(state, thresholds, kind, layer, value >= thresholds.dead_fraction, step,
                             value, thresholds.dead_fraction, message, immediate=True)
    return alerts


def _judged_layers(topology: Topology) -> set[str]:
    return {v.layer for v in topology.variables if len(v.shape) >= 2}


def _update_ratio(rows, topology, state, thresholds, step) -> list[Alert]:
    alerts = []
    judged = _judged_layers(topology)
    for row in rows:
        layer = row["layer"]
        ratio = _finite_value(row, "update_ratio")
        if layer not in judged or ratio is None:
            continue  # not measured this window: the streak neither grows nor breaks
        # hysteresis: once alerted, the ratio must come back a factor 2 inside the bounds
        alerted = state.conditions.get(("update_ratio", layer), _Condition()).alerted_at is not None
        margin = 2.0 if alerted else 1.0
        high = ratio > thresholds.update_ratio_high / margin
        low = ratio < thresholds.update_ratio_low * margin
        bound = thresholds.update_ratio_high if high else thresholds.update_ratio_low
        message = (
            f"Layer {layer!r}: update/weight ratio {ratio:.2g} per step "
            + ("(too fast: " if high else "(too slow: " if low else "(")
            + f"healthy is ~1e-3, bounds {thresholds.update_ratio_low:g}..{thresholds.update_ratio_high:g})."
        )
        found = _track(state, thresholds, "update_ratio", layer, high or low, step, ratio, bound, message)
        for alert in found:
            if alert.severity != "info":
                alert.hint = HINTS["update_ratio_high" if high else "update_ratio_low"]
        alerts += found
    return alerts


def _update_mismatch(stats_rows, topology, state, thresholds, step, quiet: set[str]) -> list[Alert]:
    alerts = []
    sizes = dict(zip(topology.variable_names, topology.variable_sizes()))
    window = thresholds.update_cos_window
    for row in stats_rows:
        name = row["variable"]
        cos = _finite_value(row, "update_cos")
        ratio = _finite_value(row, "update_ratio")
        if cos is None or sizes.get(name, 0) < thresholds.update_min_size:
            continue
        if row["layer"] in quiet or (ratio is not None and ratio < thresholds.update_ratio_floor):
            # a vanishing/dead layer's update is rounding noise: its direction means nothing
            state.cosines.pop(name, None)
            continue
        history = state.cosines.setdefault(name, [])
        history.append(cos)
        del history[:-window]
        if len(history) < window:
            continue
        mean = sum(history) / len(history)
        spread = sum(abs(c) for c in history) / len(history)
        # unrelated: consistently near-orthogonal; opposite: consistently against the gradient
        unrelated = abs(mean) < thresholds.update_cos and spread < thresholds.update_cos_spread
        opposite = mean < -thresholds.update_cos_spread
        message = (
            f"Variable {name!r} moved in a direction "
            + ("opposite to" if opposite else "unrelated to")
            + f" its gradient: mean cosine {mean:.2f} (mean |cosine| {spread:.2f}) between its update "
            f"and -gradient over the last {window} measurements (healthy: SGD 1, Adam/momentum "
            "~0.3-0.8 on average)."
        )
        found = _track(state, thresholds, "update_mismatch", row["layer"], unrelated or opposite,
                       step, mean, thresholds.update_cos, message, immediate=True, variable=name)
        alerts += found
    return alerts


def track_alert(state: DetectorState, thresholds: Thresholds, alert: Alert | None, key: str) -> list[Alert]:
    """Applies the start / reminder / recovered life cycle to an alert computed
    elsewhere (e.g. the non-finite one): ``alert`` is None when the condition is absent."""
    condition = state.conditions.setdefault((key, ""), _Condition())
    if alert is None:
        if condition.alerted_at is not None and state.clean:
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
    variable: str = "*",
) -> list[Alert]:
    key = layer if variable == "*" else f"{layer}\x00{variable}"
    condition = state.conditions.setdefault((kind, key), _Condition())
    if not active:
        condition.streak = 0
        if condition.alerted_at is not None:
            # it clears after `patience` clean windows without it: a value hovering at a
            # bound does not start and clear an alert over and over
            condition.clear_streak = condition.clear_streak + 1 if state.clean else 0
            if condition.clear_streak >= thresholds.patience:
                condition.alerted_at = None
                condition.clear_streak = 0
                return [Alert(step, layer, variable, kind, "info", value, threshold,
                              f"Layer {layer!r}: {kind.replace('_', ' ')} has cleared (recovered).", "")]
        return []
    condition.clear_streak = 0
    condition.streak += 1
    due = condition.streak >= thresholds.patience or immediate
    if not due:
        return []
    if condition.alerted_at is None or state.window - condition.alerted_at >= thresholds.remind_every:
        reminder = condition.alerted_at is not None
        condition.alerted_at = state.window
        text = ("Still: " if reminder else "") + message
        return [Alert(step, layer, variable, kind, "warning", value, threshold, text, HINTS.get(kind, ""))]
    return []
