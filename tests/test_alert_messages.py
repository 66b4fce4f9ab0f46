"""Every alert's message states the numbers its rule used: the row's ``value`` (and its
``threshold`` where there is one) appear in the message, in the same units.

One case per rule of every detector (``gradwatch/_interpret/detectors.py``, ``alerts.py``),
driven on hand-built rows, and the report's evidence line for the contradictions seen
before ("45 non-finite steps in 45 windows; alert value 71", "no_signal_frac up to 0% ...
alert value 1").
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from test_detectors_synthetic import (
    DEFAULTS,
    SIZES,
    TOPOLOGY,
    counts_at_first,
    run,
    window,
    window_row,
)

from gradwatch._interpret.alerts import diverged_alert, nonfinite_alert
from gradwatch._interpret.detectors import DetectorState, Thresholds, detect
from gradwatch._report.verdicts import Problem, _layer_evidence

pytestmark = pytest.mark.fast

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?%?")


def numbers(message: str) -> list[float]:
    """The numbers a message states (a percentage as its fraction)."""
    out = []
    for token in _NUMBER.findall(message.replace(",", "")):
        out.append(float(token[:-1]) / 100 if token.endswith("%") else float(token))
    return out


def states(message: str, value: float) -> bool:
    """Whether ``message`` states ``value`` (to the 2-3 significant digits messages print)."""
    return any(math.isclose(n, value, rel_tol=0.051, abs_tol=1e-12) for n in numbers(message))


def assert_states_its_numbers(alert, threshold=True):
    assert states(alert.message, alert.value), (alert.value, alert.message)
    if threshold:
        assert states(alert.message, alert.threshold), (alert.threshold, alert.message)


def _first(windows, kind, thresholds=DEFAULTS):
    alerts = [a for a in run(windows, thresholds)[1] if a.kind == kind]
    assert alerts, kind
    return alerts


def test_vanishing_absolute_states_the_rms_and_the_absolute_bound():
    low = {"hidden": {"rms": DEFAULTS.vanishing_rms / 2}}
    alert = _first([window(i, layers=low) for i in range(1, 4)], "vanishing_gradient")[0]
    assert alert.value == pytest.approx(DEFAULTS.vanishing_rms / 2)
    assert_states_its_numbers(alert)


def test_vanishing_relative_states_the_ratio_and_the_relative_bound():
    t = DEFAULTS
    rms = t.vanishing_ratio_rms / 2
    output = rms / (t.vanishing_ratio / 2)
    layers = {"hidden": {"rms": rms}, "squash": {"rms": output}, "out": {"rms": output}}
    alert = _first([window(i, layers=layers) for i in range(1, 4)], "vanishing_gradient")[0]
    # a ratio compared with the ratio bound, not an absolute RMS with a relative bound
    assert alert.value == pytest.approx(t.vanishing_ratio / 2) and alert.threshold == t.vanishing_ratio
    assert_states_its_numbers(alert)


def test_exploding_norm_and_growth_state_their_own_numbers():
    huge = {"squash": {"l2_max": DEFAULTS.exploding_l2 * 3}}
    alert = _first([window(1, layers=huge)], "exploding_gradient")[0]
    assert_states_its_numbers(alert)
    t = DEFAULTS
    growth = t.exploding_growth * 1.5
    last = t.exploding_growth_floor * 2
    windows = [window(k + 1, layers={"hidden": {"l2_mean": last * growth ** (k - 3), "l2_max": last}})
               for k in range(t.patience + 1)]
    alert = _first(windows, "exploding_gradient")[0]
    # the growth rule's value is the growth factor, compared with exploding_growth
    assert alert.value == pytest.approx(growth) and alert.threshold == t.exploding_growth
    assert_states_its_numbers(alert)


@pytest.mark.parametrize("column, kind",
                         [("dead_frac", "dead_relu"), ("no_signal_frac", "no_learning_signal")])
def test_unit_fractions_state_the_fraction(column, kind):
    layer = "hidden" if kind == "dead_relu" else "squash"
    alert = _first([window(1, layers={layer: {column: 0.75}})], kind)[0]
    assert alert.value == 0.75
    assert states(alert.message, alert.value) and states(alert.message, DEFAULTS.dead_steps)


def test_a_silent_kernel_states_the_share_of_steps_it_was_zero():
    # the squash kernel gets a zero gradient on every step while its bias gets one
    zero = {"squash/kernel": {"l2_max": 0.0, "l2": 0.0, "l2_mean": 0.0}}
    alerts = _first([window(i, variables=zero) for i in range(1, 4)], "no_learning_signal")
    assert (alerts[0].value, alerts[0].threshold) == (1.0, 1.0)
    assert_states_its_numbers(alerts[0])


@pytest.mark.parametrize("ratio", [DEFAULTS.update_ratio_high * 3, DEFAULTS.update_ratio_low / 3])
def test_update_ratio_states_the_ratio_and_its_bound(ratio):
    layers = {"hidden": {"update_ratio": ratio}}
    alert = _first([window(i, layers=layers) for i in range(1, 4)], "update_ratio")[0]
    assert_states_its_numbers(alert)


@pytest.mark.parametrize("cos", [0.01, -0.5])
def test_update_mismatch_states_the_cosine_and_its_bound(cos):
    windows = [window(i, variables={"hidden/kernel": {"update_cos": cos, "update_ratio": 1e-3}})
               for i in range(1, 10)]
    alert = _first(windows, "update_mismatch")[0]
    assert_states_its_numbers(alert)


def test_cleared_rows_state_the_value_and_threshold():
    huge = {"squash": {"l2_max": DEFAULTS.exploding_l2 * 3}}
    windows = [window(1, layers=huge)] + [window(i) for i in range(2, 2 + DEFAULTS.patience)]
    info = [a for a in run(windows)[1] if a.severity == "info"]
    assert len(info) == 1
    assert_states_its_numbers(info[0])


@pytest.mark.parametrize("loss_state, lso, skipped", [(0, False, 0), (1, False, 0), (0, True, 2)],
                         ids=["gradient", "loss", "loss_scale"])
def test_nonfinite_rows_state_their_count_of_entries(loss_state, lso, skipped):
    bad = ["hidden/kernel", "squash/kernel"]
    row = window_row(2, 2, 15, skipped=skipped, loss_nonfinite=loss_state)
    alert = nonfinite_alert(row, counts_at_first(bad), TOPOLOGY, lso)
    assert alert.value == SIZES["hidden/kernel"] + SIZES["squash/kernel"]
    assert states(alert.message, alert.value), alert.message


def test_the_diverged_row_states_its_count_of_steps():
    alert = diverged_alert(40, 99)
    assert alert.value == 60 and states(alert.message, alert.value)


def _problem(kind, value, threshold, layer="hidden"):
    return Problem(layer, kind, "warning", 10, 40, 1, True, None, value, threshold, "", "")


def test_the_report_does_not_set_a_count_of_entries_beside_a_count_of_steps():
    windows = pd.DataFrame({"step": [10, 20], "nonfinite_steps": [10, 10]})
    no_rows = pd.DataFrame({"step": [], "nonfinite": []})
    text = _layer_evidence(_problem("nonfinite_gradient", 71.0, 0.0, layer=""), no_rows, windows)
    assert "20 non-finite steps in 2 windows" in text and "71" not in text


def test_the_report_shows_a_unit_fraction_only_when_the_rule_read_it():
    rows = pd.DataFrame({"step": [10, 20, 30], "no_signal_frac": [0.0, 0.0, 0.0]})
    # a kernel silent on every step (value 1 of 1): no_signal_frac was not what fired
    text = _layer_evidence(_problem("no_learning_signal", 1.0, 1.0), rows, pd.DataFrame())
    assert "no_signal_frac" not in text and "alert value 1 vs threshold 1" in text
    rows["no_signal_frac"] = [0.0, 0.6, 0.7]
    text = _layer_evidence(_problem("no_learning_signal", 0.6, 0.5), rows, pd.DataFrame())
    assert "no_signal_frac up to 70%" in text


def test_detect_with_pooled_evidence_states_the_measurement_count():
    state = DetectorState()
    n = SIZES["hidden/kernel"]
    layer_rows, variable_rows = window(1, variables={"hidden/kernel": {"update_ratio": 1e-3}})
    alerts = detect(layer_rows, TOPOLOGY, state, Thresholds(), variable_rows,
                    cos_evidence={"hidden/kernel": (4, 0.0, 4 * 0.5 / n)})
    assert [a.kind for a in alerts] == ["update_mismatch"]
    assert states(alerts[0].message, 4) and states(alerts[0].message, n)
    assert_states_its_numbers(alerts[0])
    assert np.isclose(alerts[0].value, math.sqrt(0.5 / n))
