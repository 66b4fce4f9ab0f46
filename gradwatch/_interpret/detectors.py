"""Detectors: pure functions of one window's rows plus their own state -> alerts.

They see the model only through the topology (``run.json``), never the live
model, and use per-layer rows (``layers.csv``). Each condition is tracked per
(kind, layer): an alert fires when it has held for ``patience`` steps (over whole
consecutive windows: with the default 30 that is 3 windows at ``log_every=10``, and
the first window at ``log_every`` >= 30), a reminder at most every ``remind_every``
steps while it persists, and an ``info`` row of the same kind when it has been absent
for ``patience`` steps (so a value hovering at a bound cannot start and clear it over
and over).  Counted in steps, the latency does not depend on ``log_every``.

Rules and defaults (calibrated on the examples and scenarios in tests/; see
NOTES.md for the published rules they are derived from):

* ``vanishing_gradient``: a layer's RMS gradient (L2 mean over the window /
  sqrt(entries)) is below ``vanishing_rms`` absolutely, or below
  ``vanishing_ratio`` times the output-most layer's RMS while also below
  ``vanishing_ratio_rms`` (the AUTOTRAINER form: relative and absolute).
* ``exploding_gradient``: a layer's largest L2 norm in the window exceeds
  ``exploding_l2``, or its mean L2 grew at the rate of ``exploding_growth``-fold per
  ``GROWTH_STEPS`` (10) steps in each window over the last ``GROWTH_SPAN`` (30) steps
  while above ``exploding_growth_floor`` (counted in steps, whatever ``log_every``).
* ``dead_relu``: at least ``dead_fraction`` of a ReLU-family layer's units have
  had an exactly-zero gradient for ``dead_steps`` consecutive steps and fed
  zeros forward (see ``probes.UnitProbe``); no patience on top (the steps are it).
  Early in a run, units zero on every step so far count once there are
  ``probe_layout.EARLY_DEAD_STEPS`` (8) steps: a layer dead from step 1 is reported at
  the first read after step 8 (and a fit reads at the end of an epoch within the
  first ``dead_steps`` steps), so short runs report it.
* ``no_learning_signal``: the same share of units of a layer get an all-zero
  gradient for ``dead_steps`` steps without being dead ReLUs.
* ``update_ratio``: a layer's ||dw|| / ||w|| per step (its kernels) is above
  ``update_ratio_high`` or below ``update_ratio_low`` (TheDeepChecker's log10
  bounds -1 and -4) over ``patience`` steps of measured windows; at once when one
  step moved a layer's kernels by more than their norm (10 x ``update_ratio_high``).  Layers with
  only 1-D variables (biases, normalisation scales) are not judged: their norm
  starts near zero and their ratio means little.
* ``update_mismatch``: a variable whose update is unrelated to its gradient, as a
  statistical test over its last ``update_cos_window`` measurements (dense early in a
  run: see ``probe_layout.snapshot_due``).  For an update in a random direction the
  cosine with minus the gradient is ~N(0, 1/n) in n entries, so n x the sum of m
  squared cosines is ~chi-square(m); the variable is flagged when its RMS cosine is
  below that distribution's 1% bound, and judged only once a healthy optimizer's
  least average cosine (``update_cos``, 0.3: healthy SGD gives 1,
  momentum/Adam/RMSprop 0.3-0.8 on average, single Adam measurements swinging from
  -0.7 to 0.9) lies beyond the bound — the evidence grows with the variable's size and
  the number of measurements (36 entries: 5 measurements; 1,000: 3).  Consistently
  opposite (a significant mean below -``update_cos_spread``) is flagged too.  Layers
  that vanish, are dead or silent, and updates below ``update_ratio_floor`` x the
  weights (rounding noise) are not judged.  A scalar or small vector updated with a
  gradient of the same sign (``b2.assign_sub(lr * gb1)``) is not detectable by direction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradwatch._interpret.alerts import HINTS, Alert
from gradwatch._topology import Topology

#: An update/weight ratio this many times ``update_ratio_high`` is alerted at once.
UPDATE_RATIO_BLOWN = 10.0

#: A mean norm growing ``exploding_growth``-fold every GROWTH_STEPS steps, in each window
#: over at least GROWTH_SPAN steps, is exploding (at ``log_every=10``: 2x in each of the
#: last 3 windows; at ``log_every=100``: 1024x in each of the last 2; at 1: 1.07x in each
#: of the last 30 steps).
GROWTH_STEPS = 10
GROWTH_SPAN = 30

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
        exploding_growth: ... or a mean norm growing by this factor per 10 steps (in each window
            of the last 30 steps),
        exploding_growth_floor: ... while above this.
        patience: steps a condition must hold before its alert (and be gone before it clears).
        remind_every: steps between two reminders while a condition lasts.
        dead_steps: consecutive steps of exactly-zero gradient after which a unit counts.
        dead_fraction: the fraction of a layer's units for ``dead_relu``/``no_learning_signal``.
        update_ratio_high: an update/weight ratio above this is too fast.
        update_ratio_low: ... below this, too slow.
        update_cos: the least mean cosine between a healthy update and minus its gradient:
            ``update_mismatch`` (unrelated) needs the measured cosines to be as small as a random
            direction's, and is judged only once this healthy level lies beyond them,
        update_cos_spread: ... (opposite) a mean cosine below minus this,
        update_cos_window: ... over at most this many measurements (the latest).
        update_ratio_floor: a ratio below this is a frozen layer, not a slow one.
        update_min_size: variables smaller than this are not judged for ``update_mismatch``
            (smaller ones are judged only once enough measurements are in, see above).
    """

    vanishing_rms: float = 1e-8
    vanishing_ratio: float = 1e-3
    vanishing_ratio_rms: float = 1e-5
    exploding_l2: float = 1e4
    exploding_growth: float = 2.0
    exploding_growth_floor: float = 10.0
    patience: int = 30
    remind_every: int = 1000
    dead_steps: int = 50
    dead_fraction: float = 0.5
    update_ratio_high: float = 1e-1
    update_ratio_low: float = 1e-4
    update_cos: float = 0.3
    update_cos_spread: float = 0.2
    update_cos_window: int = 16
    update_ratio_floor: float = 1e-6
    update_min_size: int = 1
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
    since: int | None = None  # first step of the windows it has held in, without a break
    alerted_at: int | None = None  # step of the last alert while it persists
    absent_since: int | None = None  # first step of the clean windows without it since the alert


