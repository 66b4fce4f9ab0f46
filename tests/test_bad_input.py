"""Bad input through the public API, with real TensorFlow/Keras.

Chosen behaviours:
- An integer (non-float) variable among the ones passed to ``Watch.observe`` is a clear
  ``TypeError`` naming it: no gradient can exist for it, so counting it as "no gradient"
  (a disconnected variable) would be a false alert. Leave it out of ``observe``.
- Variables passed to ``observe`` after the first step that were not passed on the first
  step: ``ValueError`` naming the new variable (the watched set is fixed at the first step).
- An optimizer whose slots are built lazily (Adam) under ``model.fit``: just works.
- An empty dataset: no error from gradwatch, a warning that no step was observed, and the
  files hold headers only (readable, empty).
- NaN from the first batch: the alert is at step 1; ``skip_step`` leaves the weights as
  if that batch had not been seen.
- ``log_dir`` that is a file: ``ValueError`` naming it.
- ``log_every`` larger than the number of steps: the partial window is written at the end.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras  # noqa: E402
from conftest import np_stats, tape_gradients  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._internal_options import InternalOptions  # noqa: E402
from gradwatch._interpret import probe_layout  # noqa: E402


def _model(optimizer: str | keras.optimizers.Optimizer = "sgd", seed: int = 0) -> keras.Model:
    """The small model, compiled with mse (learning rate 0.1 for "sgd")."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="h"),
         keras.layers.Dense(1, name="o")]
    )
    model.compile(keras.optimizers.SGD(0.1) if optimizer == "sgd" else optimizer, "mse")
    return model


