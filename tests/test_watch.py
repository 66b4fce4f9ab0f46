"""Watch in custom training loops, with Keras models and raw tf.Variables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import np_stats

import gradwatch as gw


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="relu", name="h"),
            keras.layers.Dense(1, name="o"),
        ]
    )


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x.sum(axis=1, keepdims=True) * 0.3).astype("float32")


@pytest.mark.parametrize("in_function", [True, False])
def test_custom_loop_stats_equal_plain_tape(log_dir, in_function):
    model = _model()
    optimizer = keras.optimizers.SGD(0.05)
    watch = gw.Watch(log_dir=log_dir, log_every=2, model=model)
    x, y = _data()
    reference = []

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        observed = watch.observe(grads, model.trainable_variables, loss=loss)
        optimizer.apply_gradients(zip(observed, model.trainable_variables))
        return grads, loss

    run = tf.function(step) if in_function else step
    for i in range(5):
        grads, loss = run(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8])
        reference.append(([np_stats(g.numpy()) for g in grads], float(loss)))
        watch.step_end()
    watch.close()
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [2, 4, 5] and list(windows.steps) == [2, 2, 1]
    stats = gw.read_stats(log_dir)
    for window in windows.itertuples():
        steps = reference[window.step - window.steps : window.step]
        rows = stats[stats.step == window.step]
        for k, row in enumerate(rows.itertuples()):
            assert row.l2 == pytest.approx(steps[-1][0][k]["l2"], rel=1e-5)
            assert row.l2_max == pytest.approx(max(s[0][k]["l2"] for s in steps), rel=1e-5)
            assert row.mean_abs == pytest.approx(steps[0][0][k]["mean_abs"], rel=1e-5)
        assert window.loss == pytest.approx(np.mean([s[1] for s in steps]), rel=1e-5)
    assert list(stats.layer.unique()) == ["h", "o"]
    assert gw.read_run(log_dir)["layers"][0]["activation"] == "relu"


def test_raw_variables_none_gradients_and_names(log_dir):
    w = tf.Variable([1.0, -2.0], name="w")
    b = tf.Variable(0.5, name="b")
    unused = tf.Variable([3.0, 3.0, 3.0], name="unused")
    variables = [w, b, unused]
    with gw.Watch(log_dir=log_dir, log_every=1) as watch:

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(w * w) + 3.0 * b
            grads = tape.gradient(loss, variables)
            grads = watch.observe(grads, variables)
            w.assign_sub(0.1 * grads[0])
            b.assign_sub(0.1 * grads[1])
            return grads

        grads = step()
        assert grads[2] is None
        watch.step_end()
    stats = gw.read_stats(log_dir).set_index("variable")
    assert list(stats.index) == ["w", "b", "unused"]
    assert stats.loc["w"].l2 == pytest.approx(np.linalg.norm([2.0, -4.0]))
    assert stats.loc["b"].l2 == pytest.approx(3.0)
    assert stats.loc["unused"].grad_steps == 0
    assert np.isnan(stats.loc["unused"].l2)
    windows = gw.read_windows(log_dir)
    assert windows.global_l2.iloc[0] == pytest.approx(np.sqrt(4 + 16 + 9))


@pytest.mark.fast
def test_every_op_observe_adds_is_named_under_gradwatch(log_dir):
    # a profile, a graph view or an XLA dump tells gradwatch's ops from the model's
    model = _model()
    optimizer = keras.optimizers.SGD(0.05)  # one, built: both steps name its ops alike
    optimizer.build(model.trainable_variables)
    x, y = _data()

    def graph_of(watch):
        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
            grads = tape.gradient(loss, model.trainable_variables)
            if watch is not None:
                grads = watch.observe(grads, model.trainable_variables, loss=loss)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        graph = step.get_concrete_function(x[:8], y[:8]).graph
        return {op.name for op in graph.get_operations()}

    plain = graph_of(None)
    with gw.Watch(log_dir=log_dir, log_every=2, model=model) as watch:
        watched = graph_of(watch)
    added = watched - plain
    assert len(added) > 50
    assert [name for name in added if not name.startswith("gradwatch/")] == []
    scopes = {name.split("/")[1] for name in added}
    assert {"measure", "units", "updates", "histograms"} <= scopes


@pytest.mark.fast
def test_names_argument_groups_layers(log_dir):
    a = tf.Variable(np.ones((2, 2), "float32"))
    b = tf.Variable(np.ones(2, "float32"))
    with gw.Watch(log_dir=log_dir, log_every=1, names=["block/a", "block/b"]) as watch:
        grads = watch.observe([tf.ones((2, 2)), tf.fill([2], 2.0)], [a, b])
        watch.step_end()
    layers = gw.read_stats(log_dir, level="layer")
    assert list(layers.layer) == ["block"]
    assert layers.l2.iloc[0] == pytest.approx(np.sqrt(4 + 8))
    assert layers.variable.iloc[0] == "*"
    assert len(grads) == 2


def test_names_length_mismatch_is_a_clear_error(log_dir):
    watch = gw.Watch(log_dir=log_dir, names=["only_one"])
    with pytest.raises(ValueError, match="names has 1 entries but observe\\(\\) got 2"):
        watch.observe([tf.ones(1), tf.ones(1)], [tf.Variable([1.0]), tf.Variable([2.0])])


class _ByIdentity(Mapping):
    """A mapping keyed by identity: variables are unhashable, so a dict cannot hold them."""

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def __getitem__(self, key):
        return next(name for k, name in self._pairs if k is key)

    def __iter__(self):
        return (k for k, _ in self._pairs)

    def __len__(self):
        return len(self._pairs)


def _observe_once(log_dir, variables, **kwargs):
    """One eager step of loss = sum(v * v) per variable; returns the stats rows by variable."""
    with gw.Watch(log_dir=log_dir, log_every=1, **kwargs) as watch:
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * v) for v in variables])
        watch.observe(tape.gradient(loss, variables), variables)
        watch.step_end()
    return gw.read_stats(log_dir).set_index("variable")


@pytest.mark.fast
def test_names_mapping_keys_by_ref_tf_variable_or_keras_variable(log_dir):
    a = tf.Variable([3.0, 4.0], name="a")
    b = tf.Variable([1.0], name="b")
    unnamed = tf.Variable([2.0], name="unnamed")
    model = _model()
    kernel, bias = model.get_layer("h").kernel, model.get_layer("h").bias
    # keys: a tf.Variable's .ref(), the tf.Variable itself (in a mapping that can hold
    # it), a Keras variable, the tf.Variable a Keras variable holds; unmapped variables
    # keep their own names
    names = _ByIdentity([(a.ref(), "raw/a"), (b, "raw/b"), (kernel, "enc/w"), (bias.value.ref(), "enc/b")])
    stats = _observe_once(log_dir, [a, b, unnamed, kernel, bias], names=names)
    assert list(stats.index) == ["raw/a", "raw/b", "unnamed", "enc/w", "enc/b"]
    assert list(stats.layer) == ["raw", "raw", "unnamed", "enc", "enc"]
    for name, variable in zip(stats.index, [a, b, unnamed, kernel, bias]):
        assert stats.loc[name, "l2"] == pytest.approx(2.0 * np.linalg.norm(variable.numpy()), rel=1e-6), name


@pytest.mark.fast
def test_names_mapping_keys_that_match_nothing_are_named(log_dir):
    a, stray = tf.Variable([1.0], name="a"), tf.Variable([2.0], name="stray")
    watch = gw.Watch(log_dir=log_dir, names={a.ref(): "x/a", stray.ref(): "x/stray"})
    with pytest.raises(ValueError, match=r"names has keys that match none of the 1 variables .*\['stray'\]"):
        watch.observe([tf.ones(1)], [a])
    watch.close()
    other = tf.Variable([3.0], name="other")
    watch = gw.Watch(log_dir=log_dir, names={a.ref(): "other"})
    with pytest.raises(ValueError, match=r"names gives \['other'\], the own name of another variable"):
        watch.observe([tf.ones(1), tf.ones(1)], [a, other])
    watch.close()


_A_VARIABLE = tf.Variable([1.0], name="v")


@pytest.mark.fast
@pytest.mark.parametrize("kwargs, error, match", [
    ({"names": [1, 2]}, TypeError, r"names must give each variable a str name; received 1 \(int\)"),
    ({"names": ["a", None]}, TypeError, r"received None \(NoneType\) as names\[1\]"),
    ({"names": [""]}, ValueError, r"names must be non-empty, .*; received '' as names\[0\]"),
    ({"names": ["ok", "/w"]}, ValueError, r"received '/w' as names\[1\]"),
    ({"names": ["a//b"]}, ValueError, r"received 'a//b' as names\[0\]"),
    ({"names": ["*"]}, ValueError, r"received '\*' as names\[0\]"),
    ({"names": ["x/w", "y", "x/w", "y"]}, ValueError, r"names must be distinct; \['x/w', 'y'\] appear more"),
    ({"names": "w"}, TypeError, r"names must be a list of str .*received 'w' \(str\)"),
    ({"names": 3}, TypeError, r"names must be a list of str .*received 3 \(int\)"),
    ({"names": {"v": "x"}}, TypeError, r"names must map variables to names; received the key 'v' \(str\)"),
    ({"names": {_A_VARIABLE.ref(): 3}}, TypeError, r"received 3 \(int\) as the name of variable 'v'"),
    ({"names": {_A_VARIABLE.ref(): ""}}, ValueError, r"received '' as the name of variable 'v'"),
    ({"names": _ByIdentity([(_A_VARIABLE, "x"), (_A_VARIABLE.ref(), "y")])}, ValueError,
     r"names gives variable 'v' two names"),
    ({"model": 1}, TypeError, r"model must be the Keras model .*received 1 \(int\)"),
    ({"model": "mlp"}, TypeError, r"model must be the Keras model .*received 'mlp' \(str\)"),
], ids=["ints", "none", "empty", "empty-layer", "empty-part", "star", "repeated", "one-str", "int",
        "str-key", "int-name", "empty-mapped", "named-twice", "model-int", "model-str"])
def test_bad_names_and_model_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        gw.Watch(log_dir=None, **kwargs)


@pytest.mark.fast
def test_other_variables_later_are_a_clear_error(log_dir):
    watch = gw.Watch(log_dir=None)
    watch.observe([tf.ones(1)], [tf.Variable([1.0])])
    with pytest.raises(ValueError, match="not among the 1 variables"):
        watch.observe([tf.ones(1)], [tf.Variable([1.0])])


@pytest.mark.fast
def test_in_memory_watch_writes_no_files(tmp_path):
    os.chdir(tmp_path)
    v = tf.Variable([3.0, 4.0])
    watch = gw.Watch(log_dir=None, log_every=1)
    watch.observe([tf.constant([3.0, 4.0])], [v])
    row = watch.step_end()
    assert row["global_l2"] == pytest.approx(5.0)
    assert os.listdir(tmp_path) == []


def test_append_continues_steps(log_dir):
    v = tf.Variable([1.0])
    for _ in range(2):
        with gw.Watch(log_dir=log_dir, log_every=2, append=True) as watch:
            for _ in range(4):
                watch.observe([tf.constant([1.0])], [v])
                watch.step_end()
    assert list(gw.read_windows(log_dir).step) == [2, 4, 6, 8]


def _other_backend():
    import importlib.util

    for backend in ("torch", "jax"):
        if importlib.util.find_spec(backend) is not None:
            return backend
    pytest.skip("neither torch nor jax is installed: no other Keras backend to try")


def test_other_keras_backend_is_a_clear_error(tmp_path):
    backend = _other_backend()
    code = (
        "import keras, gradwatch as gw\n"
        "try:\n    gw.Watch(log_dir=None)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout and f"'{backend}' backend" in out.stdout, out.stderr[-2000:]


def test_inexact_cheap_norms_take_the_full_path_on_any_step(log_dir):
    """Step 2 is not the window's sampled step, yet NaN/Inf, tiny and huge
    gradients there are still counted and measured exactly."""
    variables = [tf.Variable(np.zeros(4, "float32")) for _ in range(3)]
    normal = [tf.constant([1.0, 2.0, 2.0, 0.0])] * 3
    odd = [
        tf.constant([np.nan, 3.0, np.inf, 4.0]),
        tf.constant([3e-21, 4e-21, 0.0, 0.0]),
        tf.constant([3e30, 4e30, 0.0, 0.0]),
    ]

    @tf.function
    def step(grads):
        return watch.observe(grads, variables)

    with gw.Watch(log_dir=log_dir, log_every=2, names=["a/nan", "a/tiny", "a/huge"]) as watch:
        for grads in (normal, odd):
            step(grads)
            watch.step_end()
    stats = gw.read_stats(log_dir).set_index("variable")
    assert stats.loc["a/nan"].nonfinite == 2
    assert stats.loc["a/nan"].l2 == pytest.approx(5.0)
    assert stats.loc["a/tiny"].l2 == pytest.approx(5e-21, rel=1e-5)
    assert stats.loc["a/huge"].l2 == pytest.approx(5e30, rel=1e-5)
    assert stats.loc["a/huge"].l2_min == pytest.approx(3.0)
    window = gw.read_windows(log_dir).iloc[0]
    assert window.nonfinite_steps == 1 and window.first_nonfinite_step == 2


@pytest.mark.parametrize("jit_compile", [False, True])
def test_zero_gradients_are_exact_without_the_full_pass_and_tiny_ones_still_take_it(log_dir, jit_compile):
    """An all-zero gradient (a dead layer) has an inexact-looking sum of squares of 0;
    two reductions settle it, but a gradient whose squares underflow to 0 (1e-30, also
    a lone negative one, which the max alone would call zero) still gets the careful
    norm. Every window's l2 columns and its sampled step's statistics against numpy,
    in a graph step and in an XLA one (the careful passes compiled with the step)."""
    zero = np.zeros(4, "float32")
    normal = np.array([1.0, -2.0, 2.0, 0.0], "float32")
    underflow = np.array([-1e-30, 0.0, 0.0, 0.0], "float32")
    underflows = np.array([1e-30, 1e-30, 0.0, 0.0], "float32")
    steps = [  # (a, b, c); windows of 3 steps, each first step sampled
        (normal, normal, normal), (zero, normal, normal), (zero, underflow, normal),
        (zero, normal, normal), (zero, normal, underflows), (zero, zero, normal),
        (zero, zero, normal), (zero, normal, zero), (zero, normal, normal),
    ]
    assert float(np.sum(underflow.astype("float32") ** 2)) == 0.0  # the case this is about
    names = ["a/a", "b/b", "c/c"]
    variables = [tf.Variable(zero) for _ in names]

    @tf.function(jit_compile=jit_compile)
    def step(grads):
        return watch.observe(grads, variables)

    with gw.Watch(log_dir=log_dir, log_every=3, names=names) as watch:
        for grads in steps:
            step([tf.constant(g) for g in grads])
            watch.step_end()
    stats = gw.read_stats(log_dir)
    assert len(stats) == 3 * len(names)
    for k, name in enumerate(names):
        rows = stats[stats.variable == name].sort_values("step")
        for w, row in enumerate(rows.itertuples()):
            window = [np_stats(grads[k]) for grads in steps[3 * w:3 * w + 3]]
            l2 = [s["l2"] for s in window]
            assert row.l2 == pytest.approx(l2[-1], rel=1e-6, abs=0.0), (name, w)
            assert row.l2_min == pytest.approx(min(l2), rel=1e-6, abs=0.0), (name, w)
            assert row.l2_max == pytest.approx(max(l2), rel=1e-6, abs=0.0), (name, w)
            for field in ("max_abs", "mean_abs", "zero_frac"):
                expected = window[0][field]
                assert getattr(row, field) == pytest.approx(expected, rel=1e-6, abs=0.0), (name, w, field)
            assert row.nonfinite == 0


def test_steps_beyond_the_buffer_fold_in_step_and_stay_exact(log_dir):
    # Steps only write a buffer row; with no host read for more steps than the buffer
    # holds (16 rows at log_every=2), the buffer is folded in-step. A 40-step loop
    # inside one tf.function, then one read: the window equals a tape replay.
    model = _model(seed=3)
    optimizer = keras.optimizers.SGD(0.05)
    watch = gw.Watch(log_dir=log_dir, log_every=2, model=model)
    x, y = _data(n=8 * 40, seed=3)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    @tf.function
    def train():
        losses = tf.TensorArray(tf.float32, size=40)
        norms = tf.TensorArray(tf.float32, size=40)
        k = 0
        for xb, yb in batches:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
            grads = tape.gradient(loss, model.trainable_variables)
            observed = watch.observe(grads, model.trainable_variables, loss=loss)
            optimizer.apply_gradients(zip(observed, model.trainable_variables))
            losses = losses.write(k, loss)
            norms = norms.write(k, tf.stack([tf.norm(g) for g in grads]))
            k += 1
        return losses.stack(), norms.stack()

    losses, norms = train()
    watch.close()
    norms = norms.numpy().astype(np.float64)
    windows = gw.read_windows(log_dir)
    assert list(windows.steps) == [40] and list(windows.step) == [40]
    assert windows.loss.iloc[0] == pytest.approx(float(np.mean(losses.numpy())), rel=1e-5)
    stats = gw.read_stats(log_dir)
    assert len(stats) == norms.shape[1]
    for k, row in enumerate(stats.itertuples()):
        assert row.grad_steps == 40
        assert row.l2 == pytest.approx(norms[-1, k], rel=1e-5)
        assert row.l2_max == pytest.approx(norms[:, k].max(), rel=1e-5)
        assert row.l2_min == pytest.approx(norms[:, k].min(), rel=1e-5)
        assert row.l2_mean == pytest.approx(norms[:, k].mean(), rel=1e-5)
