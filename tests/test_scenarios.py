"""The labelled scenario suite: every alert kind with precision and recall 1.0 (seed 0).

The per-kind score is printed at the end of the pytest run; other seeds are
reported by ``python tests/scenarios/scenarios.py --seeds 1 2 3``.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradwatch as gw
from gradwatch._io.schema import ALERT_KINDS
from tests.scenarios import scenarios as suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenarios"))
    return root, suite.run_suite(root, seed=0)


def test_every_kind_has_precision_and_recall_one(results, request):
    _, raised = results
    table = suite.score(raised)
    request.config.gradwatch_scenario_score = suite.format_score(table)  # printed by conftest
    misses = {name: sorted(kinds) for name, kinds in raised.items()}
    for kind, row in table.items():
        assert row["precision"] == 1.0 and row["recall"] == 1.0, (kind, row, misses)
    # every kind the suite labels is exercised by at least one scenario
    labelled = set().union(*(s.must for s in suite.SCENARIOS))
    assert labelled == set(ALERT_KINDS)


def _alerts(results, name):
    root, _ = results
    return gw.read_alerts(f"{root}/seed0/{name}")


def test_nan_in_data_names_the_step_and_the_cause(results):
    alerts = _alerts(results, "nan_in_data")
    row = alerts[alerts.kind == "nonfinite_gradient"].iloc[0]
    assert row.step == suite.NAN_STEP and f"step {suite.NAN_STEP}" in row.message
    windows = gw.read_windows(f"{results[0]}/seed0/nan_in_data")
    window = windows[windows.first_nonfinite_step == suite.NAN_STEP].iloc[0]
    assert window.nonfinite_steps == 1 and window.skipped_steps == 1
    if window.nonfinite_loss_at_first == 1:
        # the NaN reached the loss: a forward-pass/input problem, not localised to a layer
        assert row.layer == "" and "input data" in row.message + row.hint
    else:
        # relu(NaN) can be 0: the loss stays finite, the first layer's kernel gradient is NaN
        assert row.layer == gw.read_run(f"{results[0]}/seed0/nan_in_data")["layers"][0]["name"]
    # skip_step kept the weights finite: every later step has finite gradients
    later = windows[windows.step > window.step]
    assert len(later) and (later.nonfinite_steps == 0).all() and np.isfinite(later.global_l2).all()


def test_nonfinite_loss_is_reported_as_a_forward_pass_problem(results):
    row = _alerts(results, "log_of_negative").query("kind == 'nonfinite_gradient'").iloc[0]
    assert "loss itself is NaN/Inf" in row.message + row.hint
    assert row.layer in ("", None) or row.layer != row.layer  # not localised


def test_wrong_zip_names_the_two_swapped_kernels(results):
    alerts = _alerts(results, "wrong_zip").query("kind == 'update_mismatch' and severity == 'warning'")
    run = gw.read_run(f"{results[0]}/seed0/wrong_zip")
    kernels = [v["name"] for v in run["variables"] if len(v["shape"]) == 2]
    assert set(alerts.variable) == {kernels[0], kernels[1]}


def test_dead_relu_names_the_dead_layers(results):
    alerts = _alerts(results, "dead_relu_bias").query("kind == 'dead_relu' and severity == 'warning'")
    run = gw.read_run(f"{results[0]}/seed0/dead_relu_bias")
    hidden = [layer["name"] for layer in run["layers"][:2]]
    assert set(alerts.layer) == set(hidden)
    assert (alerts.value == 1.0).all()
    assert "Leaky ReLU" in alerts.iloc[0].hint