def _data(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def _sgd_replay(model: keras.Model, batches, learning_rate: float) -> list[dict[str, dict]]:
    """Per-step reference stats keyed like gradwatch's variable names; trains ``model``."""
    steps = []
    for x, y in batches:
        grads, _ = tape_gradients(model, x, y)
        steps.append({"/".join(v.path.split("/")[-2:]): np_stats(g)
                      for v, g in zip(model.trainable_variables, grads)})
        for v, g in zip(model.trainable_variables, grads):
            v.assign(v.numpy() - learning_rate * g)
    return steps


@pytest.mark.fast
def test_integer_variable_in_watch_is_a_clear_error(log_dir):
    w = tf.Variable(tf.ones([3, 2]), name="w")
    count = tf.Variable([1, 2], dtype=tf.int32, name="count")
    watch = gw.Watch(log_dir=log_dir, log_every=1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.ones([4, 3]) @ w) + tf.cast(tf.reduce_sum(count), tf.float32)
    grads = tape.gradient(loss, [w, count])
    with pytest.raises(TypeError, match=r"'count'.*int32.*floating") as info:
        watch.observe(grads, [w, count])
    assert "Leave it out" in str(info.value)
    # The float variable alone is watched normally.
    watch.observe(grads[:1], [w])
    watch.close()
    stats = gw.read_stats(log_dir)
    assert list(stats.variable) == ["w"]
    assert stats.l2.iloc[0] == pytest.approx(np_stats(grads[0].numpy())["l2"], rel=1e-6)


@pytest.mark.fast
def test_variable_added_after_the_first_step_is_named(log_dir):
    w = tf.Variable(tf.ones([3, 2]), name="w")
    late = tf.Variable(tf.ones([2]), name="late_bias")
    watch = gw.Watch(log_dir=log_dir, log_every=2)
    x = tf.ones([4, 3])

    @tf.function
    def step(variables):
        with tf.GradientTape() as tape:
            out = x @ variables[0]
            if len(variables) > 1:
                out = out + variables[1]
            loss = tf.reduce_mean(tf.square(out))
        grads = tape.gradient(loss, variables)
        return watch.observe(grads, variables, loss=loss)

    for _ in range(4):
        step([w])
        watch.step_end()
    with pytest.raises(ValueError, match=r"'late_bias'.*not among the 1 variables"):
        step([w, late])
    watch.close()
    assert list(gw.read_windows(log_dir).step) == [2, 4]


def test_adam_slots_built_lazily_under_fit(log_dir):
    x, y = _data()
    model, reference = _model(keras.optimizers.Adam(0.01)), _model(keras.optimizers.Adam(0.01))
    reference.set_weights(model.get_weights())
    grads0, _ = tape_gradients(model, x[:4], y[:4])
    assert not model.optimizer.built
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    reference.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    stats = gw.read_stats(log_dir)
    assert sorted(set(stats.step)) == [1, 2, 3]
    first = stats[stats.step == 1].set_index("variable")
    for v, g in zip(model.trainable_variables, grads0):
        name = "/".join(v.path.split("/")[-2:])
        assert first.loc[name, "l2"] == pytest.approx(np_stats(g)["l2"], rel=1e-5)


def test_empty_dataset_warns_and_leaves_header_only_files(log_dir):
    model = _model()
    empty = tf.data.Dataset.from_tensor_slices(
        (np.zeros((0, 4), "float32"), np.zeros((0, 1), "float32"))
    ).batch(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(empty, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir)])
    messages = [str(w.message) for w in caught]
    assert any("GradientMonitor observed no training step" in m for m in messages), messages
    assert gw.read_windows(log_dir).empty and gw.read_stats(log_dir).empty
    assert gw.read_alerts(log_dir).empty
    for name in ("windows.csv", "stats.csv", "layers.csv", "alerts.csv"):
        with open(os.path.join(log_dir, name)) as f:
            assert len(f.read().splitlines()) == 1, f"{name}: header only"
    # The model is left as it was found: a second fit without gradwatch trains normally.
    x, y = _data(4)
    before = model.get_weights()
    model.fit(x, y, batch_size=4, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_unknown_cardinality_dataset_is_watched_over_every_epoch(log_dir):
    """Keras ends each epoch of such a dataset on OutOfRange: that is no failure."""
    x, y = _data(12)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(4)
    model = _model()
    reference = _model()
    reference.set_weights(model.get_weights())
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)] * 2
    expected = _sgd_replay(reference, batches, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(dataset, epochs=2, verbose=0, callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    stats = gw.read_stats(log_dir)
    assert sorted(set(stats.step)) == list(range(1, 7))
    for step, ref in enumerate(expected, start=1):
        rows = stats[stats.step == step].set_index("variable")
        for name, values in ref.items():
            assert rows.loc[name, "l2"] == pytest.approx(values["l2"], rel=1e-5), (step, name)


def test_nan_in_the_first_batch(log_dir):
    x, y = _data(12)
    x[1, 2] = np.nan
    model = _model()
    initial = model.get_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x[:4], y[:4], batch_size=4, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, on_nonfinite="skip_step")])
    for a, b in zip(model.get_weights(), initial):
        np.testing.assert_array_equal(a, b)
    alerts = gw.read_alerts(log_dir)
    assert list(alerts.kind) == ["nonfinite_gradient"] and list(alerts.step) == [1]
    assert alerts.severity.iloc[0] == "error"
    windows = gw.read_windows(log_dir)
    assert list(windows.first_nonfinite_step) == [1] and list(windows.skipped_steps) == [1]

    # Then two good batches: weights are those of training on the good batches only.
    log_dir2 = log_dir + "_2"
    model = _model()
    reference = _model()
    reference.set_weights(model.get_weights())
    _sgd_replay(reference, [(x[4:8], y[4:8]), (x[8:12], y[8:12])], 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir2, log_every=1, on_nonfinite="skip_step")])
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.isfinite(np.concatenate([w.ravel() for w in model.get_weights()])).all()
    alerts = gw.read_alerts(log_dir2)
    assert list(zip(alerts.step, alerts.severity)) == [(1, "error"), (2, "info")]
    assert "step 1" in alerts.message.iloc[0]


@pytest.mark.fast
def test_log_dir_that_is_a_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    for front in (gw.GradientMonitor, gw.Watch):
        with pytest.raises(ValueError, match=r"log_dir must be a directory.*not_a_dir.*is a file"):
            front(log_dir=str(path))
    assert path.read_text() == "x"


def test_log_every_larger_than_the_run_writes_the_partial_window(log_dir):
    x, y = _data(12)
    model = _model()
    reference = _model()
    reference.set_weights(model.get_weights())
    expected = _sgd_replay(reference, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)], 0.1)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=50)])
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [3] and list(windows.steps) == [3]
    stats = gw.read_stats(log_dir).set_index("variable")
    for name in expected[0]:
        norms = [step[name]["l2"] for step in expected]
        assert stats.loc[name, "l2"] == pytest.approx(norms[-1], rel=1e-5)
        assert stats.loc[name, "l2_max"] == pytest.approx(max(norms), rel=1e-5)
        assert stats.loc[name, "l2_min"] == pytest.approx(min(norms), rel=1e-5)
        assert stats.loc[name, "l2_mean"] == pytest.approx(np.mean(norms), rel=1e-5)
        # max_abs is of the window's first step
        assert stats.loc[name, "max_abs"] == pytest.approx(expected[0][name]["max_abs"], rel=1e-5)