@dataclasses.dataclass
class DetectorState:
    """Everything the detectors remember between windows (per run)."""

    window: int = 0
    last_step: int = 0
    first_step: int = 1  # the window's first step
    # the window had no non-finite gradient step and no non-finite loss: only such a
    # window counts towards clearing a condition (NaN norms look small, not healed)
    clean: bool = True
    conditions: dict[tuple[str, str], _Condition] = dataclasses.field(default_factory=dict)
    previous_l2: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)  # (steps, mean)
    # per variable, the direction measurements (count, sum, sum of squares) of recent windows
    cosines: dict[str, list[tuple[int, float, float]]] = dataclasses.field(default_factory=dict)
    update_ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # last measured, per layer
    # the zero-gradient steps after which a unit counted in this window (probe_layout.dead_after)
    dead_after: int | None = None


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
    cos_evidence: dict[str, tuple[int, float, float]] | None = None,
) -> list[Alert]:
    """Runs every layer detector on one window; updates ``state`` in place.

    Args:
        layer_rows: the window's ``layers.csv`` rows, input to output.
        topology: the run's topology.
        state: the detectors' state, carried from window to window.
        thresholds: the detectors' thresholds.
        stats_rows: the window's per-variable rows (update mismatch, silent kernels).
        clean: the window had no non-finite gradient or loss step (see ``DetectorState.clean``).
        cos_evidence: per variable, the window's direction measurements (count, sum of
            cosines, sum of squares); None: each row's ``update_cos`` is one measurement.

    Returns:
        The window's alerts (raised, and cleared as ``info`` rows).
    """
    state.window += 1
    state.clean = clean
    if layer_rows:
        state.last_step = int(layer_rows[0]["step"])
        state.first_step = state.last_step - int(layer_rows[0].get("steps") or 1) + 1
    entries = _layer_entries(topology)
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
    if clean:  # NaN activations give zero ReLU gradients: a non-finite window tells no dead unit
        alerts += _dead_units(rows, state, thresholds, step, silent)
    quiet = _quiet_layers(rows, state, thresholds, silent)
    alerts += _update_ratio([row for row in rows if row["layer"] not in quiet], topology, state,
                            thresholds, step)
    alerts += _update_mismatch(stats_rows or [], topology, state, thresholds, step, quiet, cos_evidence)
    return alerts


