"""Non-finite gradients: where they came from, and on_nonfinite's four modes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch as gw
from gradwatch._capture import keras_internals as internals
from gradwatch._interpret.alerts import NonFiniteGradientError


def _data(n=48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, (x[:, :1] - x[:, 1:2]).astype("float32")


def _mlp(activation="relu"):
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation=activation, name="hidden"),
         keras.layers.Dense(1, name="out")]
    )


def test_nan_in_the_data_is_blamed_on_the_forward_pass(log_dir):
    x, y = _data()
    x[16:24] = np.nan  # the third batch of 8
    model = _mlp("tanh")  # (relu would turn the NaN activations into 0: a finite loss)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    with pytest.warns(RuntimeWarning, match="Non-finite loss at step 3"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=2)])
    alerts = gw.read_alerts(log_dir)
    first = alerts[alerts.kind == "nonfinite_gradient"].iloc[0]
    assert first.step == 3 and first.severity == "error"
    assert "forward pass produced NaN/Inf (from the input data" in first.message
    assert "input data" in first.hint
    windows = gw.read_windows(log_dir)
    assert windows.first_nonfinite_step.dropna().iloc[0] == 3
    assert windows.nonfinite_loss_at_first.dropna().iloc[0] == 1


def _sqrt_net():
    """Finite loss, non-finite gradient: d sqrt(u)/du is infinite at u = 0, and the
    layer below the sqrt outputs exactly 0."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((5,))
    first = keras.layers.Dense(4, activation="tanh", name="first")(inputs)
    below = keras.layers.Dense(3, name="below", kernel_initializer="zeros")(first)
    rooted = keras.layers.Lambda(lambda u: tf.sqrt(tf.abs(u)), name="sqrt")(below)
    out = keras.layers.Dense(1, name="head")(rooted)
    return keras.Model(inputs, out)


def test_finite_loss_names_the_first_layer_in_backprop_order(log_dir):
    x, y = _data(16)
    model = _sqrt_net()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x[:8], y=y[:8], y_pred=model(x[:8], training=True))
    grads = dict(zip(["/".join(v.path.split("/")[-2:]) for v in model.trainable_variables],
                     tape.gradient(loss, model.trainable_variables)))
    assert np.isfinite(float(loss))
    assert np.isfinite(grads["head/kernel"].numpy()).all()
    assert not np.isfinite(grads["below/kernel"].numpy()).all()
    with pytest.warns(RuntimeWarning, match="first in layer 'below'"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    alert = gw.read_alerts(log_dir).iloc[0]
    assert (alert.step, alert.layer, alert.kind) == (1, "below", "nonfinite_gradient")
    assert "while the loss was finite" in alert.message
    layers = gw.read_stats(log_dir, level="layer")
    first_step = layers[layers.step == 1].set_index("layer")
    assert first_step.loc["head"].nonfinite == 0 and first_step.loc["below"].nonfinite > 0


def _train_batches(model, batches, optimizer):
    for xb, yb in batches:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))


def test_skip_step_leaves_weights_and_optimizer_state_untouched(log_dir):
    x, y = _data()
    x[16:24] = np.nan
    model = _mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    with pytest.warns(RuntimeWarning, match="The update was skipped"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=3, on_nonfinite="skip_step")])
    # Reference: Adam on the same batches without the bad one.
    reference = _mlp()
    reference.compile(keras.optimizers.Adam(0.01), "mse")
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8) if i != 16]
    _train_batches(reference, batches, reference.optimizer)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(model.optimizer.iterations.numpy()) == 5
    windows = gw.read_windows(log_dir)
    assert int(windows.skipped_steps.sum()) == 1 and list(windows.step) == [3, 6]


def test_raise_names_layer_and_step_and_removes_the_tap(log_dir):
    x, y = _data(16)
    model = _sqrt_net()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(NonFiniteGradientError, match="step 1.*'below'"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=10, on_nonfinite="raise")])
    assert not internals.has_apply_tap(model.optimizer)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)  # the non-finite update was never applied
    assert len(gw.read_alerts(log_dir)) == 1


def test_stop_ends_training_with_finite_weights(log_dir):
    x, y = _data()
    x[8:16] = np.inf
    model = _mlp()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    with pytest.warns(RuntimeWarning, match="Training stopped"):
        monitor = gw.GradientMonitor(log_dir=log_dir, log_every=10, on_nonfinite="stop")
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[monitor])
    assert len(history.history["loss"]) == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())
    windows = gw.read_windows(log_dir)
    assert int(windows.steps.sum()) == 2  # stopped right after the bad step 2


@pytest.mark.parametrize("in_function", [True, False])
@pytest.mark.fast
def test_watch_apply_skips_non_finite_steps(log_dir, in_function):
    w = tf.Variable([1.0, 2.0])
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    watch = gw.Watch(log_dir=log_dir, log_every=1, on_nonfinite="skip_step")

    def step(scale):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sqrt(w * scale))  # scale 0 -> infinite gradient
        grads = watch.observe(tape.gradient(loss, [w]), [w], loss=loss)
        watch.apply(optimizer, grads, [w])

    run = tf.function(step) if in_function else step
    run(tf.constant(1.0))
    after_first = w.numpy().copy()
    with pytest.warns(RuntimeWarning, match="Non-finite gradient at step 2"):
        run(tf.constant(0.0))
        watch.step_end()
    np.testing.assert_array_equal(w.numpy(), after_first)
    assert int(optimizer.iterations.numpy()) == 1
    watch.close()


@pytest.mark.fast
def test_no_gradient_alert_is_raised_once_per_variable(log_dir):
    used, unused = tf.Variable([1.0]), tf.Variable([2.0])
    with gw.Watch(log_dir=log_dir, log_every=1, names=["a/used", "b/unused"]) as watch:
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(used * used)
            watch.observe(tape.gradient(loss, [used, unused]), [used, unused])
            watch.step_end()
    alerts = gw.read_alerts(log_dir)
    assert list(alerts.kind) == ["no_gradient"]
    assert alerts.iloc[0].variable == "b/unused" and alerts.iloc[0].step == 1


def test_on_alert_callback_receives_rows(log_dir):
    received = []
    x, y = _data(16)
    model = _sqrt_net()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    with pytest.warns(RuntimeWarning):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1, on_alert=received.append)])
    assert received and received[0]["kind"] == "nonfinite_gradient" and received[0]["layer"] == "below"
