"""GradientMonitor in model.fit: numbers against a plain GradientTape replay."""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import np_stats, replay_sgd, tape_gradients

import gradwatch as gw
from gradwatch._capture import keras_internals as internals
from gradwatch._internal_options import InternalOptions
from gradwatch._interpret import probe_layout
from gradwatch._interpret.detectors import Thresholds

LR = 0.05


def make_data(n=64, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, :1] * 0.7 - x[:, 1:2] + 0.1).astype("float32")
    return x, y


def make_mlp(seed=0, features=6, name="mlp"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(16, activation="relu", name="hidden1"),
            keras.layers.Dense(8, activation="tanh", name="hidden2"),
            keras.layers.Dense(1, name="out"),
        ],
        name=name,
    )


def batches_of(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def reference_run(make_model, x, y, batch_size, lr=LR):
    model = make_model()
    model.compile(keras.optimizers.SGD(lr), "mse")
    return replay_sgd(model, batches_of(x, y, batch_size), lr)


def check_against_reference(log_dir, ref_steps, ref_losses, rel=1e-4):
    """Every window's rows equal the reference per-step stats folded the same way."""
    run = gw.read_run(log_dir)
    names = [v["name"] for v in run["variables"]]
    stats = gw.read_stats(log_dir)
    windows = gw.read_windows(log_dir)
    assert int(windows.steps.sum()) == len(ref_steps), "every step is accounted for"
    assert list(windows.step) == sorted(set(windows.step))
    assert int(windows.step.iloc[-1]) == len(ref_steps)
    ref_keys = list(ref_steps[0])
    assert len(ref_keys) == len(names)
    for window in windows.itertuples():
        first = window.step - window.steps  # 0-based index of the first step
        steps = ref_steps[first : window.step]
        rows = stats[stats.step == window.step].set_index("variable")
        for name, key in zip(names, ref_keys):
            row = rows.loc[name]
            l2s = [s[key]["l2"] for s in steps]
            assert row.l2 == pytest.approx(l2s[-1], rel=rel), (window.step, name)
            assert row.l2_max == pytest.approx(max(l2s), rel=rel)
            assert row.l2_min == pytest.approx(min(l2s), rel=rel)
            assert row.l2_mean == pytest.approx(np.mean(l2s), rel=rel)
            # the full-pass statistics are sampled on the window's first step
            assert row.max_abs == pytest.approx(steps[0][key]["max_abs"], rel=rel)
            assert row.mean_abs == pytest.approx(steps[0][key]["mean_abs"], rel=rel)
            assert row.zero_frac == pytest.approx(steps[0][key]["zero_frac"], abs=1e-6)
            assert row.nonfinite == 0
        assert window.loss == pytest.approx(np.mean(ref_losses[first : window.step]), rel=rel)
        global_l2 = np.sqrt(sum(steps[-1][k]["l2"] ** 2 for k in ref_keys))
        assert window.global_l2 == pytest.approx(global_l2, rel=rel)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_fit_stats_equal_tape_replay(log_dir, jit_compile, steps_per_execution):
    x, y = make_data()
    ref_steps, ref_losses = reference_run(make_mlp, x, y, batch_size=8)
    model = make_mlp()
    model.compile(
        keras.optimizers.SGD(LR),
        "mse",
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=3)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    check_against_reference(log_dir, ref_steps, ref_losses)
    windows = gw.read_windows(log_dir)
    assert windows.learning_rate.iloc[-1] == pytest.approx(LR)
    if steps_per_execution == 1:
        assert list(windows.steps) == [3, 3, 2]


def test_one_step_epochs_log_each_steps_own_loss(log_dir):
    """An epoch of one batch resets the loss tracker to the same count every step:
    a window of two such steps gets the mean of their losses, not a difference of two
    totals (nor the last epoch's loss from the logs)."""
    x, y = make_data(n=8)
    ref_steps, ref_losses = reference_run(make_mlp, np.concatenate([x] * 6), np.concatenate([y] * 6), 8)
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    model.fit(x, y, batch_size=8, epochs=6, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=2)])
    check_against_reference(log_dir, ref_steps, ref_losses)
    assert list(gw.read_windows(log_dir).steps) == [2] * 3