def _quiet_layers(rows, state: DetectorState, thresholds: Thresholds, silent: set[str]) -> set[str]:
    """A layer without gradient signal (or a vanishing one) has a tiny update for that
    reason, not because of its learning rate: the root cause is alerted instead."""
    vanishing = {layer for (kind, layer), c in state.conditions.items()
                 if kind == "vanishing_gradient" and c.since is not None}
    return silent | vanishing | {
        row["layer"] for row in rows
        if _finite_value(row, "l2_max") == 0.0
        or (_finite_value(row, "dead_frac") or 0.0) >= thresholds.dead_fraction
        or (_finite_value(row, "no_signal_frac") or 0.0) >= thresholds.dead_fraction
    }


def _layer_entries(topology: Topology) -> dict[str, int]:
    entries = {layer.name: 0 for layer in topology.layers}
    for variable, size in zip(topology.variables, topology.variable_sizes()):
        entries[variable.layer] = entries.get(variable.layer, 0) + size
    return entries


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
    moved = (f"its update/weight ratio is {update:.2g} (below {thresholds.vanishing_update_ratio:g})"
             if update is not None
             else "its update/weight ratio is not measured (several replicas, or not yet)")
    # the value and threshold are the rule that holds: absolute RMS, else RMS relative to the output's
    if absolute:
        value, threshold = rms, thresholds.vanishing_rms
        said = f"RMS gradient {rms:.3g}, below {threshold:g}"
    else:
        value, threshold = ratio, thresholds.vanishing_ratio
        said = (f"RMS gradient {ratio:.3g} x the output layer's ({rms:.3g} vs {output_rms:.3g}), "
                f"below {threshold:g} x")
    message = (f"Layer {layer!r}: {said} for {thresholds.patience}+ steps, and {moved}: its weights "
               "barely move.")
    return _track(state, thresholds, "vanishing_gradient", layer, (absolute or relative) and not moving, step,
                  value, threshold, message)


def _exploding(row, state: DetectorState, thresholds: Thresholds, step: int) -> list[Alert]:
    """A layer's norm over the bound, or its mean norm growing at ``exploding_growth``-fold
    per ``GROWTH_STEPS`` steps in each window over the last ``GROWTH_SPAN`` steps."""
    layer = row["layer"]
    nonfinite = bool(row.get("nonfinite", 0))
    l2_max, l2_mean = row["l2_max"], row["l2_mean"]
    rates = _growth_rates(state.previous_l2.setdefault(layer, []), int(row.get("steps") or 1), l2_mean)
    grew = rates is not None and min(rates) >= thresholds.exploding_growth
    # l2_max is of the finite entries: a blow-up is named even in the window it
    # turns into NaN (the non-finite alert says where the NaN appeared)
    big = math.isfinite(l2_max) and l2_max > thresholds.exploding_l2
    growing = grew and l2_mean > thresholds.exploding_growth_floor and not nonfinite
    if big or not growing:
        value, threshold = l2_max, thresholds.exploding_l2
        message = f"Layer {layer!r}: gradient norm up to {l2_max:.3g} in this window, above {threshold:g}."
    else:
        value, threshold = min(rates), thresholds.exploding_growth
        message = (f"Layer {layer!r}: mean gradient norm grew at least {value:.3g}x per {GROWTH_STEPS} "
                   f"steps in each window of the last {GROWTH_SPAN}+ steps (to {l2_mean:.3g}; alert at "
                   f"{threshold:g}x above {thresholds.exploding_growth_floor:g}).")
    return _track(
        state, thresholds, "exploding_gradient", layer, big or growing, step, value,
        threshold, message, immediate=big or growing,  # growth has its own patience
    )


