"""Shared helpers: independent reference statistics (numpy over plain GradientTape
gradients) to compare gradwatch's numbers with."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


class ResultsSink:
    """A sink that keeps every window result (``InternalOptions.extra_sinks``)."""

    def __init__(self):
        self.results = []

    def open(self, run_info):
        pass

    def write(self, result):
        self.results.append(result)

    def close(self):
        pass


def np_stats(grad: np.ndarray) -> dict[str, float]:
    """Reference statistics of one gradient, in float64 numpy."""
    g = np.asarray(grad, dtype=np.float64).ravel()
    finite = np.isfinite(g)
    a = np.abs(np.where(finite, g, 0.0))
    none = g.size > 0 and not finite.any()  # a norm over no finite entries is NaN, never 0
    return {
        "l2": float("nan") if none else float(np.sqrt(np.sum(a * a))),
        "max_abs": float("nan") if none else float(a.max()) if a.size else 0.0,
        "mean_abs": float("nan") if none else float(a.sum() / g.size),
        "zero_frac": float(np.mean(g == 0.0)),
        "nonfinite": float(np.sum(~finite)),
    }


def tape_gradients(model, x, y):
    """The gradients of the model's compiled loss on (x, y), by a plain GradientTape."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    dense = [np.asarray(tf.convert_to_tensor(g)) if g is not None else None for g in grads]
    return dense, float(loss)


def replay_sgd(model, batches, learning_rate):
    """Trains ``model`` with plain SGD on ``batches`` by hand; returns per-step
    reference stats ``[{variable_path: np_stats}]`` and losses."""
    steps, losses = [], []
    for x, y in batches:
        grads, loss = tape_gradients(model, x, y)
        steps.append(
            {v.path: np_stats(g) for v, g in zip(model.trainable_variables, grads) if g is not None}
        )
        losses.append(loss)
        for v, g in zip(model.trainable_variables, grads):
            if g is not None:
                v.assign(v.numpy() - learning_rate * g)
    return steps, losses


def assert_close(actual, expected, rel=1e-5, abs_=1e-7, what=""):
    assert actual == pytest.approx(expected, rel=rel, abs=abs_), what


@pytest.fixture
def log_dir(tmp_path):
    return str(tmp_path / "run")


def pytest_sessionfinish(session):
    """Under pytest-xdist (``make test`` runs two workers) a worker hands the score to
    the controlling process, which prints the summary."""
    score = getattr(session.config, "gradwatch_scenario_score", None)
    if score and hasattr(session.config, "workeroutput"):
        session.config.workeroutput["gradwatch_scenario_score"] = score


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    score = getattr(node, "workeroutput", {}).get("gradwatch_scenario_score")
    if score:
        node.config.gradwatch_scenario_score = score


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Prints the labelled scenario suite's per-kind precision/recall when it ran."""
    score = getattr(config, "gradwatch_scenario_score", None)
    if score:
        terminalreporter.write_sep("-", "gradwatch scenario suite (seed 0): precision / recall per kind")
        terminalreporter.write_line(score)
