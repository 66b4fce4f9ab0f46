"""Pathologies present from step 1 are reported early, in short runs, with small variables.

Real TensorFlow runs of a few epochs of a few dozen steps: a ReLU layer dead from the
first step is reported by step 50 or the end of the first epoch whatever ``log_every``
is; a raw-variable custom loop whose two 6x6 kernels get each other's gradient gets
``update_mismatch`` within a few dozen steps, while the same loop applied correctly stays
silent.  Expected fractions and steps are computed independently (numpy).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch as gw

B = 16


def _data(n, features=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    return x, (x @ rng.normal(size=(features, 1)) > 0).astype("float32")


def _half_dead_model():
    """A ReLU layer whose first 10 of 16 units start far below zero (dead from step 1)."""
    keras.utils.set_random_seed(0)
    bias = np.array([-40.0] * 10 + [0.1] * 6, np.float32)
    model = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(16, activation="relu", name="hidden",
                           bias_initializer=keras.initializers.Constant(bias)),
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    return model


def _fit(model, log_dir, x, y, epochs, **monitor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=B, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir, histogram_every=0, **monitor)])


def _dead_fraction(model, x):
    """Independently: the share of the hidden layer's units whose pre-activation is <= 0
    on every example (so zero output and zero gradient on every batch)."""
    kernel, bias = model.get_layer("hidden").get_weights()
    return float(np.mean(np.all(x @ kernel + bias <= 0, axis=0)))


@pytest.mark.parametrize("log_every, epoch_steps, expected_step", [
    (10, 24, 10),  # the first read after EARLY_DEAD_STEPS steps
    (100, 24, 24),  # reads every 100 steps: the end of the first epoch reads
    (1000, 40, 40),
])
def test_a_relu_layer_half_dead_from_step_one_is_reported_by_the_end_of_the_first_epoch(
        tmp_path, log_every, epoch_steps, expected_step):
    x, y = _data(epoch_steps * B)
    model = _half_dead_model()
    expected = _dead_fraction(model, x)
    assert expected >= 0.5
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, epochs=3, log_every=log_every)
    alerts = gw.read_alerts(log_dir)
    dead = alerts[(alerts.kind == "dead_relu") & (alerts.severity == "warning")]
    assert list(dead.layer) == ["hidden"]
    assert int(dead.step.iloc[0]) == expected_step <= min(50, epoch_steps)
    assert float(dead.value.iloc[0]) == pytest.approx(expected)
    assert f"{expected:.0%}" in dead.message.iloc[0] and f"({expected_step} steps)" in dead.message.iloc[0]


def test_a_short_run_reports_the_dead_layer_at_its_end(tmp_path):
    # one epoch of 12 steps, a read every 100: only the fit's end reads, and it reports
    x, y = _data(12 * B)
    model = _half_dead_model()
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, epochs=1, log_every=100)
    alerts = gw.read_alerts(log_dir)
    dead = alerts[(alerts.kind == "dead_relu") & (alerts.severity == "warning")]
    assert list(dead.step) == [12] and list(dead.layer) == ["hidden"]


def test_a_healthy_relu_layer_stays_silent_in_a_short_run(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(1, activation="sigmoid", name="out")])
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    x, y = _data(24 * B)
    assert _dead_fraction(model, x) == 0.0
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, epochs=3, log_every=10)
    alerts = gw.read_alerts(log_dir)
    assert alerts[alerts.severity != "info"].empty, alerts.message.tolist()


def _raw_loop(log_dir, swap, steps=80):
    """Two tanh layers of raw 6x6 kernels (36 entries) trained by hand with SGD; ``swap``
    applies each kernel's gradient to the other one (the bug)."""
    rng = np.random.default_rng(4)
    x, y = _data(B * steps, features=6)
    k1 = tf.Variable(rng.normal(size=(6, 6)).astype("float32") * 0.4, name="k1")
    k2 = tf.Variable(rng.normal(size=(6, 6)).astype("float32") * 0.4, name="k2")
    k3 = tf.Variable(rng.normal(size=(6, 1)).astype("float32") * 0.4, name="k3")
    variables = [k1, k2, k3]
    watch = gw.Watch(log_dir, log_every=10, histogram_every=0, names=["h1/kernel", "h2/kernel", "out/kernel"])
    cosines = []

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            logits = tf.nn.tanh(tf.nn.tanh(xb @ k1) @ k2) @ k3
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(yb, logits))
        grads = watch.observe(tape.gradient(loss, variables), variables, loss=loss)
        applied = [grads[1], grads[0], grads[2]] if swap else list(grads)
        for v, g in zip(variables, applied):
            v.assign_sub(0.1 * g)
        return grads[0], applied[0]

    with watch:
        for i in range(steps):
            g, applied = step(tf.constant(x[i * B:(i + 1) * B]), tf.constant(y[i * B:(i + 1) * B]))
            g, applied = g.numpy().ravel(), applied.numpy().ravel()
            cosines.append(g @ applied / (np.linalg.norm(g) * np.linalg.norm(applied)))
            watch.step_end()
    return np.array(cosines)


def test_update_mismatch_on_a_small_raw_variable_loop_with_swapped_gradients(tmp_path):
    log_dir = str(tmp_path / "swapped")
    cosines = _raw_loop(log_dir, swap=True)
    # independently: k1's update is -lr x k2's gradient, near orthogonal to k1's own
    assert np.sqrt(np.mean(cosines ** 2)) < 0.3
    alerts = gw.read_alerts(log_dir)
    found = alerts[(alerts.kind == "update_mismatch") & (alerts.severity == "warning")]
    assert set(found.variable) <= {"h1/kernel", "h2/kernel"} and len(found)
    assert int(found.step.min()) <= 40  # snapshots dense early: within the first windows
    assert "36 entries" in found.message.iloc[0]


def test_the_same_raw_loop_applied_correctly_stays_silent(tmp_path):
    log_dir = str(tmp_path / "correct")
    cosines = _raw_loop(log_dir, swap=False)
    assert np.allclose(cosines, 1.0, atol=1e-5)
    alerts = gw.read_alerts(log_dir)
    assert alerts[alerts.severity != "info"].empty, alerts.message.tolist()