def test_window_keeps_a_spike_between_reads(log_dir):
    """log_every=8 reads once, but the window's max still holds the one large step."""
    x, y = make_data(n=64)
    x[24:32] *= 50.0  # the 4th batch has a much larger gradient
    ref_steps, _ = reference_run(make_mlp, x, y, batch_size=8, lr=1e-4)
    model = make_mlp()
    model.compile(keras.optimizers.SGD(1e-4), "mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=8)])
    windows = gw.read_windows(log_dir)
    assert list(windows.steps) == [8]
    spike = max(
        np.sqrt(sum(s[k]["l2"] ** 2 for k in s)) for s in ref_steps
    )
    assert windows.global_l2_max.iloc[0] == pytest.approx(spike, rel=1e-4)
    assert windows.global_l2_max.iloc[0] > 3 * windows.global_l2.iloc[0]


def test_second_fit_retraces_tap_and_model_is_left_as_found(log_dir):
    x, y = make_data()
    ref_steps, ref_losses = reference_run(make_mlp, np.concatenate([x, x]), np.concatenate([y, y]), 8)
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=4)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[monitor])
    optimizer = model.optimizer
    assert not internals.has_apply_tap(optimizer)
    assert "apply" not in optimizer.__dict__
    assert model.train_function is None
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[monitor])
    assert not internals.has_apply_tap(optimizer)
    # The second fit continued the step count and is right to the last digit.
    check_against_reference(log_dir, ref_steps, ref_losses)
    # A fit without the monitor afterwards is untouched by gradwatch.
    before = monitor.steps_seen
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert monitor.steps_seen == before


def test_second_fit_with_a_new_monitor_continues_from_iterations(tmp_path):
    x, y = make_data()
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)  # 8 steps, no monitor
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=str(tmp_path), log_every=4)])
    assert list(gw.read_windows(str(tmp_path)).step) == [12, 16]


def test_mixed_precision_reports_unscaled_gradients(log_dir):
    x, y = make_data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_mlp()
        model.compile(keras.optimizers.SGD(LR), "mse")
        reference = make_mlp()
        reference.set_weights(model.get_weights())
        reference.compile(keras.optimizers.SGD(LR), "mse")
        optimizer = model.optimizer
        assert internals.is_loss_scale_optimizer(optimizer)
        # Reference: the same loss-scaled tape Keras runs, unscaled by hand.
        scale = float(optimizer.initial_scale)
        xb, yb = x[:8], y[:8]
        with tf.GradientTape() as tape:
            loss = reference.compute_loss(x=xb, y=yb, y_pred=reference(xb, training=True))
            scaled = loss * scale
        ref = [np_stats(np.asarray(g, np.float64) / scale)
               for g in tape.gradient(scaled, reference.trainable_variables)]
        model.fit(xb, yb, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    stats = gw.read_stats(log_dir)
    for row, expected in zip(stats.itertuples(), ref):
        assert row.l2 == pytest.approx(expected["l2"], rel=1e-3), row.variable
        assert row.max_abs == pytest.approx(expected["max_abs"], rel=1e-3)
    windows = gw.read_windows(log_dir)
    assert windows.loss.iloc[0] == pytest.approx(float(loss), rel=1e-3)
    assert gw.read_run(log_dir)["optimizer"]["loss_scale_optimizer"] is True


def _check_single_batch(model, log_dir, x, y, rel=1e-5):
    grads, loss = tape_gradients(model, x, y)
    names = [v.path for v in model.trainable_variables]
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    stats = gw.read_stats(log_dir)
    assert len(stats) == len(names)
    for row, grad in zip(stats.itertuples(), grads):
        expected = np_stats(grad)
        for field in ("l2", "max_abs", "mean_abs", "zero_frac"):
            assert getattr(row, field) == pytest.approx(expected[field], rel=rel, abs=1e-9), (
                row.variable, field)
    assert gw.read_windows(log_dir).loss.iloc[0] == pytest.approx(loss, rel=rel)
    return stats


def test_functional_model(log_dir):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    a = keras.layers.Dense(7, activation="relu", name="a")(inputs)
    b = keras.layers.Dense(7, activation="sigmoid", name="b")(inputs)
    merged = keras.layers.Concatenate()([a, b])
    out = keras.layers.Dense(2, name="head")(merged)
    model = keras.Model(inputs, out, name="functional")
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
    stats = _check_single_batch(model, log_dir, x, y)
    assert list(stats.layer.unique()) == ["a", "b", "head"]
    layers = gw.read_run(log_dir)["layers"]
    assert [(layer["name"], layer["activation"]) for layer in layers] == [
        ("a", "relu"), ("b", "sigmoid"), ("head", "linear")]


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.encoder = keras.layers.Dense(6, name="encoder")
        self.act = keras.layers.ReLU(name="act")
        self.decoder = keras.layers.Dense(1, name="decoder")

    def call(self, inputs, training=False):
        return self.decoder(self.act(self.encoder(inputs)))


def test_subclassed_model_and_following_activation_layer(log_dir):
    keras.utils.set_random_seed(2)
    model = Subclassed()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = make_data(n=16, features=4)
    model(x[:1])
    stats = _check_single_batch(model, log_dir, x, y)
    assert list(stats.variable) == ["encoder/kernel", "encoder/bias", "decoder/kernel", "decoder/bias"]
    layers = {layer["name"]: layer["activation"] for layer in gw.read_run(log_dir)["layers"]}
    assert layers == {"encoder": "relu", "decoder": "linear"}


def test_embedding_sparse_gradients(log_dir):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(50, 4, name="embed"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.array([[1, 2, 2, 3, 1], [4, 1, 1, 1, 9], [3, 3, 3, 3, 3], [0, 7, 7, 2, 1]], "int32")
    y = np.arange(4, dtype="float32")[:, None]
    # The tap really gets IndexedSlices for the embedding.
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    assert isinstance(tape.gradient(loss, model.trainable_variables)[0], tf.IndexedSlices)
    stats = _check_single_batch(model, log_dir, x, y)
    embed = stats[stats.variable == "embed/embeddings"].iloc[0]
    assert embed.zero_frac == pytest.approx(1 - 7 * 4 / 200)  # 7 of 50 rows touched


def test_frozen_layers_are_not_watched(log_dir):
    model = make_mlp()
    model.get_layer("hidden1").trainable = False
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = make_data(n=8)
    stats = _check_single_batch(model, log_dir, x, y)
    assert "hidden1" not in set(stats.layer)
    assert set(stats.layer) == {"hidden2", "out"}


@pytest.mark.parametrize("clip", [{"clipnorm": 1e-3}, {"global_clipnorm": 1e-3}, {"clipvalue": 1e-4}])
def test_stats_are_before_the_optimizers_own_clipping(log_dir, clip):
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR, **clip), "mse")
    x, y = make_data(n=8)
    before = [v.numpy().copy() for v in model.trainable_variables]
    _check_single_batch(model, log_dir, x, y)
    run = gw.read_run(log_dir)
    assert run["optimizer"]["clips"] is True
    assert run["optimizer"]["clipping"] == {k: pytest.approx(v) for k, v in clip.items()}
    # and Keras still clipped what it applied
    moved = max(np.abs(v.numpy() - b).max() for v, b in zip(model.trainable_variables, before))
    assert moved <= LR * 1e-3 + 1e-9