def _growth_rates(history: list[tuple[int, float]], steps: int, mean: float) -> list[float] | None:
    """Adds the window (``steps`` steps, mean norm ``mean``) to ``history`` and returns each
    window's growth over the one before, as a factor per ``GROWTH_STEPS`` steps, for the
    windows that cover the last ``GROWTH_SPAN`` steps (None: fewer steps seen so far)."""
    history.append((steps, mean))
    rates, span = [], 0
    for (_, earlier), (later_steps, later) in zip(reversed(history[:-1]), reversed(history)):
        if span >= GROWTH_SPAN:
            break
        if not (earlier > 0 and math.isfinite(earlier) and math.isfinite(later)):
            return None
        try:
            rates.append((later / earlier) ** (GROWTH_STEPS / max(later_steps, 1)))  # 0: fell to zero
        except OverflowError:
            rates.append(math.inf)  # an overflow's jump is just "huge"
        span += later_steps
    # keep just the windows the next rule needs: one before the span's
    while len(history) > 2 and sum(n for n, _ in history[2:]) >= GROWTH_SPAN:
        del history[0]
    return rates if span >= GROWTH_SPAN else None


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
        if not row["grad_steps"] or row.get("nonfinite"):
            continue  # a NaN gradient's finite part can be empty: that is no silence
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
                f"Layer {layer!r}: its kernel gradient is exactly zero on 100% of the window's steps: its "
                "inputs are all zero (e.g. it is fed by dead units) or nothing downstream uses it."
            )
            # value: the share of the window's steps with a zero kernel gradient (all of them)
            alerts += _track(state, thresholds, "no_learning_signal", layer, True, step, 1.0, 1.0, message)
            continue
        for kind, column, what in (
            ("dead_relu", "dead_frac", "dead ReLU units (zero output and zero gradient)"),
            ("no_learning_signal", "no_signal_frac", "units with an all-zero gradient"),
        ):
            value = _finite_value(row, column)
            if value is None:
                continue
            steps = state.dead_after or thresholds.dead_steps
            since = (f"on every step so far ({steps} steps)" if steps < thresholds.dead_steps
                     else f"for at least {steps} consecutive steps")
            message = f"Layer {layer!r}: {value:.0%} {what} {since}."
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
        # one step that moves the weights by more than their own norm (10x the high bound)
        # is never healthy: no patience (a huge learning rate soon inflates the weights and
        # the ratio falls back)
        blown = ratio > UPDATE_RATIO_BLOWN * thresholds.update_ratio_high
        found = _track(state, thresholds, "update_ratio", layer, high or low, step, ratio, bound, message,
                       immediate=blown)
        for alert in found:
            if alert.severity != "info":
                alert.hint = HINTS["update_ratio_high" if high else "update_ratio_low"]
        alerts += found
    return alerts


#: The one-sided normal quantile of the direction test (1%: a random direction looks
#: related to the gradient by chance once in a hundred tests).
_NULL_Z = 2.326
#: The fewest direction measurements a verdict rests on.
MIN_COS_MEASUREMENTS = 3


