"""A read's rows are folded later, on another thread (``PendingRead.finish``): the
values a read fetched do not change with the steps that follow it, and the loss
tracker's totals that each window's first step follows are settled at the read."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradwatch._capture import model_topology
from gradwatch._capture.recorder import Recorder, StepContext
from gradwatch._options import Options

pytestmark = pytest.mark.fast

BATCH = 4.0


def _bound_recorder(variables, log_every):
    recorder = Recorder(Options(log_dir=None, log_every=log_every, histogram_every=0))
    recorder.bind(model_topology.from_variables(variables, ["w", "b"]), variables)
    return recorder


def test_windows_folded_after_later_steps_and_out_of_order_equal_a_tape():
    rng = np.random.default_rng(7)
    w = tf.Variable(rng.normal(size=(3, 2)).astype("float32"))
    b = tf.Variable(np.zeros(2, np.float32))
    variables = [w, b]
    recorder = _bound_recorder(variables, log_every=3)
    slots = recorder.slots_of(variables, variables)
    # a loss tracker as Keras keeps one: (total, count), never reset in this run
    total = tf.Variable(0.0)
    count = tf.Variable(0.0)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + b - y))
        grads = tape.gradient(loss, variables)
        total.assign_add(loss * BATCH)
        count.assign_add(BATCH)
        recorder.observe(grads, slots, StepContext(loss_totals=(total.read_value(), count.read_value())))
        for variable, grad in zip(variables, grads):
            variable.assign_sub(0.1 * grad)
        return grads, loss

    reference = []

    def run(steps):
        for _ in range(steps):
            x = rng.normal(size=(4, 3)).astype("float32")
            y = rng.normal(size=(4, 2)).astype("float32")
            grads, loss = step(tf.constant(x), tf.constant(y))
            reference.append(([np.linalg.norm(g.numpy().astype(np.float64)) for g in grads], float(loss)))

    run(3)
    first = recorder.read_pending()
    run(3)
    second = recorder.read_pending()
    run(3)  # overwrites the buffer rows both reads fetched
    assert (first.steps, first.last_step, first.nonfinite) == (3, 3, False)
    assert (second.steps, second.last_step) == (3, 6)
    # the second window is folded first: its first step's loss must not need the first's fold
    windows = {6: second.finish(), 3: first.finish()}
    for last, window in windows.items():
        steps = reference[last - 3:last]
        assert window.steps == 3 and window.last_step == last
        for k in range(len(variables)):
            norms = [s[0][k] for s in steps]
            assert window.columns["l2_last"][k] == pytest.approx(norms[-1], rel=1e-5)
            assert window.columns["l2_max"][k] == pytest.approx(max(norms), rel=1e-5)
            assert window.columns["l2_min"][k] == pytest.approx(min(norms), rel=1e-5)
        losses = [s[1] for s in steps]
        assert window.globals["loss_count"] == 3
        assert window.globals["loss_sum"] / 3 == pytest.approx(np.mean(losses), rel=1e-4)
    third = recorder.read_pending().finish()  # at once, as a read that is not deferred
    assert third.last_step == 9
    assert third.globals["loss_sum"] / 3 == pytest.approx(np.mean([s[1] for s in reference[6:]]), rel=1e-4)
    assert recorder.read_pending() is None  # nothing observed since


def test_host_function_reads_variables_as_they_are_now_and_traces_once():
    from gradwatch._capture.keras_internals import HostFunction

    v = tf.Variable([1.0, 2.0])
    traces = []

    def read_and_reset():
        traces.append(1)
        value = v.read_value()
        with tf.control_dependencies([value]):
            v.assign(tf.zeros([2]))
        return {"value": value}

    read = HostFunction(read_and_reset)
    np.testing.assert_array_equal(read()["value"].numpy(), [1.0, 2.0])
    v.assign([3.0, 4.0])
    np.testing.assert_array_equal(read()["value"].numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(v.numpy(), [0.0, 0.0])
    assert len(traces) == 1
    # under a strategy the tf.function is called, whose trace follows the call's context
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        v.assign([5.0, 6.0])
        np.testing.assert_array_equal(read()["value"].numpy(), [5.0, 6.0])