def test_custom_train_step_with_apply_gradients(log_dir):
    class Custom(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}

    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,))
    model = Custom(inputs, keras.layers.Dense(1, name="lin")(inputs))
    model.compile(keras.optimizers.SGD(0.01))
    x, y = make_data(n=8)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    model.fit(x, y, batch_size=8, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    stats = gw.read_stats(log_dir)
    for row, g in zip(stats.itertuples(), grads):
        assert row.l2 == pytest.approx(float(tf.norm(g)), rel=1e-5)
    # No loss tracker update in this train_step: what it returns may be any running
    # mean, so the loss is NaN, and run.json says why.
    assert np.isnan(gw.read_windows(log_dir).loss.iloc[0])
    assert "Custom.train_step is the model's own" in gw.read_run(log_dir)["loss"]["note"]


def test_warns_when_no_step_was_observed(log_dir):
    class Manual(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            for v, g in zip(self.trainable_variables, tape.gradient(loss, self.trainable_variables)):
                v.assign_sub(0.01 * g)
            return {"loss": loss}

    inputs = keras.Input((6,))
    model = Manual(inputs, keras.layers.Dense(1)(inputs))
    model.compile(keras.optimizers.SGD(0.01))
    x, y = make_data(n=8)
    with pytest.warns(UserWarning, match="the first batch applied no gradient"):
        model.fit(x, y, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir)])


@pytest.mark.fast
def test_missing_optimizer_is_a_clear_error(log_dir):
    model = make_mlp()
    model.compile(loss="mse")
    model.optimizer = None
    x, y = make_data(n=8)
    with pytest.raises((ValueError, AttributeError), match="optimizer"):
        model.fit(x, y, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir)])


def test_tap_is_removed_when_a_step_raises(log_dir):
    x, y = make_data()

    def generator():
        for i in range(6):
            if i == 3:
                raise RuntimeError("data source broke")
            yield x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]

    dataset = tf.data.Dataset.from_generator(
        generator,
        output_signature=(tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None, 1), tf.float32)),
    )
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    with pytest.raises(Exception, match="data source broke"):
        model.fit(dataset, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=100)])
    assert not internals.has_apply_tap(model.optimizer)
    # The steps done before the failure were flushed.
    assert int(gw.read_windows(log_dir).steps.sum()) == 3