# ------------------------------------------------------------ bounded resources


@pytest.mark.fast
@pytest.mark.parametrize("build, argument, bound", [
    (lambda: gw.GradientMonitor(log_dir=None, log_every=10**18), "log_every", "1,000,000,000"),
    (lambda: gw.Watch(log_dir=None, log_every=10**9 + 1), "log_every", "1,000,000,000"),
    (lambda: gw.Watch(log_dir=None, histogram_every=10**18), "histogram_every", "1,000,000,000"),
    (lambda: gw.GradientMonitor(log_dir=None, histogram_every=2**63), "histogram_every", "1,000,000,000"),
    (lambda: gw.clip.Percentile(history=10**9), "history", "1,000,000"),
    (lambda: gw.Watch(log_dir=None, clip=gw.clip.Chain(gw.clip.Percentile(history=10**7))),
     "history", "1,000,000"),
    (lambda: gw.Thresholds(dead_steps=10**18), "dead_steps", "1,000,000,000"),
    (lambda: gw.Thresholds(update_cos_window=2**64), "update_cos_window", "1,000,000,000"),
], ids=["monitor-log_every", "watch-log_every", "watch-histogram_every", "monitor-histogram_every",
        "percentile-history", "chained-percentile-history", "dead_steps", "update_cos_window"])
def test_counts_that_cannot_work_are_refused_at_construction(build, argument, bound):
    # each says the argument, its range and the value received
    pattern = rf"{argument} must be an int from [01] to {bound}"
    with pytest.raises((TypeError, ValueError), match=pattern) as info:
        build()
    assert "received" in str(info.value)


def _step_buffer_rows(function) -> int:
    """The rows of the step buffer a traced function writes (found by its variable name)."""
    graph = function.get_concrete_function().graph
    rows = [v for v in graph.variables if v.name.startswith("gradwatch_step_rows")]
    assert len(rows) == 1
    return int(rows[0].shape[0])


@pytest.mark.fast
def test_step_buffer_does_not_grow_with_log_every(log_dir):
    # a window far longer than the buffer folds in-step every 256 steps: memory is fixed
    w = tf.Variable(tf.ones([3, 2]), name="w")
    watch = gw.Watch(log_dir=None, log_every=100_000)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.ones([4, 3]) @ w)
        return watch.observe(tape.gradient(loss, [w]), [w])

    step()
    assert _step_buffer_rows(step) == 256
    watch.close()


def test_lean_fit_with_a_window_longer_than_the_buffer(log_dir):
    # log_every beyond the 256-row buffer: every 256th step since the read is a full
    # step that folds the buffer, the steps between stay lean, and the window is exact
    steps, batch = 300, 2
    x, y = _data(steps * batch)
    model = _model()
    reference = _model()
    reference.set_weights(model.get_weights())
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    expected = _sgd_replay(reference, batches, 0.1)
    kinds = []
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=1000, histogram_every=0,
                                 internal=InternalOptions(lean_min_steps=0, lean_break_even=False,
                                                          on_step_kind=kinds.append))
    model.fit(x, y, batch_size=batch, shuffle=False, verbose=0, callbacks=[monitor])
    assert len(kinds) == steps
    full = [k + 1 for k, lean in enumerate(kinds) if not lean]
    # the window's first step, the update snapshots (dense early, then 51, 101, ...) and
    # step 256 (a full buffer)
    assert 256 in full and 257 not in full and 255 not in full
    assert set(full) <= {1, 256} | {s for s in range(1, steps + 1) if probe_layout.snapshot_due(s)}
    windows = gw.read_windows(log_dir)
    assert list(windows.steps) == [steps]
    stats = gw.read_stats(log_dir).set_index("variable")
    for name in expected[0]:
        norms = [s[name]["l2"] for s in expected]
        assert stats.loc[name, "grad_steps"] == steps
        assert stats.loc[name, "l2"] == pytest.approx(norms[-1], rel=1e-4)
        assert stats.loc[name, "l2_max"] == pytest.approx(max(norms), rel=1e-4)
        assert stats.loc[name, "l2_min"] == pytest.approx(min(norms), rel=1e-4)
        assert stats.loc[name, "l2_mean"] == pytest.approx(np.mean(norms), rel=1e-4)


