"""gradwatch.clip: invariants of each transform, and equivalence with Keras's own clipping."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch as gw
from gradwatch import clip

RNG = np.random.default_rng(7)


def _grads(scale=1.0):
    return [
        tf.constant(RNG.normal(size=(5, 4)).astype("float32") * scale),
        tf.constant(RNG.normal(size=(4,)).astype("float32") * scale),
        tf.constant(RNG.normal(size=(3, 3, 2, 6)).astype("float32") * scale),
    ]


def _global(grads):
    return float(np.sqrt(sum(np.sum(np.square(g.numpy().astype(np.float64))) for g in grads)))


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.fast
def test_global_norm_invariants(scale):
    grads = _grads(scale)
    transform = clip.GlobalNorm(2.0)
    once = transform(grads, [None] * 3).grads
    assert _global(once) == pytest.approx(min(_global(grads), 2.0), rel=1e-5)
    twice = transform(once, [None] * 3).grads
    for a, b in zip(once, twice):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    flat_before = np.concatenate([g.numpy().ravel() for g in grads])
    flat_after = np.concatenate([g.numpy().ravel() for g in once])
    cosine = flat_before @ flat_after / np.linalg.norm(flat_before) / np.linalg.norm(flat_after)
    assert cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.fast
def test_per_variable_norm_and_value_invariants():
    grads = _grads(10.0)
    per_var = clip.PerVariableNorm(1.5)(grads, [None] * 3).grads
    for before, after in zip(grads, per_var):
        expected = min(np.linalg.norm(before.numpy()), 1.5)
        assert np.linalg.norm(after.numpy()) == pytest.approx(expected, rel=1e-5)
    values = clip.Value(0.5)(grads, [None] * 3).grads
    for before, after in zip(grads, values):
        np.testing.assert_allclose(after.numpy(), np.clip(before.numpy(), -0.5, 0.5))
    again = clip.Value(0.5)(values, [None] * 3).grads
    for a, b in zip(values, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "transform", [clip.GlobalNorm(1.0), clip.PerVariableNorm(1.0), clip.Value(1.0), clip.Adaptive(0.01)]
)
@pytest.mark.fast
def test_non_finite_gradients_are_never_made_finite(transform):
    grads = [tf.constant([np.nan, 5.0, -7.0]), tf.constant([np.inf, 1.0, 2.0])]
    variables = [tf.Variable([1.0, 1.0, 1.0]), tf.Variable([1.0, 1.0, 1.0])]
    out = transform(grads, variables).grads
    for before, after in zip(grads, out):
        np.testing.assert_array_equal(np.isfinite(after.numpy()), np.isfinite(before.numpy()))
        finite = np.isfinite(before.numpy())
        np.testing.assert_array_equal(after.numpy()[finite], before.numpy()[finite])


@pytest.mark.fast
def test_adaptive_bounds_each_unit_ratio():
    kernel = tf.Variable(RNG.normal(size=(6, 4)).astype("float32"))
    conv = tf.Variable(RNG.normal(size=(3, 3, 2, 5)).astype("float32") * 0.1)
    bias = tf.Variable(np.zeros(4, "float32"))  # zero weights: eps floor applies
    grads = [tf.constant(RNG.normal(size=s).astype("float32")) for s in ((6, 4), (3, 3, 2, 5), (4,))]
    out = clip.Adaptive(clipping=0.05, eps=1e-3)(grads, [kernel, conv, bias]).grads
    k_ratio = np.linalg.norm(out[0].numpy(), axis=0) / np.linalg.norm(kernel.numpy(), axis=0)
    assert (k_ratio <= 0.05 + 1e-6).all()
    c_norm = np.sqrt((out[1].numpy() ** 2).sum(axis=(0, 1, 2)))
    c_ratio = c_norm / np.sqrt((conv.numpy() ** 2).sum(axis=(0, 1, 2)))
    assert (c_ratio <= 0.05 + 1e-6).all()
    assert (np.abs(out[2].numpy()) <= 0.05 * 1e-3 + 1e-9).all()
    # units already within the bound are untouched
    small = [tf.constant(kernel.numpy() * 1e-4)]
    np.testing.assert_allclose(clip.Adaptive(0.05)(small, [kernel]).grads[0].numpy(), small[0].numpy())


@pytest.mark.fast
def test_percentile_threshold_follows_the_history():
    transform = clip.Percentile(p=50, history=5)
    history = []
    for norm in [1.0, 9.0, 3.0, 7.0, 5.0, 100.0, 2.0]:
        history.append(norm)
        threshold = float(transform.threshold_after(tf.constant(norm)))
        assert threshold == pytest.approx(np.percentile(history[-5:], 50), rel=1e-6)
    assert float(transform.threshold_after(tf.constant(np.nan))) == pytest.approx(
        np.percentile(history[-5:], 50))  # non-finite norms are not recorded


@pytest.mark.fast
def test_bad_parameters_say_what_is_allowed():
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0; received -1"):
        clip.GlobalNorm(-1)
    with pytest.raises(TypeError, match="limit must be a positive number; received 'x'"):
        clip.Value("x")
    with pytest.raises(ValueError, match="p must be in \\(0, 100\\]"):
        clip.Percentile(p=150)
    with pytest.raises(TypeError, match="clip must be None, a positive number"):
        gw.GradientMonitor(log_dir=None, clip="global")
    assert isinstance(gw.Watch(log_dir=None, clip=2.5).options.clip, clip.GlobalNorm)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 5).astype("float32")
    return x, y


def _model():
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )


@pytest.mark.parametrize(
    "ours, keras_kwargs",
    [
        (clip.GlobalNorm(1.0), {"global_clipnorm": 1.0}),
        (clip.PerVariableNorm(0.5), {"clipnorm": 0.5}),
        (clip.Value(0.05), {"clipvalue": 0.05}),
    ],
)
def test_monitor_clipping_equals_keras_clipping(tmp_path, ours, keras_kwargs):
    x, y = _data()
    reference = _model()
    reference.compile(keras.optimizers.SGD(0.01, momentum=0.9, **keras_kwargs), "mse")
    reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)  # 20 steps
    model = _model()
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=str(tmp_path), log_every=5, clip=ours)])
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    windows = gw.read_windows(str(tmp_path))
    stats = gw.read_stats(str(tmp_path))
    assert int(windows.steps.sum()) == 20
    assert (windows.clip_fraction > 0).all()  # these bounds bite on this data
    assert (stats.clip_scale_min <= 1.0).all() and stats.clip_fraction.notna().all()
    # statistics stay those of the raw gradients: larger than the bound allows
    if isinstance(ours, clip.GlobalNorm):
        assert (windows.global_l2_max > 1.0).all()
        assert windows.clip_global_l2_max.max() == pytest.approx(1.0, rel=1e-5)
        assert (windows.clip_threshold == 1.0).all()


def test_monitor_clipping_under_mixed_precision_equals_keras(tmp_path):
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        reference = _model()
        reference.compile(keras.optimizers.SGD(0.01, global_clipnorm=1.0), "mse")
        reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        model = _model()
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=str(tmp_path), log_every=5, clip=1.0)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    windows = gw.read_windows(str(tmp_path))
    # clipped to 1.0 in true (unscaled) units; the loss-scale overflow steps at the
    # start are non-finite, skipped by Keras and left unclipped by gradwatch
    assert list(windows.clip_global_l2) == pytest.approx([1.0] * len(windows), rel=1e-3)
    assert windows.skipped_steps.sum() >= 1
    clean = windows[windows.nonfinite_steps == 0]
    assert len(clean) and list(clean.clip_global_l2_max) == pytest.approx([1.0] * len(clean), rel=1e-3)


@pytest.mark.fast
def test_double_clipping_is_refused(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(keras.optimizers.SGD(0.01, clipnorm=1.0), "mse")
    with pytest.raises(ValueError, match="clipnorm=1.0.*would clip twice"):
        model.fit(x, y, verbose=0, callbacks=[gw.GradientMonitor(log_dir=str(tmp_path), clip=1.0)])


@pytest.mark.fast
def test_watch_apply_refuses_double_clipping():
    v = tf.Variable([1.0])
    watch = gw.Watch(log_dir=None, clip=1.0)
    grads = watch.observe([tf.constant([5.0])], [v])
    with pytest.raises(ValueError, match="global_clipnorm=0.5\\) would clip twice"):
        watch.apply(keras.optimizers.SGD(0.1, global_clipnorm=0.5), grads, [v])


def test_watch_returns_clipped_gradients(tmp_path):
    variables = [tf.Variable(np.ones(4, "float32")), tf.Variable(np.ones(3, "float32"))]
    grads = [tf.constant([3.0, 0.0, 0.0, 0.0]), tf.constant([4.0, 0.0, 0.0])]
    watch = gw.Watch(log_dir=str(tmp_path), log_every=1, clip=clip.GlobalNorm(1.0), names=["l/a", "l/b"])
    with watch:
        out = watch.observe(grads, variables)
        watch.step_end()
    assert _global(out) == pytest.approx(1.0, rel=1e-6)
    stats = gw.read_stats(str(tmp_path))
    assert list(stats.l2) == pytest.approx([3.0, 4.0])  # pre-clip statistics
    assert list(stats.clip_scale_min) == pytest.approx([0.2, 0.2])
    window = gw.read_windows(str(tmp_path)).iloc[0]
    assert window.clip_global_l2 == pytest.approx(1.0, rel=1e-6)
    assert window.clip_scale_min == pytest.approx(0.2)
    assert window.clip_fraction == 1.0


def test_exploding_net_is_tamed_by_clipping(tmp_path):
    """A net with a learning rate far too high diverges; GlobalNorm clipping keeps it finite."""
    x, y = _data()

    def train(clip_arg):
        model = _model()
        model.compile(keras.optimizers.SGD(0.2), "mse")
        history = model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0,
                            callbacks=[gw.GradientMonitor(log_dir=str(tmp_path / str(clip_arg)),
                                                          clip=clip_arg)])
        return history.history["loss"][-1], gw.read_windows(str(tmp_path / str(clip_arg)))

    loss_plain, windows_plain = train(None)
    loss_clipped, windows_clipped = train(1.0)
    assert not np.isfinite(loss_plain) or loss_plain > 1e6
    assert windows_plain.global_l2_max.max() > 1e3 or windows_plain.nonfinite_steps.sum() > 0
    assert np.isfinite(loss_clipped) and loss_clipped < 10.0
    assert windows_clipped.clip_fraction.iloc[0] > 0