def test_a_tap_left_behind_is_harmless(log_dir):
    """Another callback raising outside the train function leaves the tap; it passes through."""

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt

    x, y = make_data()
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[monitor, Boom()])
    # the tap is still installed (nothing ran on_train_end): a later plain fit is unchanged
    reference = make_mlp()
    reference.set_weights(model.get_weights())
    reference.compile(keras.optimizers.SGD(LR), "mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_model_save_checkpoint_and_backup_round_trip(tmp_path):
    x, y = make_data()
    plain = make_mlp()
    plain.compile(keras.optimizers.Adam(1e-3), "mse")
    plain.fit(x, y, batch_size=8, shuffle=False, verbose=0)

    model = make_mlp()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    monitor = gw.GradientMonitor(log_dir=str(tmp_path / "gw"), log_every=2)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras"))
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[monitor, checkpoint, backup])
    # gradwatch added no variables to the model or its optimizer
    assert len(model.variables) == len(plain.variables)
    assert len(model.optimizer.variables) == len(plain.optimizer.variables)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    model.save(str(tmp_path / "model.keras"))
    for path in (tmp_path / "model.keras", tmp_path / "ckpt.keras"):
        loaded = keras.models.load_model(str(path))
        for a, b in zip(loaded.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert len(loaded.optimizer.variables) == len(model.optimizer.variables)


def test_backup_and_restore_resume_continues_steps(tmp_path):
    x, y = make_data()
    log_dir = str(tmp_path / "gw")

    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    model = make_mlp(name="resume")
    model.compile(keras.optimizers.SGD(LR), "mse")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=4), backup, StopAt()])
    # A new process: new model and monitor, same directories.
    model = make_mlp(name="resume")
    model.compile(keras.optimizers.SGD(LR), "mse")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=4, append=True), backup])
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [4 * k for k in range(1, 9)]
    with open(os.path.join(log_dir, "windows.csv")) as f:
        lines = f.read().splitlines()
    assert sum(line.startswith("step,") for line in lines) == 1
    assert len(lines) == 1 + 8  # no duplicated step rows in the file itself
    assert int(model.optimizer.iterations.numpy()) == 32


@pytest.mark.fast
def test_no_trainable_variables_warns_and_stays_idle(log_dir):
    model = make_mlp()
    for layer in model.layers:
        layer.trainable = False
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = make_data(n=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir)])
    assert any("no trainable variables" in str(w.message) for w in caught)


@pytest.mark.fast
def test_keras_internals_are_where_gradwatch_expects_them():
    assert internals.check_internals() == []


def test_loss_scale_overflow_skips_keep_steps_unique(log_dir):
    """A LossScaleOptimizer overflow does not advance iterations; gradwatch's steps still do."""
    x, y = make_data(n=32)
    x[8:16] = 3e4  # float16 overflow in this batch's forward/backward pass
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_mlp()
        model.compile(keras.optimizers.SGD(1e-3), "mse")
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [1, 2, 3, 4]
    assert list(windows.skipped_steps) == [0, 1, 0, 0]
    assert list(windows.nonfinite_steps) == [0, 1, 0, 0]
    assert int(model.optimizer.iterations.numpy()) == 3  # Keras skipped one update
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.fast
def test_strategy_off_the_allow_list_is_refused_clearly(log_dir):
    class HomeMadeStrategy(tf.distribute.OneDeviceStrategy):
        pass

    strategy = HomeMadeStrategy("/cpu:0")
    with strategy.scope():
        model = make_mlp()
        model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match="MirroredStrategy.*runs under HomeMadeStrategy"):
        model.fit(x, y, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir)])


def test_one_device_strategy_is_supported(log_dir):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = make_mlp()
        model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = make_data(n=16)
    grads, _ = tape_gradients(model, x, y)
    model.fit(x, y, batch_size=16, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    stats = gw.read_stats(log_dir)
    assert list(stats.l2) == pytest.approx([np.linalg.norm(g) for g in grads], rel=1e-5)


def test_terminate_on_nan_with_stop_leaves_files_closed_and_flushed(log_dir):
    x, y = make_data()
    x[8:16] = np.inf
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=100, on_nonfinite="stop")
    with pytest.warns(RuntimeWarning):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.TerminateOnNaN(), monitor])
    assert not internals.has_apply_tap(model.optimizer)
    assert int(gw.read_windows(log_dir).steps.sum()) == 2
    assert list(gw.read_alerts(log_dir).kind) == ["nonfinite_gradient"]
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_nested_models_with_repeated_layer_names(log_dir):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    first = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu", name="dense")],
                             name="block_a")
    second = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")], name="block_b")
    model = keras.Model(inputs, second(first(inputs)), name="outer")
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
    stats = _check_single_batch(model, log_dir, x, y)
    # the same layer name in two nested models: each named by its path
    assert list(stats.layer) == ["block_a/dense", "block_a/dense", "block_b/dense", "block_b/dense"]
    layers = gw.read_stats(log_dir, level="layer")
    kernels = stats.set_index("variable")
    expected = np.sqrt(kernels.l2.iloc[0] ** 2 + kernels.l2.iloc[1] ** 2)
    assert layers.set_index("layer").loc["block_a/dense"].l2 == pytest.approx(expected, rel=1e-6)
    assert [layer["activation"] for layer in gw.read_run(log_dir)["layers"]] == ["relu", "linear"]


