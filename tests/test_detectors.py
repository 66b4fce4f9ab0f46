"""Detectors: the alert life cycle on synthetic windows, and real nets."""

from __future__ import annotations

import numpy as np
import pytest
from gradwatch.examples import broken_nets

import gradwatch as gw
from gradwatch._interpret.detectors import DetectorState, Thresholds, detect
from gradwatch._topology import LayerInfo, Topology, VariableInfo

TOPOLOGY = Topology(
    layers=[LayerInfo("first", 0, "Dense", "sigmoid", ["first/kernel"]),
            LayerInfo("middle", 1, "Dense", "sigmoid", ["middle/kernel"]),
            LayerInfo("out", 2, "Dense", "linear", ["out/kernel"])],
    variables=[VariableInfo("first/kernel", "first", [10, 10], "float32", 0),
               VariableInfo("middle/kernel", "middle", [10, 10], "float32", 1),
               VariableInfo("out/kernel", "out", [10, 1], "float32", 2)],
)


def _rows(step, l2_means, l2_max=None):
    return [
        {"step": step, "steps": 10, "layer": name, "grad_steps": 10, "l2_mean": mean,
         "l2_max": (l2_max or {}).get(name, mean)}
        for name, mean in zip(("first", "middle", "out"), l2_means)
    ]


DEFAULTS = Thresholds()


def _run(windows, thresholds=DEFAULTS):
    state = DetectorState()
    out = []
    for step, (means, maxes) in enumerate(windows, start=1):
        out.append(detect(_rows(step * 10, means, maxes), TOPOLOGY, state, thresholds))
    return out


@pytest.mark.fast
def test_vanishing_fires_after_patience_once_then_recovers():
    tiny = ([1e-7, 1e-2, 1.0], None)  # first layer: rms 1e-8 vs output ~0.3
    healthy = ([1e-2, 1e-2, 1.0], None)
    result = _run([tiny] * 5 + [healthy] * 3)
    kinds = [[(a.kind, a.layer, a.severity) for a in window] for window in result]
    assert kinds[:2] == [[], []]
    assert kinds[2] == [("vanishing_gradient", "first", "warning")]
    assert kinds[3] == [] and kinds[4] == []  # no storm while it persists
    assert kinds[5] == [] and kinds[6] == []  # cleared only after `patience` windows without it
    assert kinds[7] == [("vanishing_gradient", "first", "info")]
    assert "ReLU" in result[2][0].hint and "recovered" in result[7][0].message


@pytest.mark.fast
def test_a_value_hovering_at_a_bound_does_not_flap():
    tiny = ([1e-7, 1e-2, 1.0], None)
    healthy = ([1e-2, 1e-2, 1.0], None)
    result = _run(([tiny] * 3 + [healthy]) * 10)  # 40 windows: in, in, in, out, ...
    rows = [a for window in result for a in window]
    assert [(a.severity, a.kind) for a in rows] == [("warning", "vanishing_gradient")]


@pytest.mark.fast
def test_reminder_is_periodic():
    tiny = ([1e-7, 1e-2, 1.0], None)
    result = _run([tiny] * 9, Thresholds(patience=20, remind_every=30))
    fired = [i for i, window in enumerate(result) if window]
    assert fired == [1, 4, 7]
    assert result[4][0].message.startswith("Still:")


@pytest.mark.fast
def test_exploding_fires_at_once_on_a_huge_norm_and_on_sustained_growth():
    huge = _run([([1.0, 1.0, 1.0], {"middle": 5e4})])
    assert [(a.kind, a.layer) for a in huge[0]] == [("exploding_gradient", "middle")]
    growth = _run([([1.0, 1.0, 5.0 * 3**k], None) for k in range(5)])
    fired = [i for i, window in enumerate(growth) if any(a.kind == "exploding_gradient" for a in window)]
    assert fired == [3]
    assert "lower the learning rate" in growth[3][0].hint.lower()


@pytest.mark.fast
def test_output_layer_is_the_reference_not_a_suspect():
    result = _run([([1e-3, 1e-3, 1e-12], None)] * 4)
    assert not any(a.layer == "out" and a.kind == "vanishing_gradient" for w in result for a in w)


@pytest.mark.parametrize(
    "field, value", [("patience", 0), ("vanishing_rms", -1.0), ("exploding_l2", float("nan"))]
)
@pytest.mark.fast
def test_thresholds_are_validated(field, value):
    with pytest.raises(ValueError, match=f"Thresholds.{field} must be"):
        Thresholds(**{field: value})
    with pytest.raises(TypeError, match="thresholds must be a gradwatch.Thresholds"):
        gw.GradientMonitor(log_dir=None, thresholds={"patience": 2})


def test_deep_sigmoid_net_has_vanishing_early_layers(tmp_path):
    broken_nets.vanishing(str(tmp_path))  # the demo's 12-layer sigmoid MLP
    alerts = gw.read_alerts(str(tmp_path))
    vanishing = set(alerts[alerts.kind == "vanishing_gradient"].layer)
    assert "sigmoid_0" in vanishing and "sigmoid_11" not in vanishing and "out" not in vanishing
    assert not (alerts.kind == "exploding_gradient").any()


def test_exploding_net_is_flagged_before_it_goes_non_finite(tmp_path):
    loss = broken_nets.exploding(str(tmp_path))  # the demo's learning rate 0.2
    assert not np.isfinite(loss)
    alerts = gw.read_alerts(str(tmp_path))
    exploding = alerts[alerts.kind == "exploding_gradient"]
    nonfinite = alerts[alerts.kind == "nonfinite_gradient"]
    assert len(exploding) and len(nonfinite)
    assert exploding.step.min() < nonfinite.step.min()
    # the run stays NaN for ~45 windows: one error row when it starts, not a storm, and
    # one at the end saying it never recovered
    assert list(nonfinite.severity) == ["error", "error"]
    assert nonfinite.message.iloc[-1].startswith(f"Diverged at step {nonfinite.step.min()}, never recovered")
    assert not (alerts.kind == "vanishing_gradient").any()  # NaN windows are not "vanishing"
