"""Every detector on hand-built rows: the alert it gives (kind, layer, severity,
step), the healthy rows just inside its bound that give none, and its life cycle.

No training: the rows are those of ``layers.csv`` / ``stats.csv`` (all of
``STATS_COLUMNS``) for a hand-written ``Topology``, windows of ``STEPS`` steps.
Boundaries are derived from ``Thresholds`` fields, ``NEAR`` (1%) inside or outside.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

# The code under test, imported here only: when it moves module, these lines are the ones to change.
from gradwatch._interpret.alerts import HINTS, nonfinite_alert
from gradwatch._interpret.detectors import (
    GROWTH_SPAN,
    GROWTH_STEPS,
    MIN_COS_MEASUREMENTS,
    DetectorState,
    Thresholds,
    chi2_quantile,
    detect,
    track_alert,
)
from gradwatch._interpret.probe_layout import decode_units, unit_tracks
from gradwatch._io.schema import STATS_COLUMNS, WINDOW_COLUMNS
from gradwatch._topology import RELU_FAMILY, LayerInfo, Topology, VariableInfo

pytestmark = pytest.mark.fast

DEFAULTS = Thresholds()
NEAR = 1.01  # "just" inside or outside a bound
STEPS = 10  # steps per window: window k (1-based) ends at step k * STEPS
UNITS = 16

# relu -> tanh -> linear; kernels of 512, 256 and 16 entries
TOPOLOGY = Topology(
    layers=[
        LayerInfo("hidden", 0, "Dense", "relu", ["hidden/kernel", "hidden/bias"]),
        LayerInfo("squash", 1, "Dense", "tanh", ["squash/kernel", "squash/bias"]),
        LayerInfo("out", 2, "Dense", "linear", ["out/kernel", "out/bias"]),
    ],
    variables=[
        VariableInfo("hidden/kernel", "hidden", [32, UNITS], "float32", 0),
        VariableInfo("hidden/bias", "hidden", [UNITS], "float32", 0),
        VariableInfo("squash/kernel", "squash", [UNITS, UNITS], "float32", 1),
        VariableInfo("squash/bias", "squash", [UNITS], "float32", 1),
        VariableInfo("out/kernel", "out", [UNITS, 1], "float32", 2),
        VariableInfo("out/bias", "out", [1], "float32", 2),
    ],
)
LAYERS = [layer.name for layer in TOPOLOGY.layers]
RELU_LAYERS = {layer.name for layer in TOPOLOGY.layers if layer.activation in RELU_FAMILY}
SIZES = {v.name: math.prod(v.shape) for v in TOPOLOGY.variables}
ENTRIES = {name: sum(SIZES[v] for v in layer.variables) for name, layer in zip(LAYERS, TOPOLOGY.layers)}

HEALTHY_RMS = 1e-2
# the geometric middle of the update/weight bounds (1e-4..1e-1: ~3e-3)
HEALTHY_RATIO = math.sqrt(DEFAULTS.update_ratio_low * DEFAULTS.update_ratio_high)
NAN = float("nan")


def stats_row(step: int, layer: str, variable: str = "*", rms: float = HEALTHY_RMS,
              entries: int | None = None, **columns: Any) -> dict[str, Any]:
    """One row of stats.csv (a variable) or layers.csv (``variable == "*"``): a healthy
    gradient of RMS ``rms`` over ``entries`` (TOPOLOGY's by default) unless ``columns``
    say otherwise."""
    if entries is None:
        entries = ENTRIES[layer] if variable == "*" else SIZES[variable]
    l2 = rms * math.sqrt(entries)
    layer_row = variable == "*"  # unit fractions are of layer rows; dead_frac of ReLU layers only
    row = {
        "step": step, "steps": STEPS, "layer": layer, "variable": variable,
        "l2": l2, "l2_max": l2, "l2_min": l2, "l2_mean": l2,
        "max_abs": 3 * rms, "mean_abs": rms, "zero_frac": 0.0, "nonfinite": 0, "grad_steps": STEPS,
        "clip_scale_min": NAN, "clip_fraction": NAN, "update_ratio": NAN, "update_cos": NAN,
        "dead_frac": 0.0 if layer_row and layer in RELU_LAYERS else NAN,
        "no_signal_frac": 0.0 if layer_row else NAN,
    }
    assert tuple(row) == STATS_COLUMNS
    unknown = set(columns) - set(STATS_COLUMNS)
    assert not unknown, unknown
    row.update(columns)
    return row


def window(index: int, layers: dict | None = None, variables: dict | None = None):
    """Layer rows and variable rows of window ``index`` (1-based); ``layers`` /
    ``variables`` map a name to keyword arguments of ``stats_row``."""
    step = index * STEPS
    layer_rows = [stats_row(step, name, **(layers or {}).get(name, {})) for name in LAYERS]
    variable_rows = [stats_row(step, v.layer, v.name, **(variables or {}).get(v.name, {}))
                     for v in TOPOLOGY.variables]
    return layer_rows, variable_rows


def run(windows, thresholds: Thresholds = DEFAULTS, topology: Topology = TOPOLOGY):
    """Drives ``detect`` over the windows; returns every alert as
    (step, kind, layer, variable, severity), in order, and the alerts themselves."""
    state = DetectorState()
    alerts = []
    for layer_rows, variable_rows in windows:
        alerts += detect(layer_rows, topology, state, thresholds, variable_rows)
    return [(a.step, a.kind, a.layer, a.variable, a.severity) for a in alerts], alerts


def step_of(window_index: int) -> int:
    return window_index * STEPS


def windows_of(steps: int) -> int:
    """The windows (of STEPS steps) that hold ``steps`` steps: patience is counted in steps."""
    return math.ceil(steps / STEPS)


def test_healthy_rows_give_no_alert():
    windows = [window(i, layers={"hidden": {"update_ratio": HEALTHY_RATIO}},
                      variables={"hidden/kernel": {"update_ratio": HEALTHY_RATIO, "update_cos": 0.5}})
               for i in range(1, 3 * DEFAULTS.update_cos_window)]
    assert run(windows)[0] == []


# -- vanishing_gradient -------------------------------------------------------------------------------


@pytest.mark.parametrize("thresholds", [DEFAULTS, Thresholds(patience=2 * STEPS)],
                         ids=["default", "patience2"])
def test_vanishing_absolute_fires_after_patience_once_and_clears(thresholds):
    p = windows_of(thresholds.patience)
    assert thresholds.vanishing_ratio < 1 / NEAR**2  # layers at a ratio ~1 are not relatively vanishing
    # hidden just below the absolute bound; the others just above, at a ratio ~1 (not the relative rule)
    low = {"hidden": {"rms": thresholds.vanishing_rms / NEAR},
           "squash": {"rms": thresholds.vanishing_rms * NEAR},
           "out": {"rms": thresholds.vanishing_rms * NEAR}}
    sick, healthy = 2 * p, p
    windows = [window(i, layers=low) for i in range(1, sick + 1)]
    windows += [window(i) for i in range(sick + 1, sick + healthy + 1)]
    found, alerts = run(windows, thresholds)
    assert found == [
        (step_of(p), "vanishing_gradient", "hidden", "*", "warning"),  # once, at the patience-th window
        (step_of(sick + p), "vanishing_gradient", "hidden", "*", "info"),  # after `patience` healthy ones
    ]
    assert alerts[0].threshold == thresholds.vanishing_rms
    assert alerts[0].value == pytest.approx(thresholds.vanishing_rms / NEAR)
    assert alerts[0].hint == HINTS["vanishing_gradient"]


def test_vanishing_just_above_the_absolute_bound_gives_nothing():
    above = {name: {"rms": DEFAULTS.vanishing_rms * NEAR} for name in LAYERS}
    assert run([window(i, layers=above) for i in range(1, 4 * windows_of(DEFAULTS.patience))])[0] == []


@pytest.mark.parametrize(
    "rms_factor, ratio_factor, fires",
    [(1 / NEAR, 1 / NEAR, True),  # both below: relative rule
     (1 / NEAR, NEAR, False),  # ratio just above vanishing_ratio
     (NEAR, 1 / NEAR, False)],  # RMS just above vanishing_ratio_rms
)
def test_vanishing_relative_needs_both_the_ratio_and_the_rms(rms_factor, ratio_factor, fires):
    t = DEFAULTS
    rms = t.vanishing_ratio_rms * rms_factor
    assert rms > t.vanishing_rms  # not the absolute rule
    output_rms = rms / (t.vanishing_ratio * ratio_factor)
    layers = {"hidden": {"rms": rms}, "squash": {"rms": output_rms}, "out": {"rms": output_rms}}
    found, alerts = run([window(i, layers=layers) for i in range(1, 2 * windows_of(t.patience) + 1)])
    if fires:
        assert found == [(step_of(windows_of(t.patience)), "vanishing_gradient", "hidden", "*", "warning")]
        assert alerts[0].threshold == t.vanishing_ratio
    else:
        assert found == []


@pytest.mark.parametrize("update_factor, fires", [(NEAR, False), (1 / NEAR, True)])
def test_a_small_gradient_that_moves_its_weights_is_not_vanishing(update_factor, fires):
    """Under an adaptive optimizer a tiny gradient can still move the weights at a healthy
    rate: only a layer whose measured update/weight ratio is small too is vanishing."""
    t = DEFAULTS
    update = t.vanishing_update_ratio * update_factor
    low = {"hidden": {"rms": t.vanishing_rms / NEAR}, "squash": {"rms": t.vanishing_rms * NEAR},
           "out": {"rms": t.vanishing_rms * NEAR}}
    # the ratio is measured in the first window only (every 50 steps): it is remembered
    first = {name: dict(rows, update_ratio=update) for name, rows in low.items()}
    p = windows_of(t.patience)
    windows = [window(1, layers=first)] + [window(i, layers=low) for i in range(2, 2 * p + 1)]
    found, alerts = run(windows)
    if fires:
        assert found == [(step_of(windows_of(t.patience)), "vanishing_gradient", "hidden", "*", "warning")]
        assert f"update/weight ratio is {update:.2g}" in alerts[0].message
    else:
        assert found == []


def test_vanishing_spares_the_output_layer_and_exact_zeros():
    # the output layer is the reference; an exactly-zero gradient is no signal, not a small one
    layers = {"out": {"rms": DEFAULTS.vanishing_rms / 1e3}, "squash": {"rms": 0.0}}
    found, _ = run([window(i, layers=layers) for i in range(1, 2 * windows_of(DEFAULTS.patience) + 1)])
    assert [f for f in found if f[1] == "vanishing_gradient"] == []


# -- exploding_gradient -------------------------------------------------------------------------------


def test_exploding_on_a_huge_norm_fires_at_once_once_and_clears():
    t = DEFAULTS
    sick = 3
    huge = {"squash": {"l2_max": t.exploding_l2 * NEAR}}
    windows = [window(i, layers=huge) for i in range(1, sick + 1)]
    windows += [window(i) for i in range(sick + 1, sick + windows_of(t.patience) + 1)]
    found, alerts = run(windows)
    assert found == [
        (step_of(1), "exploding_gradient", "squash", "*", "warning"),
        (step_of(sick + windows_of(t.patience)), "exploding_gradient", "squash", "*", "info"),
    ]
    assert alerts[0].value == t.exploding_l2 * NEAR and alerts[0].threshold == t.exploding_l2
    assert alerts[0].hint == HINTS["exploding_gradient"]


def test_exploding_just_below_the_norm_bound_gives_nothing():
    below = {"squash": {"l2_max": DEFAULTS.exploding_l2 / NEAR}}
    assert run([window(i, layers=below) for i in range(1, 4 * windows_of(DEFAULTS.patience))])[0] == []


def _growing(growth: float, last_l2: float, windows: int):
    """The hidden layer's mean L2 multiplied by ``growth`` every window, ending at ``last_l2``."""
    return [window(k + 1, layers={"hidden": {"l2_mean": last_l2 * growth ** (k - windows + 1),
                                             "l2_max": last_l2 * growth ** (k - windows + 1)}})
            for k in range(windows)]


@pytest.mark.parametrize(
    "growth_factor, last_factor, fires",
    [(NEAR, NEAR, True),  # growing just faster than exploding_growth, just above the floor
     (1 / NEAR, NEAR, False),  # growing just slower
     (NEAR, 1 / NEAR, False)],  # ending just below exploding_growth_floor
)
def test_exploding_on_sustained_growth(growth_factor, last_factor, fires):
    t = DEFAULTS
    assert t.exploding_growth_floor * NEAR < t.exploding_l2  # not the huge-norm rule
    windows = GROWTH_SPAN // STEPS + 1  # growth over GROWTH_SPAN steps: one window more than it holds
    found, _ = run(_growing(t.exploding_growth * growth_factor, t.exploding_growth_floor * last_factor,
                            windows))
    expected = [(step_of(windows), "exploding_gradient", "hidden", "*", "warning")] if fires else []
    assert found == expected


def _growing_windows(per_window_steps: int, rate: float, span_steps: int):
    """Windows of ``per_window_steps`` steps whose hidden-layer mean norm grows at ``rate``
    per GROWTH_STEPS steps, ending at 2x the floor after ``span_steps`` steps of growth."""
    count = span_steps // per_window_steps + 1
    last = DEFAULTS.exploding_growth_floor * 2
    out = []
    for k in range(count):
        norm = last * rate ** ((k - count + 1) * per_window_steps / GROWTH_STEPS)
        layer_rows, variable_rows = window(k + 1, layers={"hidden": {"l2_mean": norm, "l2_max": norm}})
        for row in layer_rows + variable_rows:
            row["step"], row["steps"] = (k + 1) * per_window_steps, per_window_steps
        out.append((layer_rows, variable_rows))
    return out


@pytest.mark.parametrize("per_window_steps", [1, 10, 15, 100])
def test_exploding_growth_is_counted_in_steps_whatever_the_window_length(per_window_steps):
    # the same growth rate per step is judged alike at every log_every, once it lasted
    # GROWTH_SPAN steps (a window of 100 steps: one window after the first)
    span = max(GROWTH_SPAN, per_window_steps)
    fast = _growing_windows(per_window_steps, DEFAULTS.exploding_growth * NEAR, span)
    found, alerts = run(fast)
    assert [(kind, layer) for _, kind, layer, _, _ in found] == [("exploding_gradient", "hidden")]
    assert found[0][0] == len(fast) * per_window_steps  # at the window that completes the span
    assert alerts[0].value == pytest.approx(DEFAULTS.exploding_growth * NEAR, rel=1e-9)
    assert alerts[0].threshold == DEFAULTS.exploding_growth
    assert f"{alerts[0].value:.3g}x per {GROWTH_STEPS} steps" in alerts[0].message
    # just slower, or not yet GROWTH_SPAN steps of growth: nothing
    assert run(_growing_windows(per_window_steps, DEFAULTS.exploding_growth / NEAR, span))[0] == []
    if per_window_steps < GROWTH_SPAN:
        assert run(fast[:-1])[0] == []


def test_exploding_growth_after_a_norm_that_fell_to_zero_is_no_growth():
    # a layer whose mean norm falls to exactly zero (it died) and comes back
    norms = [20.0, 0.0, 40.0, 80.0, 160.0, 320.0]
    windows = [window(k + 1, layers={"hidden": {"l2_mean": n, "l2_max": n}}) for k, n in enumerate(norms)]
    found, _ = run(windows)
    # from zero is no growth rate: 30 steps of doubling counted from 40 only (40 -> 320)
    assert found == [(step_of(6), "exploding_gradient", "hidden", "*", "warning")]
    assert run(windows[:5])[0] == []


# -- dead_relu and no_learning_signal -----------------------------------------------------------------


def test_dead_relu_fires_at_once_at_dead_fraction_once_and_clears():
    t = DEFAULTS
    sick = 3
    # a dead layer's tiny update is not an update_ratio problem: the root cause is alerted
    dead = {"hidden": {"dead_frac": t.dead_fraction, "update_ratio": t.update_ratio_low / 10}}
    windows = [window(i, layers=dead) for i in range(1, sick + 1)]
    windows += [window(i) for i in range(sick + 1, sick + windows_of(t.patience) + 1)]
    found, alerts = run(windows)
    assert found == [
        (step_of(1), "dead_relu", "hidden", "*", "warning"),
        (step_of(sick + windows_of(t.patience)), "dead_relu", "hidden", "*", "info"),
    ]
    assert alerts[0].value == t.dead_fraction and alerts[0].threshold == t.dead_fraction
    assert alerts[0].hint == HINTS["dead_relu"]


@pytest.mark.parametrize("column", ["dead_frac", "no_signal_frac"])
def test_unit_fractions_just_below_dead_fraction_give_nothing(column):
    below = {"hidden": {column: DEFAULTS.dead_fraction / NEAR}}
    assert run([window(i, layers=below) for i in range(1, 4 * windows_of(DEFAULTS.patience))])[0] == []


def _unit_window(index: int, zero_run: dict[str, np.ndarray], silent: dict[str, np.ndarray],
                 thresholds: Thresholds = DEFAULTS):
    """Window rows whose dead_frac / no_signal_frac come from ``decode_units``
    of per-unit zero-gradient runs (steps) and silent flags (feeds zeros forward)."""
    tracks = unit_tracks(TOPOLOGY)
    total = sum(track.units for track in tracks)
    runs = np.zeros(total, np.int32)
    silents = np.zeros(total, np.float32)
    for track in tracks:
        name = LAYERS[track.layer]
        part = slice(track.offset, track.offset + track.units)
        runs[part] = zero_run.get(name, 0)
        silents[part] = silent.get(name, 0.0)
    dead, no_signal = decode_units(tracks, len(TOPOLOGY.layers), (runs, silents), thresholds.dead_steps)
    layers = {name: {"dead_frac": dead[i], "no_signal_frac": no_signal[i]} for i, name in enumerate(LAYERS)}
    return window(index, layers=layers)


@pytest.mark.parametrize("thresholds", [DEFAULTS, Thresholds(dead_steps=7)], ids=["default", "steps7"])
def test_dead_relu_needs_dead_steps_consecutive_zero_steps_on_dead_fraction_of_units(thresholds):
    t = thresholds
    need = math.ceil(t.dead_fraction * UNITS)  # the fewest dead units that make dead_fraction
    assert need / UNITS >= t.dead_fraction > (need - 1) / UNITS

    def hidden_run(dead_units, steps):
        return {"hidden": np.array([steps] * dead_units + [0] * (UNITS - dead_units))}

    all_silent = {"hidden": np.ones(UNITS)}
    # one step short of dead_steps on every unit; then enough units one unit short; then dead
    windows = [_unit_window(1, hidden_run(UNITS, t.dead_steps - 1), all_silent, t),
               _unit_window(2, hidden_run(need - 1, t.dead_steps), all_silent, t),
               _unit_window(3, hidden_run(need, t.dead_steps), all_silent, t)]
    found, alerts = run(windows, t)
    assert found == [(step_of(3), "dead_relu", "hidden", "*", "warning")]
    assert alerts[0].value == need / UNITS


def test_zero_gradient_behind_a_non_relu_is_no_learning_signal_not_dead_relu():
    t = DEFAULTS
    # tanh units with an all-zero gradient for dead_steps steps: not ReLUs, so not dead ReLUs
    windows = [_unit_window(1, {"squash": np.full(UNITS, t.dead_steps)}, {"squash": np.ones(UNITS)})]
    found, alerts = run(windows)
    assert found == [(step_of(1), "no_learning_signal", "squash", "*", "warning")]
    assert alerts[0].value == 1.0 and alerts[0].hint == HINTS["no_learning_signal"]


def test_a_live_relu_unit_without_gradient_is_no_learning_signal():
    # ReLU units with zero gradient that still feed non-zeros forward (their outgoing
    # weights are zero): no signal reaches them, they are not dead
    t = DEFAULTS
    live = _unit_window(1, {"hidden": np.full(UNITS, t.dead_steps)}, {"hidden": np.zeros(UNITS)})
    dead = _unit_window(2, {"hidden": np.full(UNITS, t.dead_steps)}, {"hidden": np.ones(UNITS)})
    found, _ = run([live])
    assert found == [(step_of(1), "no_learning_signal", "hidden", "*", "warning")]
    found, _ = run([dead])
    assert found == [(step_of(2), "dead_relu", "hidden", "*", "warning")]


@pytest.mark.parametrize(
    "kernel_rms, bias_rms, fires",
    [(0.0, HEALTHY_RMS, True),
     (DEFAULTS.vanishing_rms, HEALTHY_RMS, False),  # a tiny kernel gradient is a signal
     (0.0, 0.0, False)],  # nothing at all reaches the layer: left to the unit probes
)
def test_a_kernel_with_zero_gradient_on_every_step_is_no_learning_signal(kernel_rms, bias_rms, fires):
    # its bias still gets a gradient (the units are live): its inputs are all zero; as a
    # window-level judgement (not dead_steps long) it waits for `patience` windows
    p = windows_of(DEFAULTS.patience)
    variables = {"squash/kernel": {"rms": kernel_rms}, "squash/bias": {"rms": bias_rms}}
    layers = {"squash": {"rms": 0.0}} if bias_rms == 0.0 else {}
    found, _ = run([window(i, layers=layers, variables=variables) for i in range(1, 2 * p + 1)])
    assert found == ([(step_of(p), "no_learning_signal", "squash", "*", "warning")] if fires else [])


# -- update_ratio -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["high", "low"])
def test_update_ratio_fires_after_patience_steps_of_measured_windows_once_and_clears(side):
    t = DEFAULTS
    p = windows_of(t.patience)
    bound = t.update_ratio_high if side == "high" else t.update_ratio_low
    ratio = bound * NEAR if side == "high" else bound / NEAR
    # measured windows alternate with unmeasured ones (NaN): those neither break the streak nor
    # end it; it fires at the first measured window `patience` steps after its start
    windows, index = [], 0
    for _ in range(p + 2):
        index += 1
        windows.append(window(index, layers={"hidden": {"update_ratio": ratio}}))
        index += 1
        windows.append(window(index))
    fired_at = next(k for k in range(1, 2 * p + 2, 2) if step_of(k) >= t.patience)
    healthy_from = index + 1
    windows += [window(i, layers={"hidden": {"update_ratio": HEALTHY_RATIO}})
                for i in range(healthy_from, healthy_from + p)]
    found, alerts = run(windows)
    assert found == [
        (step_of(fired_at), "update_ratio", "hidden", "*", "warning"),
        (step_of(healthy_from + p - 1), "update_ratio", "hidden", "*", "info"),
    ]
    assert alerts[0].threshold == bound and alerts[0].value == ratio
    assert alerts[0].hint == HINTS[f"update_ratio_{side}"]


@pytest.mark.parametrize("ratio", [DEFAULTS.update_ratio_high / NEAR, DEFAULTS.update_ratio_low * NEAR],
                         ids=["below_high", "above_low"])
def test_update_ratio_just_inside_the_bounds_gives_nothing(ratio):
    layers = {name: {"update_ratio": ratio} for name in LAYERS}
    assert run([window(i, layers=layers) for i in range(1, 4 * windows_of(DEFAULTS.patience))])[0] == []


def test_update_ratio_clears_only_a_factor_2_inside_the_bound():
    t = DEFAULTS
    high = {"hidden": {"update_ratio": t.update_ratio_high * NEAR}}
    hovering = {"hidden": {"update_ratio": t.update_ratio_high / NEAR}}  # inside, but not by 2
    windows = [window(i, layers=high) for i in range(1, windows_of(t.patience) + 1)]
    p = windows_of(t.patience)
    windows += [window(i, layers=hovering) for i in range(p + 1, 4 * p)]
    found, _ = run(windows)
    assert found == [(step_of(windows_of(t.patience)), "update_ratio", "hidden", "*", "warning")]


def test_update_ratio_does_not_judge_a_layer_of_vectors_only():
    topology = Topology(
        layers=[LayerInfo("norm", 0, "LayerNormalization", "linear", ["norm/gamma", "norm/beta"])],
        variables=[VariableInfo("norm/gamma", "norm", [UNITS], "float32", 0),
                   VariableInfo("norm/beta", "norm", [UNITS], "float32", 0)],
    )
    too_fast = DEFAULTS.update_ratio_high * 10
    windows = [([stats_row(step_of(i), "norm", entries=2 * UNITS, update_ratio=too_fast)], [])
               for i in range(1, 3 * windows_of(DEFAULTS.patience))]
    assert run(windows, topology=topology)[0] == []


# -- update_mismatch ----------------------------------------------------------------------------------


def _cosines(cosines, variable="hidden/kernel", ratio=HEALTHY_RATIO):
    return [window(i, variables={variable: {"update_cos": cos, "update_ratio": ratio}})
            for i, cos in enumerate(cosines, start=1)]


def _null_bound(measurements: int, entries: int) -> float:
    """The RMS cosine random directions stay above at 1%: sqrt(chi2_0.99(m) / (m n))."""
    return math.sqrt(chi2_quantile(measurements) / (measurements * entries))


def test_chi2_quantile_is_the_one_percent_bound():
    # exact chi-square 0.99 quantiles (tables)
    for dof, exact in ((1, 6.635), (3, 11.345), (8, 20.090), (16, 32.000)):
        assert chi2_quantile(dof) == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("factor", [0.0, 1 / NEAR], ids=["zero", "just_inside"])
def test_update_mismatch_unrelated_fires_at_the_third_measurement_once_and_clears(factor):
    t = DEFAULTS
    n, p, m = SIZES["hidden/kernel"], windows_of(t.patience), MIN_COS_MEASUREMENTS
    bound = _null_bound(m, n)
    assert bound < t.update_cos  # 512 entries: 3 measurements tell random from healthy
    sick = m + 2
    cos = _null_bound(sick, n) * factor  # inside the bound at every count up to `sick` (it falls with m)
    found, alerts = run(_cosines([cos] * sick + [1.0] * p))
    assert found == [
        (step_of(m), "update_mismatch", "hidden", "hidden/kernel", "warning"),
        (step_of(sick + p), "update_mismatch", "hidden", "hidden/kernel", "info"),
    ]
    assert alerts[0].value == pytest.approx(cos) and alerts[0].threshold == pytest.approx(bound)
    assert f"{alerts[0].value:.2g}" in alerts[0].message and f"{alerts[0].threshold:.2g}" in alerts[0].message
    assert "unrelated to" in alerts[0].message and alerts[0].hint == HINTS["update_mismatch"]


def test_update_mismatch_random_level_cosines_just_above_the_bound_give_nothing():
    n = SIZES["hidden/kernel"]
    # a constant cosine just above the bound at every m stays above it (the bound falls with m)
    assert run(_cosines([_null_bound(MIN_COS_MEASUREMENTS, n) * NEAR] * 20))[0] == []


def test_update_mismatch_opposite_fires():
    t = DEFAULTS
    found, alerts = run(_cosines([-t.update_cos_spread * NEAR] * t.update_cos_window))
    half = t.update_cos_window // 2
    assert found == [(step_of(half), "update_mismatch", "hidden", "hidden/kernel", "warning")]
    assert "against its gradient" in alerts[0].message
    assert alerts[0].value == pytest.approx(-t.update_cos_spread * NEAR)
    assert alerts[0].threshold == -t.update_cos_spread and f"{alerts[0].value:.2f}" in alerts[0].message


@pytest.mark.parametrize(
    "cosines",
    [[DEFAULTS.update_cos],  # the least healthy average
     [-DEFAULTS.update_cos_spread / NEAR],  # just short of "opposite"
     [0.9, -0.7]],  # Adam-like swings around a mean of 0.1
    ids=["healthy_floor", "short_of_opposite", "swinging"],
)
def test_update_mismatch_healthy_cosines_give_nothing(cosines):
    sequence = cosines * (3 * DEFAULTS.update_cos_window)
    assert run(_cosines(sequence))[0] == []


def test_update_mismatch_does_not_judge_small_variables_or_rounding_noise():
    t = DEFAULTS
    unrelated = [0.0] * (2 * t.update_cos_window)
    # 16 entries: even update_cos_window measurements cannot tell random from healthy
    assert _null_bound(t.update_cos_window, SIZES["out/kernel"]) > t.update_cos
    assert run(_cosines(unrelated, variable="out/kernel"))[0] == []
    assert run(_cosines(unrelated, ratio=t.update_ratio_floor / NEAR))[0] == []
    found, _ = run(_cosines(unrelated, variable="squash/kernel"))
    assert found == [(step_of(MIN_COS_MEASUREMENTS), "update_mismatch", "squash", "squash/kernel", "warning")]


@pytest.mark.parametrize("entries, needed", [(36, 5), (64, 3), (24, 13)])
def test_update_mismatch_evidence_grows_with_size_and_measurements(entries, needed):
    """A few dozen entries are judged after a handful of measurements (pooled within a window)."""
    topology = Topology(
        layers=[LayerInfo("h", 0, "Dense", "tanh", ["h/kernel"])],
        variables=[VariableInfo("h/kernel", "h", [entries], "float32", 0)],
    )
    assert _null_bound(needed, entries) < DEFAULTS.update_cos
    assert needed == MIN_COS_MEASUREMENTS or DEFAULTS.update_cos <= _null_bound(needed - 1, entries)
    for count, fires in ((needed - 1, False), (needed, True)):
        rows = [stats_row(10, "h", entries=entries)], [stats_row(10, "h", "h/kernel", entries=entries)]
        state = DetectorState()
        alerts = detect(*rows[:1], topology, state, DEFAULTS, rows[1],
                        cos_evidence={"h/kernel": (count, 0.0, count * 0.01)})
        assert [a.kind for a in alerts] == (["update_mismatch"] if fires else []), count


# -- nonfinite_gradient -------------------------------------------------------------------------------


def window_row(index: int, nonfinite_steps: int = 0, first: int | None = None, skipped: int = 0,
               loss_nonfinite: int | None = None) -> dict[str, Any]:
    """A windows.csv row."""
    row = {
        "step": step_of(index), "steps": STEPS, "loss": 0.5, "learning_rate": 0.01, "global_l2": 1.0,
        "global_l2_max": 1.0, "nonfinite_steps": nonfinite_steps, "first_nonfinite_step": first,
        "skipped_steps": skipped, "clip_global_l2": NAN, "clip_global_l2_max": NAN, "clip_scale_min": NAN,
        "clip_fraction": NAN, "clip_threshold": NAN, "nonfinite_loss_at_first": loss_nonfinite,
    }
    assert tuple(row) == WINDOW_COLUMNS
    return row


def counts_at_first(bad_variables: list[str]) -> np.ndarray:
    """Non-finite entries at the first non-finite step: per variable, then per layer."""
    per_variable = [float(SIZES[v.name]) if v.name in bad_variables else 0.0 for v in TOPOLOGY.variables]
    per_layer = [sum(n for v, n in zip(TOPOLOGY.variables, per_variable) if v.layer == layer)
                 for layer in LAYERS]
    return np.array(per_variable + per_layer)


@pytest.mark.parametrize(
    "bad, layer, variable",
    [(["hidden/kernel"], "hidden", "hidden/kernel"),
     (["hidden/kernel", "hidden/bias", "squash/kernel"], "squash", "squash/kernel"),
     (["hidden/kernel", "squash/kernel", "out/bias"], "out", "out/bias")],
)
def test_nonfinite_with_a_finite_loss_names_the_first_layer_in_backprop_order(bad, layer, variable):
    first = step_of(2) - 3
    alert = nonfinite_alert(window_row(2, 2, first, loss_nonfinite=0), counts_at_first(bad), TOPOLOGY, False)
    assert (alert.step, alert.kind, alert.layer, alert.variable, alert.severity) == (
        first, "nonfinite_gradient", layer, variable, "error")
    assert alert.value == sum(SIZES[v] for v in bad)
    assert "while the loss was finite" in alert.message and alert.hint == HINTS["nonfinite_gradient"]


def test_nonfinite_with_a_nonfinite_loss_blames_the_forward_pass_or_input():
    everything = [v.name for v in TOPOLOGY.variables]
    first = step_of(1) - 5
    alert = nonfinite_alert(window_row(1, 1, first, loss_nonfinite=1), counts_at_first(everything),
                            TOPOLOGY, False)
    assert (alert.step, alert.kind, alert.layer, alert.variable, alert.severity) == (
        first, "nonfinite_gradient", "", "", "error")
    assert "forward pass" in alert.message and "input" in alert.message
    assert alert.hint == HINTS["nonfinite_loss"]


@pytest.mark.parametrize(
    "loss_scale_optimizer, skipped, severity",
    [(True, 2, "info"),  # every non-finite step was a loss-scale skip
     (True, 1, "error"),  # one was not skipped
     (False, 2, "error")],  # no loss-scale optimizer: a skip is no excuse
)
def test_loss_scale_overflow_is_info(loss_scale_optimizer, skipped, severity):
    first = step_of(3) - 7
    row = window_row(3, 2, first, skipped=skipped, loss_nonfinite=0)
    alert = nonfinite_alert(row, counts_at_first(["squash/kernel"]), TOPOLOGY, loss_scale_optimizer)
    assert (alert.step, alert.kind, alert.layer, alert.severity) == (
        first, "nonfinite_gradient", "squash", severity)
    if severity == "info":
        assert "Loss-scale overflow" in alert.message and alert.hint == HINTS["loss_scale_overflow"]


def test_a_finite_window_has_no_nonfinite_alert():
    assert nonfinite_alert(window_row(1), counts_at_first([]), TOPOLOGY, True) is None


def test_nonfinite_names_a_variable_of_the_layer_it_names():
    # by VariableInfo.layer, not by name prefix ("dense_1/kernel" starts with "dense")
    topology = Topology(
        layers=[LayerInfo("dense_1", 0, "Dense", "relu", ["dense_1/kernel"]),
                LayerInfo("dense", 1, "Dense", "linear", ["dense/kernel"])],
        # e.g. Watch.observe(grads, head.trainable_variables + body.trainable_variables)
        variables=[VariableInfo("dense/kernel", "dense", [4, 1], "float32", 1),
                   VariableInfo("dense_1/kernel", "dense_1", [3, 4], "float32", 0)],
    )
    both_bad = np.array([4.0, 12.0, 12.0, 4.0])  # dense/kernel, dense_1/kernel, then layers dense_1, dense
    alert = nonfinite_alert(window_row(1, 1, 5, loss_nonfinite=0), both_bad, topology, False)
    assert (alert.layer, alert.variable) == ("dense", "dense/kernel")


# -- the life cycle of an alert computed outside detect (track_alert) ---------------------------------


def _nonfinite_run(nonfinite_windows: set[int], windows: int, thresholds: Thresholds = DEFAULTS):
    """What the engine does per window: ``detect``, then the non-finite alert through
    ``track_alert``. Returns the non-finite rows as (step, kind, layer, severity, message)."""
    state = DetectorState()
    out = []
    for index in range(1, windows + 1):
        bad = index in nonfinite_windows
        layers = {"squash": {"nonfinite": 4}} if bad else {}
        layer_rows, variable_rows = window(index, layers=layers)
        detect(layer_rows, TOPOLOGY, state, thresholds, variable_rows)
        first = step_of(index) - STEPS + 1
        row = window_row(index, 1, first, loss_nonfinite=0) if bad else window_row(index)
        alert = nonfinite_alert(row, counts_at_first(["squash/kernel"] if bad else []), TOPOLOGY, False)
        out += [(a.step, a.kind, a.layer, a.severity, a.message)
                for a in track_alert(state, thresholds, alert, "nonfinite_gradient")]
    return out


def test_nonfinite_no_storm_while_it_persists_and_info_when_it_clears():
    found = _nonfinite_run({1, 2, 3, 4, 5, 7}, 7)
    assert [row[:4] for row in found] == [
        (1, "nonfinite_gradient", "squash", "error"),  # the first non-finite step of window 1
        (step_of(6), "nonfinite_gradient", "", "info"),  # the first finite window
        (step_of(7) - STEPS + 1, "nonfinite_gradient", "squash", "error"),  # it came back: alerted again
    ]
    assert "cleared" in found[1][4]


def test_nonfinite_reminder_every_remind_every_windows():
    t = Thresholds(remind_every=2 * STEPS)
    found = _nonfinite_run(set(range(1, 6)), 5, t)
    assert [(row[0], row[3], row[4].startswith("Still:")) for row in found] == [
        (step_of(w) - STEPS + 1, "error", w > 1) for w in range(1, 6, windows_of(t.remind_every))
    ]


@pytest.mark.parametrize("window_steps", [1, 10, 30, 100])
def test_patience_is_counted_in_steps_whatever_the_window_length(window_steps):
    """The same vanishing layer from step 1, read every 1, 10, 30 or 100 steps: the alert
    comes at the first read at least ``patience`` steps in."""
    t = DEFAULTS
    low = t.vanishing_rms / 2
    state, first = DetectorState(), None
    for k in range(1, 200 // window_steps + 1):
        step = k * window_steps
        layer_rows = [stats_row(step, name, rms=low if name == "hidden" else HEALTHY_RMS, steps=window_steps,
                                grad_steps=window_steps) for name in LAYERS]
        alerts = detect(layer_rows, TOPOLOGY, state, t, [])
        if alerts and first is None:
            first = alerts[0].step
    assert first == window_steps * math.ceil(t.patience / window_steps)


@pytest.mark.parametrize("factor, fires_at", [(NEAR, 1), (1 / NEAR, 3)])
def test_an_update_larger_than_the_weights_is_alerted_at_once(factor, fires_at):
    """A learning rate far too high: the first step moves the kernels by more than their norm
    (10 x update_ratio_high), then the inflated weights bring the ratio back down."""
    from gradwatch._interpret.detectors import UPDATE_RATIO_BLOWN

    t = DEFAULTS
    first = UPDATE_RATIO_BLOWN * t.update_ratio_high * factor
    ratios = [first] + [t.update_ratio_high * 2] * 2 + [HEALTHY_RATIO] * 5
    found, _ = run([window(i, layers={"hidden": {"update_ratio": r}}) for i, r in enumerate(ratios, start=1)])
    assert found[0] == (step_of(fires_at), "update_ratio", "hidden", "*", "warning")


def test_a_vanishing_layer_without_a_measured_update_ratio_says_so():
    """Several replicas measure no update ratio: the alert fires on the gradient alone, and its
    message says the ratio is not measured instead of quoting one."""
    low = {"hidden": {"rms": DEFAULTS.vanishing_rms / 2}}  # update_ratio NaN in every row
    found, alerts = run([window(i, layers=low) for i in range(1, windows_of(DEFAULTS.patience) + 1)])
    assert found == [(step_of(windows_of(DEFAULTS.patience)), "vanishing_gradient", "hidden", "*", "warning")]
    assert "update/weight ratio is not measured (several replicas" in alerts[0].message