def test_windows_are_written_off_the_training_thread_in_order(log_dir, monkeypatch):
    """The sinks write on the background writer thread; every window lands, in order,
    by the end of fit."""
    import threading

    from gradwatch._sinks.csv_sink import CsvSink

    threads = []
    original = CsvSink.write

    def recording_write(self, window_row, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, window_row, *args, **kwargs)

    monkeypatch.setattr(CsvSink, "write", recording_write)
    x, y = make_data()
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=2)])
    assert len(threads) == 8
    assert all(name.startswith("gradwatch-writer") for name in threads)
    assert list(gw.read_windows(log_dir).step) == list(range(2, 17, 2))


def test_a_failing_write_is_raised_not_lost(log_dir, monkeypatch):
    from gradwatch._sinks.tb_sink import TensorBoardSink

    def failing_write(self, *args, **kwargs):
        raise OSError("disk full (test)")

    monkeypatch.setattr(TensorBoardSink, "write_window", failing_write)
    x, y = make_data()
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    with pytest.raises(OSError, match="disk full"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=2)])


@pytest.mark.parametrize("log_every,steps_per_execution,folds", [
    (4, 1, False),     # the host reads every 4 steps, the buffer holds 16: no fold traced
    (300, 1, True),    # the buffer (at most 256 rows) could fill before a read
    (4, 4, True),      # the host sees one step in 4: it cannot count them in time
])
def test_a_fit_whose_host_reads_in_time_traces_no_fold_of_a_full_buffer(log_dir, monkeypatch, log_every,
                                                                        steps_per_execution, folds):
    """A short fit (no lean step) whose host sees every step end reads before the step
    buffer fills: its step traces no in-step fold (under jit_compile that branch was ~3 s of
    a short fit's XLA compile), and every step is still written."""
    from gradwatch._capture import accumulate

    traced = []
    original = accumulate.StepBuffer.fold_rows

    def counted(self, count):
        traced.append(count)
        return original(self, count)

    monkeypatch.setattr(accumulate.StepBuffer, "fold_rows", counted)
    x, y = make_data(n=96)
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse", steps_per_execution=steps_per_execution)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=log_every)])
    assert bool(traced) == folds
    ref_steps, ref_losses = reference_run(make_mlp, x, y, 8)
    check_against_reference(log_dir, ref_steps, ref_losses)


def test_many_runs_in_one_process_raise_no_retracing_warning(tmp_path):
    """Each run's functions are traced once; training several models in one process
    (the demo, a hyperparameter loop) is not "excessive retracing"."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = tf.get_logger()
    tf_logger.addHandler(handler)
    try:
        x, y = make_data(n=16)
        for k in range(6):
            model = make_mlp(seed=k)
            model.compile(keras.optimizers.SGD(LR), "mse")
            model.fit(x, y, batch_size=8, verbose=0,
                      callbacks=[gw.GradientMonitor(log_dir=str(tmp_path / str(k)), log_every=1)])
    finally:
        tf_logger.removeHandler(handler)
    retracing = [r.getMessage() for r in records if "retracing" in r.getMessage()]
    assert not [m for m in retracing if "gradwatch" in m or "snapshot" in m or "_read_all" in m], retracing


def make_dead_layer_mlp():
    """6 -> 12 (relu, "live") -> 6 (relu, "dead" from the start: its units never pass a
    gradient, so neither layer gets a non-zero one) -> 1 ("out"), seeded."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(12, activation="relu", name="live"),
        keras.layers.Dense(6, activation="relu", name="dead",
                           bias_initializer=keras.initializers.Constant(-50.0)),
        keras.layers.Dense(1, name="out"),
    ])