def chi2_quantile(dof: int, z: float = _NULL_Z) -> float:
    """The upper quantile of a chi-square with ``dof`` degrees of freedom at normal quantile
    ``z`` (Wilson-Hilferty; within 1% of the exact value for dof >= 1 at z = 2.326)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


@dataclasses.dataclass
class CosEvidence:
    """A variable's direction measurements (update vs. -gradient cosines), pooled."""

    count: int = 0
    total: float = 0.0  # sum of cosines
    squares: float = 0.0  # sum of squared cosines

    def verdict(self, entries: int, thresholds: Thresholds) -> tuple[str, float, float]:
        """Returns ("unrelated" | "opposite" | "", value, threshold) for a variable of ``entries``.

        For a direction unrelated to the gradient, each cosine is that of a random
        direction in ``entries`` dimensions: entries x cos^2 is ~chi-square(1), and over
        m measurements the sum ~chi-square(m).  A healthy optimizer's cosines average at
        least ``update_cos`` (so the mean square is at least its square): a variable is
        judged only when that healthy level lies beyond the random one's 1% bound, which
        takes fewer measurements the larger the variable.
        """
        m = self.count
        if m < MIN_COS_MEASUREMENTS or entries < thresholds.update_min_size:
            return "", math.nan, math.nan
        mean = self.total / m
        rms = math.sqrt(max(self.squares, 0.0) / m)
        bound = math.sqrt(chi2_quantile(m) / (m * entries))  # random directions' RMS cosine at 1%
        significant = mean * math.sqrt(m * entries) < -_NULL_Z
        if (mean < -thresholds.update_cos_spread and significant
                and m >= max(MIN_COS_MEASUREMENTS, thresholds.update_cos_window // 2)):
            return "opposite", mean, -thresholds.update_cos_spread
        if bound < thresholds.update_cos and rms < bound:
            return "unrelated", rms, bound
        return "", rms, bound


def _cos_measurements(row, cos_evidence) -> tuple[int, float, float] | None:
    if cos_evidence is not None:
        return cos_evidence.get(row["variable"])
    cos = _finite_value(row, "update_cos")  # rows without the pooled evidence: one measurement each
    return None if cos is None else (1, cos, cos * cos)


def _pooled(history: list[tuple[int, float, float]], window: int) -> CosEvidence:
    """The last windows' measurements, the oldest dropped while at least ``window`` remain."""
    while len(history) > 1 and sum(h[0] for h in history[1:]) >= window:
        del history[0]
    return CosEvidence(sum(h[0] for h in history), sum(h[1] for h in history), sum(h[2] for h in history))


def _update_mismatch(stats_rows, topology, state, thresholds, step, quiet: set[str],
                     cos_evidence=None) -> list[Alert]:
    alerts = []
    sizes = dict(zip(topology.variable_names, topology.variable_sizes()))
    for row in stats_rows:
        name = row["variable"]
        measured = _cos_measurements(row, cos_evidence)
        ratio = _finite_value(row, "update_ratio")
        if not measured or measured[0] <= 0:
            continue
        if row["layer"] in quiet or (ratio is not None and ratio < thresholds.update_ratio_floor):
            # a vanishing/dead layer's update is rounding noise: its direction means nothing
            state.cosines.pop(name, None)
            continue
        history = state.cosines.setdefault(name, [])
        history.append(measured)
        pooled = _pooled(history, thresholds.update_cos_window)
        entries = sizes.get(name, 0)
        verdict, value, bound = pooled.verdict(entries, thresholds)
        if math.isnan(value):
            continue
        if verdict == "opposite":
            message = (f"Variable {name!r} moved against its gradient: mean cosine {value:.2f} between its "
                       f"update and -gradient over its last {pooled.count} measurements (below {bound:.2f}; "
                       "healthy: SGD 1, Adam/momentum ~0.3-0.8 on average).")
        else:
            message = (f"Variable {name!r} moved in a direction unrelated to its gradient: RMS cosine "
                       f"{value:.2g} between its update and -gradient over its last {pooled.count} "
                       f"measurements, below {bound:.2g}, what random directions reach for its {entries} "
                       f"entries at 1% (healthy: at least {thresholds.update_cos:g} on average; SGD 1).")
        alerts += _track(state, thresholds, "update_mismatch", row["layer"], bool(verdict), step, value,
                         bound, message, immediate=True, variable=name)
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
    if condition.alerted_at is None or state.last_step - condition.alerted_at >= thresholds.remind_every:
        reminder = condition.alerted_at is not None
        condition.alerted_at = state.last_step
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
        condition.since = None
        if condition.alerted_at is not None:
            # it clears after `patience` steps of clean windows without it: a value hovering
            # at a bound does not start and clear an alert over and over
            condition.absent_since = (condition.absent_since or state.first_step) if state.clean else None
            absent = step - condition.absent_since + 1 if condition.absent_since is not None else 0
            if absent >= thresholds.patience:
                condition.alerted_at = condition.absent_since = None
                return [Alert(step, layer, variable, kind, "info", value, threshold,
                              f"Layer {layer!r}: {kind.replace('_', ' ')} has cleared (recovered): "
                              f"now {value:.3g} (threshold {threshold:.3g}).", "")]
        return []
    condition.absent_since = None
    if condition.since is None:
        condition.since = state.first_step
    due = step - condition.since + 1 >= thresholds.patience or immediate
    if not due:
        return []
    if condition.alerted_at is None or step - condition.alerted_at >= thresholds.remind_every:
        reminder = condition.alerted_at is not None
        condition.alerted_at = step
        text = ("Still: " if reminder else "") + message
        return [Alert(step, layer, variable, kind, "warning", value, threshold, text, HINTS.get(kind, ""))]
    return []