# ------------------------------------------------------- every bad value, by argument


class _Opaque:
    pass


_A_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
_V = tf.Variable([1.0], name="v")
_NAN, _INF = float("nan"), float("inf")
# argument -> values no front can use; each must be refused when the front is made
FRONT_BAD_VALUES = {
    "log_dir": [3, 3.5, b"runs", ["a"], True, _Opaque(), "", _A_FILE, os.path.join(_A_FILE, "sub"), "a\x00b"],
    "log_every": [0, -1, 2.5, "10", None, True, 10**18, _NAN, [10]],
    "histogram_every": [-1, 2.5, "100", None, True, 10**18, _INF],
    "clip": ["1.0", -1, 0, _NAN, _INF, True, [1.0], _Opaque(), gw.clip.GlobalNorm, print],
    "on_nonfinite": ["WARN", "", None, 1, "skip", ["warn"]],
    "append": ["yes", 1, None, "False", 0.0],
    "thresholds": [{}, {"patience": 3}, 1, "x", gw.Thresholds],
    "signed_histograms": ["yes", 1, None],
    "on_alert": [1, "print", []],
    "internal": [1, "x", {}],
}
ONLY = {
    "GradientMonitor": {"activation_probe": ["yes", 1, None]},
    "Watch": {"names": [[1, 2], [""], ["a", "a"], "w", 3, {"v": "x"}, ["/w"], {_V.ref(): ""}],
              "model": [1, "m", _Opaque()]},
}
_NUMBER_BAD = [0, -1, _NAN, _INF, "1", None, True]
CLIP_BAD_VALUES = {
    **{f"{name}(max_norm)": (getattr(gw.clip, name), "max_norm", _NUMBER_BAD)
       for name in ("GlobalNorm", "PerVariableNorm")},
    "Value(limit)": (gw.clip.Value, "limit", _NUMBER_BAD),
    "Adaptive(clipping)": (gw.clip.Adaptive, "clipping", _NUMBER_BAD),
    "Adaptive(eps)": (gw.clip.Adaptive, "eps", _NUMBER_BAD),
    "Percentile(p)": (gw.clip.Percentile, "p", [0, 101, _NAN, "10", None]),
    "Percentile(history)": (gw.clip.Percentile, "history", [0, -1, 2.5, True, 10**9, "1000"]),
    "Thresholds(vanishing_rms)": (gw.Thresholds, "vanishing_rms", [0, -1, _NAN, _INF, "x", True]),
    "Thresholds(patience)": (gw.Thresholds, "patience", [0, -1, 2.5, True, 10**18]),
}


def _cases():
    for front in ("GradientMonitor", "Watch"):
        for argument, values in {**FRONT_BAD_VALUES, **ONLY[front]}.items():
            for k, value in enumerate(values):
                yield pytest.param(front, argument, value, id=f"{front}-{argument}-{k}")
    for label, (_, argument, values) in CLIP_BAD_VALUES.items():
        for k, value in enumerate(values):
            yield pytest.param(label, argument, value, id=f"{label}-{k}")


def _says_value(message: str, value) -> bool:
    shown = [value] + (list(value) if isinstance(value, list) else [])
    return "received" in message or any(repr(v) in message for v in shown)


@pytest.mark.fast
@pytest.mark.parametrize("maker, argument, value", list(_cases()))
def test_every_bad_value_is_refused_when_made_naming_the_argument(maker, argument, value):
    if maker in ("GradientMonitor", "Watch"):
        kwargs = {argument: value} if argument == "log_dir" else {"log_dir": None, argument: value}
        make = lambda: getattr(gw, maker)(**kwargs)  # noqa: E731
    else:
        make = lambda: CLIP_BAD_VALUES[maker][0](**{argument: value})  # noqa: E731
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    message = str(info.value)
    assert argument in message and _says_value(message, value), message
    assert not os.path.exists(os.path.join(_A_FILE, "sub"))


@pytest.mark.fast
def test_chain_and_numpy_counts():
    with pytest.raises(ValueError, match="Chain needs at least one clip transform; received none"):
        gw.clip.Chain()
    with pytest.raises(TypeError, match=r"clip must be None, a positive number .*received 'x'"):
        gw.clip.Chain(1.0, "x")
    # a numpy integer is an int
    assert gw.Watch(log_dir=None, log_every=np.int64(7)).options.log_every == 7