def test_reads_interpreted_on_the_writer_thread_write_what_reads_at_once_write(tmp_path):
    """GradientMonitor hands a window without a non-finite step to the writer thread
    to be interpreted (rows, detectors, alerts); the files, the alert rows given to
    ``on_alert`` (in order) and ``last_window`` equal a fit that interprets every
    read at once, and a NaN window is still acted on at its read."""
    import threading

    reported_on = {True: [], False: []}  # (kind, thread) of each alert row, per mode
    x, y = make_data(n=64)
    x[40:48] = np.nan  # every epoch's 6th batch: its window is read at once
    results = {}
    for defer in (True, False):
        model = make_dead_layer_mlp()
        model.compile(keras.optimizers.SGD(0.01), "mse")
        log_dir = str(tmp_path / f"defer_{defer}")
        received = []

        def on_alert(row, received=received, defer=defer):
            received.append(row)
            reported_on[defer].append((row["kind"], threading.current_thread().name))

        monitor = gw.GradientMonitor(log_dir=log_dir, log_every=4, on_nonfinite="skip_step",
                                     thresholds=Thresholds(dead_steps=5), on_alert=on_alert,
                                     internal=InternalOptions(defer_reads=defer))
        # Where TensorFlow's ReLU passes a NaN on (an AMD EPYC here: relu(nan) is nan), the
        # NaN rows reach the loss, and the dead layer's gradient is NaN on those steps: its
        # zero runs last 7 steps between them, so the dead units are counted over 5, not 10.
        # Where ReLU gives 0 for a NaN, the loss stays finite and the gradient is non-finite.
        with pytest.warns(RuntimeWarning, match="Non-finite (gradient|loss) at step 6"):
            model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[monitor])
        results[defer] = (log_dir, received, monitor.last_window)
    # NaN windows at once (the training thread), the others deferred to the writer thread
    lazy_threads = {kind: thread.startswith("gradwatch-writer") for kind, thread in reported_on[True]}
    assert lazy_threads["dead_relu"] and not lazy_threads["nonfinite_gradient"]
    assert not any(thread.startswith("gradwatch-writer") for _, thread in reported_on[False])
    (lazy_dir, lazy_alerts, lazy_last), (now_dir, now_alerts, now_last) = results[True], results[False]
    assert lazy_alerts == now_alerts
    assert {row["kind"] for row in lazy_alerts} >= {"dead_relu", "nonfinite_gradient"}
    assert lazy_last["step"] == 24
    pd.testing.assert_series_equal(pd.Series(lazy_last), pd.Series(now_last))
    pd.testing.assert_frame_equal(gw.read_windows(lazy_dir), gw.read_windows(now_dir))
    pd.testing.assert_frame_equal(gw.read_stats(lazy_dir), gw.read_stats(now_dir))
    pd.testing.assert_frame_equal(gw.read_alerts(lazy_dir), gw.read_alerts(now_dir))
    assert len(gw.read_windows(lazy_dir)) == 6


class HistogramsOfEachWindow:
    """A sink that keeps (first step, histograms or None) of each window in ``store[key]``."""

    def __init__(self, store, key):
        self.store, self.key = store, key

    def open(self, run_info):
        pass

    def write(self, result):
        self.store.setdefault(self.key, []).append((result.first_step, result.histograms or None))

    def close(self):
        pass


@pytest.mark.parametrize("jit_compile", [False, True])
def test_lean_steps_write_what_the_full_step_writes(tmp_path, jit_compile):
    """fit runs a lean trace of the step (no conditional work) on the steps the host
    knows hold none of a sampled step's work; the statistics, dead-unit and update
    columns, alerts and histograms equal a fit that runs the full step throughout."""
    histograms = {}
    lean_steps = []

    x, y = make_data(n=64)
    dirs = {}
    for lean in (True, False):
        model = make_dead_layer_mlp()
        model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
        dirs[lean] = str(tmp_path / f"lean_{lean}")
        internal = InternalOptions(
            lean_steps=lean, lean_min_steps=8, lean_break_even=False,  # the second fit's length
            # the histogram asked for after a warning is taken at a step that depends on
            # when the writer thread interprets the window: the fits are compared step
            # for step, so each window is interpreted at its read
            defer_reads=False,
            extra_sinks=[HistogramsOfEachWindow(histograms, dirs[lean])],
            on_step_kind=lambda is_lean, log_dir=dirs[lean]: lean_steps.append((log_dir, is_lean)))
        monitor = gw.GradientMonitor(log_dir=dirs[lean], log_every=4, histogram_every=6,
                                     thresholds=Thresholds(dead_steps=10), internal=internal)
        model.fit(x, y, batch_size=8, epochs=8, shuffle=False, verbose=0, callbacks=[monitor])
        # a second fit continues the step numbers (taken from the optimizer's
        # iterations): its first window holds histogram step 66
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    steps = 72
    used = [is_lean for log_dir, is_lean in lean_steps if log_dir == dirs[True]]
    # full: the 18 window starts, the histogram steps between them, the update
    # snapshot steps (dense early: 1, 3, 5, ..., 45, then 51); lean: all the others
    assert len(used) == steps
    allowed = {s for s in range(1, steps + 1)
               if (s - 1) % 4 == 0 or s % 6 == 0 or probe_layout.snapshot_due(s)}
    full = {k + 1 for k, is_lean in enumerate(used) if not is_lean}
    assert full <= allowed and sum(used) == steps - len(full) >= steps - len(allowed) > steps // 4
    assert not any(is_lean for log_dir, is_lean in lean_steps if log_dir == dirs[False])
    for level in ("variable", "layer"):
        lean_stats = gw.read_stats(dirs[True], level=level)
        full_stats = gw.read_stats(dirs[False], level=level)
        assert len(lean_stats) == len(full_stats) > 0
        pd.testing.assert_frame_equal(lean_stats, full_stats, check_exact=False, rtol=1e-6)
    layers = gw.read_stats(dirs[True], level="layer").set_index(["step", "layer"])
    assert layers.loc[(64, "dead"), "dead_frac"] == 1.0
    # the dead layer and the one below it get all-zero gradients on every step (the
    # lean step settles those norms without its full pass)
    assert (layers.xs("dead", level="layer").l2_max == 0.0).all()
    assert (layers.xs("live", level="layer").l2_max == 0.0).all()
    assert (layers.xs("out", level="layer").l2_min > 0.0).all()
    assert np.isfinite(gw.read_stats(dirs[True]).update_ratio).any()
    pd.testing.assert_frame_equal(gw.read_windows(dirs[True]), gw.read_windows(dirs[False]),
                                  check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(gw.read_alerts(dirs[True]), gw.read_alerts(dirs[False]))
    lean_hists, full_hists = histograms[dirs[True]], histograms[dirs[False]]
    assert [first for first, _ in lean_hists] == [first for first, _ in full_hists]
    taken = {row["step"] for _, h in lean_hists for row in (h or [])}
    cadence = {s for s in range(1, steps + 1) if s % 6 == 0}
    # the cadence and the run's first step; the histogram asked for after the read that raised
    # the dead-unit warnings (step 9, the next full step) is replaced by step 12's in the same
    # window (a window keeps one histogram)
    assert taken == cadence | {1}
    for (_, lean_h), (_, full_h) in zip(lean_hists, full_hists):
        assert len(lean_h or []) == len(full_h or [])
        for lean_row, full_row in zip(lean_h or [], full_h or []):
            assert lean_row.keys() == full_row.keys()
            for key, value in lean_row.items():
                if isinstance(value, str):
                    assert value == full_row[key]
                else:
                    np.testing.assert_allclose(value, full_row[key], rtol=1e-6)


def test_histograms_on_every_step_run_the_lean_step(tmp_path):
    """histogram_every=1: every step is a histogram step, known when the step is traced,
    so the lean step takes the histograms itself (they no longer make every step a full
    one) and writes what the full step writes."""
    histograms, kinds, dirs = {}, {}, {}
    x, y = make_data(n=64)
    for lean in (True, False):
        model = make_dead_layer_mlp()
        model.compile(keras.optimizers.Adam(0.01), "mse")
        dirs[lean] = str(tmp_path / f"lean_{lean}")
        internal = InternalOptions(lean_steps=lean, lean_min_steps=8, lean_break_even=False,
                                   extra_sinks=[HistogramsOfEachWindow(histograms, lean)],
                                   on_step_kind=kinds.setdefault(lean, []).append)
        monitor = gw.GradientMonitor(log_dir=dirs[lean], log_every=4, histogram_every=1,
                                     thresholds=Thresholds(dead_steps=10), internal=internal)
        model.fit(x, y, batch_size=8, epochs=8, shuffle=False, verbose=0, callbacks=[monitor])
    steps = 64
    assert len(kinds[True]) == steps and not any(kinds[False])
    # full: the window starts and the update snapshot steps only
    allowed = {s for s in range(1, steps + 1) if (s - 1) % 4 == 0 or probe_layout.snapshot_due(s)}
    full = {k + 1 for k, is_lean in enumerate(kinds[True]) if not is_lean}
    assert full <= allowed and steps - len(allowed) > steps // 4
    for level in ("variable", "layer"):
        pd.testing.assert_frame_equal(gw.read_stats(dirs[True], level=level),
                                      gw.read_stats(dirs[False], level=level), check_exact=False, rtol=1e-6)
    lean_hists, full_hists = histograms[True], histograms[False]
    assert len(lean_hists) == len(full_hists) == steps // 4
    for (first, lean_h), (_, full_h) in zip(lean_hists, full_hists):
        # each window keeps its last step's histogram: a lean step's (every 4th step is lean)
        assert {row["step"] for row in lean_h} == {first + 3}
        assert len(lean_h) == len(full_h) > 0
        for lean_row, full_row in zip(lean_h, full_h):
            for key, value in lean_row.items():
                if isinstance(value, str):
                    assert value == full_row[key]
                else:
                    np.testing.assert_allclose(value, full_row[key], rtol=1e-6)


def test_a_short_fit_traces_no_lean_step(log_dir):
    # the lean step is a second trace of the train step: not worth it for a short fit
    kinds = []
    x, y = make_data(n=64)
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=4,
                                 internal=InternalOptions(lean_min_steps=65, lean_break_even=False,
                                                          on_step_kind=kinds.append))
    model.fit(x, y, batch_size=8, epochs=8, shuffle=False, verbose=0, callbacks=[monitor])
    assert len(kinds) == 64 and not any(kinds)
    assert int(gw.read_windows(log_dir).steps.sum()) == 64


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 >= self.steps:
            self.model.stop_training = True


@pytest.mark.parametrize("planned,lean_from", [(1000, None), (10**6, 9)])
def test_the_lean_step_is_traced_once_it_pays_for_its_trace(log_dir, planned, lean_from):
    # A small net's first step (its trace) takes ~0.5-1 s and a step a few ms: 1,000
    # planned steps are far short of what the lean step's trace would cost them
    # (LEAN_TRACE_SHARE, LEAN_SAVING), a million are not. The decision is taken from
    # the fit's own first call and LEAN_TIMED_STEPS full steps; both fits stop at 40.
    kinds = []
    x, y = make_data(n=64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    model = make_mlp()
    model.compile(keras.optimizers.SGD(LR), "mse")
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=4,
                                 internal=InternalOptions(on_step_kind=kinds.append))
    model.fit(data, steps_per_epoch=planned, epochs=1, verbose=0, callbacks=[monitor, _StopAfter(40)])
    assert len(kinds) == 40
    first_lean = kinds.index(True) if True in kinds else None
    assert first_lean == lean_from
    assert int(gw.read_windows(log_dir).steps.sum()) == 40


def test_lean_pays_once_its_saving_reaches_its_trace():
    from gradwatch._capture import fit_tap

    # trace 0.45 x (1.0 - 0.01) s = 0.4455 s; saving the lesser of 0.03 x 0.01 s = 0.3 ms
    # and 8e-5 x 0.99 s = 79.2 us a step: 5,625 steps
    assert fit_tap.lean_pays(1.0, 0.01, steps_done=10, steps_left=5630)
    assert not fit_tap.lean_pays(1.0, 0.01, steps_done=10, steps_left=5620)
    # unknown length: once the full steps so far have cost as much as the trace
    assert not fit_tap.lean_pays(1.0, 0.01, steps_done=5620, steps_left=None)
    assert fit_tap.lean_pays(1.0, 0.01, steps_done=5630, steps_left=None)
    # a step that is mostly compute (the CNN benchmark: first call 1.77 s, 63.5 ms a step)
    # saves little with the lean step: 1,041 steps left do not pay for its trace (with 3%
    # of its step as the saving, they did), 5,700 do
    assert not fit_tap.lean_pays(1.77, 0.0635, steps_done=9, steps_left=1041)
    assert fit_tap.lean_pays(1.77, 0.0635, steps_done=9, steps_left=5700)
    # a step that is quick against its trace saves at most 3% of itself: 100 s of first
    # call, 10 ms a step, 0.3 ms a step saved: 45 s of trace pay after 150,000 steps
    assert not fit_tap.lean_pays(100.0, 0.01, steps_done=9, steps_left=149_900)
    assert fit_tap.lean_pays(100.0, 0.01, steps_done=9, steps_left=150_100)
    decision = fit_tap.LeanDecision()
    for _ in range(fit_tap.LEAN_TIMED_STEPS):  # not decided before the first call and the timed steps
        decision.time(lambda: None)
        assert not decision.decide(1, {"steps": 10**9, "epochs": 1})
    decision.time(lambda: None)
    assert decision.decide(1, {"steps": 10**9, "epochs": 1})
    assert fit_tap.LeanDecision(always=True).lean
    # the fit's length known: decided once the steps are timed, and a no stays a no
    short = fit_tap.LeanDecision()
    short._times = [1.0] + [0.01] * fit_tap.LEAN_TIMED_STEPS
    assert not short.decide(10, {"steps": 5620, "epochs": 1})
    # a longer fit would pay, were it asked again
    assert not short.decide(1, {"steps": 10**9, "epochs": 1})
    # unknown length: asked again each batch until the steps so far pay for the trace
    open_ended = fit_tap.LeanDecision()
    open_ended._times = [1.0] + [0.01] * fit_tap.LEAN_TIMED_STEPS
    assert not open_ended.decide(5620, {"steps": None, "epochs": 1})
    assert open_ended.decide(10, {"steps": None, "epochs": 1})


def test_a_model_keras_sees_no_variables_of_trains_unwatched_as_without_the_monitor(tmp_path):
    # raw tf.Variables a model holds in a list are not Keras's: the model has no trainable
    # variables, so the monitor stays idle (and says so), while the model's own
    # train_step still applies its optimizer, which the monitor has tapped. The fit runs
    # as it would without the monitor (it raised at the first step before).
    def run(callbacks):
        w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")

        class Raw(keras.Model):
            def __init__(self):
                super().__init__()
                self.raw = [w]

            def call(self, x):
                return x

            def train_step(self, data):
                x, y = data
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean((tf.matmul(x, w) - y) ** 2)
                self.optimizer.apply_gradients([(tape.gradient(loss, w), w)])
                return {"loss": loss}

        model = Raw()
        assert not model.trainable_variables
        model.compile(keras.optimizers.SGD(0.1))
        x = np.ones((8, 2), np.float32)
        y = np.zeros((8, 3), np.float32)
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=callbacks)
        return w.numpy()

    with pytest.warns(UserWarning, match="no trainable variables"):
        watched = run([gw.GradientMonitor(str(tmp_path / "run"))])
    np.testing.assert_array_equal(watched, run([]))
