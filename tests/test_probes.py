"""The in-graph probes against independent numpy/GradientTape computations:
log10|g| histograms, update/weight ratio and direction, dead and silent units."""

from __future__ import annotations

import glob
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ResultsSink

import gradwatch as gw
from gradwatch._capture import probes
from gradwatch._interpret import probe_layout


def _data(n=320, features=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32")
    return x, y


def _replay(model, x, y, batch, lr, steps):
    """Plain SGD by hand: (weights before each step, gradients of each step), as numpy."""
    weights, grads = [], []
    loss_fn = keras.losses.BinaryCrossentropy()
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        weights.append([v.numpy().copy() for v in model.trainable_variables])
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        g = tape.gradient(loss, model.trainable_variables)
        grads.append([t.numpy() for t in g])
        for v, t in zip(model.trainable_variables, g):
            v.assign_sub(lr * t)
    return weights, grads


def _model(seed=0, bias=None, features=12):
    keras.utils.set_random_seed(seed)
    kwargs = {} if bias is None else {"bias_initializer": keras.initializers.Constant(bias)}
    return keras.Sequential([
        keras.Input((features,)),
        keras.layers.Dense(8, activation="relu", name="hidden", **kwargs),
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ])


def _fit(model, log_dir, x, y, lr=0.1, batch=32, optimizer=None, compile_args=None, **monitor):
    model.compile(optimizer or keras.optimizers.SGD(lr), "binary_crossentropy", **(compile_args or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir, **monitor)])


def _histograms(log_dir, prefix):
    from gradwatch._sinks.tb_tags import tag_layer

    out = {}
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith(prefix):  # <prefix><NN>_<layer>
                    out[(event.step, tag_layer(value.tag, prefix))] = tf.make_ndarray(value.tensor)
    return out


def test_log10_histogram_counts_match_numpy(tmp_path):
    x, y = _data()
    reference = _model()
    _, grads = _replay(reference, x, y, 32, 0.1, 10)
    model = _model()
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, log_every=5, histogram_every=5, signed_histograms=True)
    hist = _histograms(log_dir, "gradwatch/grad_log10_abs/")
    assert sorted(hist) == [(5, "hidden"), (5, "out"), (10, "hidden"), (10, "out")]
    for (step, layer), tensor in hist.items():
        index = [0, 1] if layer == "hidden" else [2, 3]
        g = np.concatenate([grads[step - 1][i].ravel() for i in index]).astype(np.float64)
        nonzero = np.abs(g[g != 0])
        bucket = np.clip(np.floor((np.log10(nonzero) - probes.LOG10_LOW) * probes.PER_DECADE), 0,
                         probes.NUM_LOG_BUCKETS - 1).astype(int)
        expected = np.bincount(bucket, minlength=probes.NUM_LOG_BUCKETS)
        left = np.round((tensor[:, 0] - probes.LOG10_LOW) * probes.PER_DECADE).astype(int)
        got = np.zeros(probes.NUM_LOG_BUCKETS)
        got[left] = tensor[:, 2]
        # float32 vs float64 log10 may move a value sitting on a bucket edge by one bucket
        assert np.abs(got - expected).sum() <= 2, (step, layer)
        assert got.sum() == nonzero.size
        assert np.allclose(np.diff(tensor[:, 0]), 1.0 / probes.PER_DECADE)
    signed = _histograms(log_dir, "gradwatch/grad_values/")
    tensor = signed[(10, "out")]
    g = np.concatenate([grads[9][2].ravel(), grads[9][3].ravel()])
    assert tensor[:, 2].sum() == g.size
    assert tensor[-1, 1] == pytest.approx(np.abs(g).max(), rel=1e-5)
    assert tensor[0, 0] == pytest.approx(-np.abs(g).max(), rel=1e-5)


def test_update_ratio_and_direction_match_a_replay(tmp_path):
    x, y = _data()
    weights, grads = _replay(_model(), x, y, 32, 0.1, 10)
    model = _model()
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, log_every=5, histogram_every=0)
    stats = gw.read_stats(log_dir)
    # window 1 = steps 1..5: snapshot before step 1, ratio after step 1
    for k, name in enumerate(("hidden/kernel", "hidden/bias", "out/kernel", "out/bias")):
        row = stats[(stats.step == 5) & (stats.variable == name)].iloc[0]
        w0 = weights[0][k]
        if np.linalg.norm(w0) > 0:
            expected = np.linalg.norm(weights[1][k] - w0) / np.linalg.norm(w0)
            assert row.update_ratio == pytest.approx(expected, rel=1e-4), name
        else:
            assert np.isnan(row.update_ratio), name  # zero-initialised bias: no ratio
        # SGD moves exactly along -sum(g) over the probe's steps: cosine 1
        assert row.update_cos == pytest.approx(1.0, abs=1e-5), name
    layers = gw.read_stats(log_dir, level="layer")
    hidden = layers[(layers.step == 5) & (layers.layer == "hidden")].iloc[0]
    kernel_ratio = np.linalg.norm(weights[1][0] - weights[0][0]) / np.linalg.norm(weights[0][0])
    assert hidden.update_ratio == pytest.approx(kernel_ratio, rel=1e-4)  # the layer's kernels


@pytest.mark.parametrize("features", [12, 2100])  # 2100 x 8: a kernel over STACK_LIMIT, measured alone
@pytest.mark.parametrize("jit", [False, True])
def test_update_direction_under_adam_is_the_cosine_with_the_snapshot_steps_gradient(tmp_path, jit, features):
    x, y = _data(features=features)
    # replay: the gradient of step 1 and Adam's first weight change, by a plain tape
    model = _model(features=features)
    optimizer = keras.optimizers.Adam(0.01)
    with tf.GradientTape() as tape:
        loss = keras.losses.BinaryCrossentropy()(y[:32], model(x[:32], training=True))
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    before = [v.numpy().copy() for v in model.trainable_variables]
    optimizer.apply(grads, model.trainable_variables)
    deltas = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
    log_dir = str(tmp_path / "run")
    _fit(_model(features=features), log_dir, x, y, optimizer=keras.optimizers.Adam(0.01),
         compile_args={"jit_compile": jit}, log_every=5, histogram_every=0)
    stats = gw.read_stats(log_dir)
    cosines = []
    for k, name in enumerate(("hidden/kernel", "hidden/bias", "out/kernel", "out/bias")):
        row = stats[(stats.step == 5) & (stats.variable == name)].iloc[0]
        d, g = deltas[k].ravel(), grads[k].ravel()
        expected = -d @ g / (np.linalg.norm(d) * np.linalg.norm(g))
        cosines.append(expected)
        assert row.update_cos == pytest.approx(expected, abs=1e-4), name
        if np.linalg.norm(before[k]) > 0:
            assert row.update_ratio == pytest.approx(
                np.linalg.norm(d) / np.linalg.norm(before[k]), rel=1e-4), name
    # Adam's first step is ~ -lr * sign(g): not parallel to -g, so the check has teeth
    assert min(cosines) < 0.95
    # measured again in the next windows: snapshots are dense early in a run (steps 1, 3, 5, 7, 9, ...)
    later = stats[(stats.step > 5) & (stats.step <= 10)]
    assert len(later) and later.update_cos.notna().all()


@pytest.mark.fast
def test_update_probe_under_steps_per_execution_measures_the_first_step(tmp_path):
    x, y = _data()
    weights, grads = _replay(_model(), x, y, 32, 0.1, 2)
    log_dir = str(tmp_path / "run")
    _fit(_model(), log_dir, x, y, compile_args={"steps_per_execution": 4}, log_every=8, histogram_every=0)
    stats = gw.read_stats(log_dir)
    row = stats[(stats.step == 8) & (stats.variable == "hidden/kernel")].iloc[0]
    # the snapshot is taken before the execution of steps 1-4; step 1's update is measured
    expected = np.linalg.norm(weights[1][0] - weights[0][0]) / np.linalg.norm(weights[0][0])
    assert row.update_ratio == pytest.approx(expected, rel=1e-4)
    assert row.update_cos == pytest.approx(1.0, abs=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize(("features", "width"), [
    (12, 1), (4200, 1),  # w 4200 x 4: over STACK_LIMIT, measured alone
    (4200, 5000),  # and v 4 x 5000 too: two large variables of different sizes, from one split
])
def test_watch_sees_a_manual_assign_sub_update(tmp_path, features, width):
    rng = np.random.default_rng(1)
    w = tf.Variable(rng.normal(size=(features, 4)).astype("float32"), name="w")
    v = tf.Variable((rng.normal(size=(4, width)) / np.sqrt(width)).astype("float32"), name="v")
    x, y = _data(features=features)
    # each variable moves by 1% of its norm along -g (manual SGD with its own step size):
    # a relative change well above float32's resolution for every shape here
    lr = 0.01
    before = [w.numpy().copy(), v.numpy().copy()]
    with gw.Watch(str(tmp_path / "loop"), log_every=4, histogram_every=0) as watch:
        for i in range(8):
            with tf.GradientTape() as tape:
                hidden = tf.nn.relu(x[i * 32:(i + 1) * 32] @ w)
                out = tf.sigmoid(tf.reduce_sum(hidden @ v, axis=1, keepdims=True))
                loss = tf.reduce_mean((out - y[i * 32:(i + 1) * 32]) ** 2)
            gw_, gv = watch.observe(tape.gradient(loss, [w, v]), [w, v])
            steps = [lr * np.linalg.norm(var.numpy()) / np.linalg.norm(g.numpy())
                     for var, g in ((w, gw_), (v, gv))]
            if i == 0:
                expected = [step * np.linalg.norm(g.numpy()) / np.linalg.norm(b)
                            for step, g, b in zip(steps, (gw_, gv), before)]
            w.assign_sub(steps[0] * gw_)
            v.assign_sub(steps[1] * gv)
            watch.step_end(float(loss))
    stats = gw.read_stats(str(tmp_path / "loop"))
    for name, ratio in zip(("w", "v"), expected):
        row = stats[(stats.step == 4) & (stats.variable == name)].iloc[0]
        assert row.update_ratio == pytest.approx(ratio, rel=1e-4), name
        assert row.update_cos == pytest.approx(1.0, abs=1e-5), name


@pytest.mark.parametrize("jit", [False, True])
def test_watch_update_measure_in_a_compiled_step_matches_numpy(tmp_path, jit):
    # Watch keeps the snapshot step's gradient as one flat vector, split again by the
    # change sums: a small variable in a size block, two large ones (4,200 x 4 and
    # 4 x 5,000) alone; compiled by XLA or not
    rng = np.random.default_rng(2)
    w = tf.Variable(rng.normal(size=(4200, 4)).astype("float32"), name="w")
    v = tf.Variable((rng.normal(size=(4, 5000)) / 70.0).astype("float32"), name="v")
    b = tf.Variable(rng.normal(size=(3,)).astype("float32"), name="b")
    x, y = _data(features=4200)
    lr = 0.05

    @tf.function(jit_compile=jit)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            hidden = tf.nn.relu(xb @ w)
            out = tf.sigmoid(tf.reduce_sum(hidden @ v, axis=1, keepdims=True) + tf.reduce_sum(b))
            loss = tf.reduce_mean((out - yb) ** 2)
        grads = watch.observe(tape.gradient(loss, [w, v, b]), [w, v, b])
        for var, g in zip((w, v, b), grads):
            var.assign_sub(lr * g)
        return grads

    before = [var.numpy().copy() for var in (w, v, b)]
    with gw.Watch(str(tmp_path / "loop"), log_every=4, histogram_every=0) as watch:
        for i in range(4):
            grads = step(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
            if i == 0:
                first = [g.numpy() for g in grads]
            watch.step_end()
    stats = gw.read_stats(str(tmp_path / "loop"))
    for name, g, w0 in zip(("w", "v", "b"), first, before):
        row = stats[(stats.step == 4) & (stats.variable == name)].iloc[0]
        # the step-1 snapshot's change, measured at step 2: lr times its gradient
        assert row.update_ratio == pytest.approx(lr * np.linalg.norm(g) / np.linalg.norm(w0), rel=1e-4), name
        assert row.update_cos == pytest.approx(1.0, abs=1e-5), name


def _half_dead(*middle):
    """A ReLU layer whose units 0..3 start far below zero (dead for good) and 4..7 at zero (live)."""
    bias = np.array([-30.0] * 4 + [0.0] * 4, np.float32)
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(8, activation="relu", name="hidden",
                           bias_initializer=keras.initializers.Constant(bias)),
        *middle,
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ])


@pytest.mark.fast
def test_dead_fraction_counts_units_dead_on_every_batch(tmp_path):
    x, y = _data(n=640)
    model = _half_dead()
    log_dir = str(tmp_path / "run")
    thresholds = gw.detectors.Thresholds(dead_steps=10)
    _fit(model, log_dir, x, y, lr=0.05, log_every=5, histogram_every=0, thresholds=thresholds)
    # independent: units whose pre-activation is <= 0 on every sample of the last 10 batches
    kernel, b = (v.numpy() for v in model.get_layer("hidden").trainable_variables)
    pre = x[-320:] @ kernel + b
    expected = float(np.mean((pre <= 0).all(axis=0)))
    layers = gw.read_stats(log_dir, level="layer")
    last = layers[layers.layer == "hidden"].iloc[-1]
    assert last.dead_frac == pytest.approx(expected) and expected == 0.5
    assert last.no_signal_frac == 0.0
    assert np.isnan(layers[layers.layer == "out"].iloc[-1].dead_frac)  # sigmoid: not a ReLU
    alerts = gw.read_alerts(log_dir)
    dead = alerts[alerts.kind == "dead_relu"]
    assert list(dead.layer) == ["hidden"] and dead.iloc[0].value == 0.5
    assert dead.iloc[0].step == 10  # the first window after dead_steps zero-gradient steps


class _Pruned(keras.constraints.Constraint):
    """Keeps every outgoing weight of the hidden units at zero (pruned), while they stay live."""

    def __call__(self, w):
        return w * 0.0


def test_live_units_with_zero_outgoing_weights_are_no_learning_signal(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(8, activation="relu", name="hidden"),
        keras.layers.Dense(1, activation="sigmoid", name="out", kernel_initializer="zeros",
                           kernel_constraint=_Pruned()),
    ])
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, log_every=5, histogram_every=0,
         thresholds=gw.detectors.Thresholds(dead_steps=5))
    # independent: the hidden units are live (positive pre-activation somewhere in the batch)
    kernel, b = (v.numpy() for v in model.get_layer("hidden").trainable_variables)
    assert ((x[:32] @ kernel + b) > 0).any(axis=0).all()
    layers = gw.read_stats(log_dir, level="layer")
    hidden = layers[layers.layer == "hidden"].iloc[-1]
    assert hidden.no_signal_frac == 1.0 and hidden.dead_frac == 0.0
    kinds = set(gw.read_alerts(log_dir).kind)
    assert "no_learning_signal" in kinds and "dead_relu" not in kinds


class _PrunedRows(keras.constraints.Constraint):
    """Keeps the outgoing weights of the given input units (kernel rows) at zero."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __call__(self, w):
        mask = np.ones(w.shape, np.float32)
        mask[self.rows] = 0.0
        return w * mask


def _fit_pruned(model, pruned, following, tmp_path, n):
    """Holds the outgoing rows ``pruned[name]`` (in the kernel of ``following[name]``) at
    zero from the first step (their kernels' constraints keep them there), then fits ``n``
    examples with windows of 5 steps and dead units counted after 10. Returns x, y, log_dir."""
    for name, rows in pruned.items():
        kernel = model.get_layer(following[name]).kernel
        kernel.assign(_PrunedRows(rows)(kernel.numpy()))
    x, y = _data(n=n)
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, lr=0.05, log_every=5, histogram_every=0,
         thresholds=gw.detectors.Thresholds(dead_steps=10))
    return x, y, log_dir


def test_dead_and_no_signal_units_of_layers_measured_together(tmp_path):
    # Three ReLU layers of 8 units whose next kernels have one shape (h2, h3) or not
    # (out): the silent-unit measure stacks equal shapes, so each layer's units must
    # come back in its own place. Dead units: bias -30 (never positive); pruned units:
    # live, with their outgoing weights held at zero (no learning signal).
    dead = {"h1": [0, 1], "h2": [5], "h3": [3, 4, 6]}
    pruned = {"h1": [2], "h2": [6, 7], "h3": [0]}
    following = {"h1": "h2", "h2": "h3", "h3": "out"}
    keras.utils.set_random_seed(0)
    layers = [keras.Input((12,))]
    for name in ("h1", "h2", "h3", "out"):
        before = [k for k, v in following.items() if v == name]
        bias = np.zeros(1 if name == "out" else 8, np.float32)
        if name in dead:
            bias[dead[name]] = -30.0
        layers.append(keras.layers.Dense(
            1 if name == "out" else 8, activation="sigmoid" if name == "out" else "relu", name=name,
            bias_initializer=keras.initializers.Constant(bias),
            kernel_constraint=_PrunedRows(pruned[before[0]]) if before else None))
    model = keras.Sequential(layers)
    x, y, log_dir = _fit_pruned(model, pruned, following, tmp_path, n=640)
    # independent: forward pass in numpy over the last 10 batches (batch 32)
    h = x[-320:]
    stats = gw.read_stats(log_dir, level="layer")
    for name in ("h1", "h2", "h3"):
        kernel, b = (v.numpy() for v in model.get_layer(name).trainable_variables)
        pre = h @ kernel + b
        h = np.maximum(pre, 0.0)
        never_active = (pre <= 0).all(axis=0)
        outgoing = model.get_layer(following[name]).kernel.numpy()
        silent_out = (outgoing == 0).all(axis=1) & ~never_active
        assert list(np.flatnonzero(never_active)) == dead[name]
        assert list(np.flatnonzero(silent_out)) == pruned[name]
        last = stats[stats.layer == name].iloc[-1]
        assert last.dead_frac == pytest.approx(never_active.mean()), name
        assert last.no_signal_frac == pytest.approx(silent_out.mean()), name


def test_silent_units_behind_a_tanh_and_a_linear_layer_come_from_their_own_kernel_columns(tmp_path):
    # Units not followed by a ReLU are measured by their own kernel's columns (12 x 8 and
    # 8 x 5 kernels: not square, so a column read as a row would not fit). Pruned units
    # get no gradient on their column: their outgoing rows are held at zero.
    pruned = {"squash": [1, 5], "linear": [0, 3]}
    following = {"squash": "linear", "linear": "out"}
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(8, activation="tanh", name="squash"),
        keras.layers.Dense(5, name="linear", kernel_constraint=_PrunedRows(pruned["squash"])),
        keras.layers.Dense(1, activation="sigmoid", name="out",
                           kernel_constraint=_PrunedRows(pruned["linear"])),
    ])
    x, y, log_dir = _fit_pruned(model, pruned, following, tmp_path, n=320)
    # independent: the last step's own-kernel gradient columns by a plain tape
    xb, yb = x[-32:], y[-32:]
    with tf.GradientTape() as tape:
        loss = keras.losses.BinaryCrossentropy()(yb, model(xb))
    kernels = [model.get_layer(name).kernel for name in pruned]
    stats = gw.read_stats(log_dir, level="layer")
    for name, grad in zip(pruned, tape.gradient(loss, kernels)):
        silent = (grad.numpy() == 0).all(axis=0)
        assert list(np.flatnonzero(silent)) == pruned[name], name
        last = stats[stats.layer == name].iloc[-1]
        assert last.no_signal_frac == pytest.approx(silent.mean()), name


def test_gradient_accumulation_does_not_make_update_ratio_storms(tmp_path):
    x, y = _data(n=1280)
    model = _model()
    model.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=4), "binary_crossentropy")
    log_dir = str(tmp_path / "run")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir, log_every=5, histogram_every=0)])
    stats = gw.read_stats(log_dir, level="layer")
    ratios = stats[stats.layer == "hidden"].update_ratio
    # measured on a step that moved (snapshots dense early, then at 51), never a zero "too slow"
    measured = ratios.dropna()
    assert len(measured) >= 2 and (measured > 1e-4).all()
    assert "update_ratio" not in set(gw.read_alerts(log_dir).kind)


def test_unit_tracks_follow_the_activation_and_normalisers():
    from gradwatch._topology import LayerInfo, Topology, VariableInfo

    topology = Topology(
        layers=[LayerInfo("d0", 0, "Dense", "relu", ["d0/kernel"]),
                LayerInfo("bn", 1, "BatchNormalization", "relu", ["bn/gamma", "bn/beta"]),
                LayerInfo("d1", 2, "Dense", "tanh", ["d1/kernel", "d1/bias"]),
                LayerInfo("out", 3, "Dense", "linear", ["out/kernel", "out/bias"])],
        variables=[VariableInfo("d0/kernel", "d0", [4, 6], "float32", 0),
                   VariableInfo("bn/gamma", "bn", [6], "float32", 1),
                   VariableInfo("bn/beta", "bn", [6], "float32", 1),
                   VariableInfo("d1/kernel", "d1", [6, 3], "float32", 2),
                   VariableInfo("d1/bias", "d1", [3], "float32", 2),
                   VariableInfo("out/kernel", "out", [3, 1], "float32", 3),
                   VariableInfo("out/bias", "out", [1], "float32", 3)],
    )
    tracks = {topology.layers[t.layer].name: t for t in probe_layout.unit_tracks(topology)}
    assert set(tracks) == {"bn", "d1", "out"}  # d0 is followed by a normaliser: bn speaks for it
    assert tracks["bn"].slot == 2 and tracks["bn"].relu and tracks["bn"].next_slot == 3
    assert not tracks["d1"].relu and tracks["d1"].next_slot == 5


def test_every_step_histograms_use_a_bounded_strided_sample(tmp_path):
    x, y = _data(n=96)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(512, activation="tanh", name="wide"),
                              keras.layers.Dense(1, activation="sigmoid", name="out")])
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    _, grads = _replay(reference, x, y, 32, 0.1, 3)
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, log_every=3, histogram_every=1)
    tensor = _histograms(log_dir, "gradwatch/grad_log10_abs/")[(3, "wide")]
    kernel = grads[2][0].ravel()  # 6144 entries > 4096: every 2nd entry, counted twice
    bias = grads[2][1].ravel()  # 512 entries: all of them
    expected = np.zeros(probes.NUM_LOG_BUCKETS)
    for values, weight in ((kernel[::2], 2), (bias, 1)):
        nonzero = np.abs(values[values != 0]).astype(np.float64)
        bucket = np.clip(np.floor((np.log10(nonzero) - probes.LOG10_LOW) * probes.PER_DECADE), 0,
                         probes.NUM_LOG_BUCKETS - 1).astype(int)
        expected += weight * np.bincount(bucket, minlength=probes.NUM_LOG_BUCKETS)
    left = np.round((tensor[:, 0] - probes.LOG10_LOW) * probes.PER_DECADE).astype(int)
    got = np.zeros(probes.NUM_LOG_BUCKETS)
    got[left] = tensor[:, 2]
    assert np.abs(got - expected).sum() <= 4
    assert got.sum() == pytest.approx(kernel.size + bias.size, abs=2)


def test_every_step_histograms_of_many_variables_share_one_sample_budget(tmp_path):
    x, y = _data(n=96)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,))]
                             + [keras.layers.Dense(64, activation="tanh", name=f"d{i}") for i in range(40)]
                             + [keras.layers.Dense(1, activation="sigmoid", name="out")])
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    _, grads = _replay(reference, x, y, 32, 0.1, 3)
    log_dir = str(tmp_path / "run")
    _fit(model, log_dir, x, y, log_every=3, histogram_every=1)
    per_variable = probes.SAMPLE_BUDGET // 82  # 82 variables: 799 entries each at most
    stride = -(-64 * 64 // per_variable)
    assert stride == 6
    histograms = _histograms(log_dir, "gradwatch/grad_log10_abs/")
    for layer, k in (("d0", 0), ("d20", 20)):
        kernel, bias = grads[2][2 * k].ravel(), grads[2][2 * k + 1].ravel()
        # d0's kernel (768 entries) fits the budget; d20's (4096) is sampled every 6th entry
        kernel_stride = 1 if kernel.size <= per_variable else stride
        expected = np.zeros(probes.NUM_LOG_BUCKETS)
        for values, weight in ((kernel[::kernel_stride], kernel_stride), (bias, 1)):
            nonzero = np.abs(values[values != 0]).astype(np.float64)
            bucket = np.clip(np.floor((np.log10(nonzero) - probes.LOG10_LOW) * probes.PER_DECADE), 0,
                             probes.NUM_LOG_BUCKETS - 1).astype(int)
            expected += weight * np.bincount(bucket, minlength=probes.NUM_LOG_BUCKETS)
        tensor = histograms[(3, layer)]
        left = np.round((tensor[:, 0] - probes.LOG10_LOW) * probes.PER_DECADE).astype(int)
        got = np.zeros(probes.NUM_LOG_BUCKETS)
        got[left] = tensor[:, 2]
        assert np.abs(got - expected).sum() <= 2 * kernel_stride, layer
        assert got.sum() == pytest.approx(-(-kernel.size // kernel_stride) * kernel_stride + bias.size), layer


def test_activation_probe_counts_units_zero_on_every_sample(tmp_path):
    x, y = _data(n=640)
    model = _half_dead(keras.layers.Dense(6, use_bias=False, name="pre_bn"),
                       keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"))
    log_dir = str(tmp_path / "run")
    monitor = gw.GradientMonitor(log_dir, log_every=5, histogram_every=0, activation_probe=True,
                                 thresholds=gw.detectors.Thresholds(dead_steps=10))
    model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[monitor],
              validation_data=(x[:64], y[:64]))
    # independent: forward the last 10 batches, units zero on every sample of every batch
    hidden = keras.Model(model.inputs, [model.get_layer("hidden").output, model.get_layer("relu").output])
    h, r = (np.asarray(a) for a in hidden(x[-320:], training=True))
    layers = gw.read_stats(log_dir, level="layer").groupby("layer").last()
    expected_hidden = float(np.mean((h == 0).all(axis=0)))
    expected_bn = float(np.mean((r == 0).all(axis=0)))
    assert layers.loc["hidden", "dead_frac"] == pytest.approx(expected_hidden) and expected_hidden == 0.5
    # the ReLU layer after BatchNormalization is reported on the BatchNormalization layer
    assert layers.loc["bn", "dead_frac"] == pytest.approx(expected_bn)
    # the wrapped calls are gone after fit: the model is left as it was found
    assert all("call" not in layer.__dict__ for layer in model.layers)


def test_short_runs_get_histograms_on_the_first_the_first_nonfinite_and_after_an_alert(tmp_path):
    from gradwatch._internal_options import InternalOptions

    x, y = _data(n=16 * 32)
    x[10 * 32, 0] = np.nan  # step 11's batch: a NaN loss, every gradient entry NaN; the step is skipped
    reference = _model()
    _, grads = _replay(reference, x, y, 32, 0.1, 1)
    kinds = []
    results = ResultsSink()
    internal = InternalOptions(defer_reads=False, lean_min_steps=0, lean_break_even=False,
                               extra_sinks=[results], on_step_kind=kinds.append)
    model = _model()
    _fit(model, str(tmp_path / "run"), x, y, log_every=4, histogram_every=100, on_nonfinite="skip_step",
         internal=internal)
    # step 11 ran the lean step (not a window's first step, nor an early update snapshot or
    # the step measuring it): the non-finite trigger is in the lean step too
    assert kinds[10] is True
    by_step = {}
    for result in results.results:
        for h in result.histograms or []:
            if h["kind"] == "log10_abs":
                by_step.setdefault(h["step"], {})[h["layer"]] = h
    errors = [a for r in results.results for a in r.alerts if a.severity == "error"]
    assert errors and errors[0].step == 11
    # step 1 (the first), step 11 (the first non-finite), step 13 (after the error read at step 12)
    assert sorted(by_step) == [1, 11, 13]
    sizes = {layer.name: sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
             for layer in model.layers}
    # step 11's histogram holds the step's NaN entries: as many as the window's statistics counted
    # (its only non-finite step; a separate in-graph pass), every entry in a bucket, a zero or NaN/Inf
    window = next(r for r in results.results if r.window_row["step"] == 12)
    nonfinite = {row["layer"]: row["nonfinite"] for row in window.layer_rows}
    assert sum(h["nonfinite"] for h in by_step[11].values()) > 0
    for layer, h in by_step[11].items():
        assert h["nonfinite"] == nonfinite[layer]
        assert h["counts"].sum() + h["zeros"] + h["nonfinite"] == sizes[layer]
    g1 = np.concatenate([g.ravel() for g in grads[0][:2]])  # hidden: kernel, bias
    nonzero = np.abs(g1[g1 != 0])
    expected = np.histogram(np.log10(nonzero), bins=by_step[1]["hidden"]["edges"])[0]
    np.testing.assert_array_equal(by_step[1]["hidden"]["counts"], expected)
    for layer, h in by_step[13].items():
        assert h["nonfinite"] == 0 and h["counts"].sum() + h["zeros"] == sizes[layer]


def test_histograms_count_a_sparse_gradient_of_unknown_length_beside_a_dense_one(tmp_path):
    # one joined count: the embedding's slices (their number known only at run time,
    # sampled with a stride worked out in-graph) and a dense kernel in the same segment sum
    rng = np.random.default_rng(0)
    table = tf.Variable(rng.normal(size=(60, 8)).astype("float32"), name="table")
    kernel = tf.Variable(rng.normal(size=(8, 3)).astype("float32"), name="kernel")
    log_dir = str(tmp_path / "run")
    watch = gw.Watch(log_dir=log_dir, log_every=1, histogram_every=1, names=["emb/table", "dense/kernel"])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def step(rows):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.gather(table, rows) @ kernel))
        return watch.observe(tape.gradient(loss, [table, kernel]), [table, kernel])

    rows = rng.integers(0, 60, size=1100).astype(np.int32)  # 8,800 slice entries
    sparse, dense = step(tf.constant(rows))
    watch.step_end()
    watch.close()
    assert isinstance(sparse, tf.IndexedSlices)
    per_variable = probes.SAMPLE_BUDGET // 2
    sample = min(probes.SAMPLE_ENTRIES, max(probes.MIN_SAMPLE_ENTRIES, per_variable))
    stride = -(-sparse.values.numpy().size // sample)
    assert stride == 3
    histograms = _histograms(log_dir, "gradwatch/grad_log10_abs/")
    for layer, values, weight in (("emb", sparse.values.numpy().ravel()[::stride], stride),
                                  ("dense", dense.numpy().ravel(), 1)):
        nonzero = np.abs(values[values != 0]).astype(np.float64)
        bucket = np.clip(np.floor((np.log10(nonzero) - probes.LOG10_LOW) * probes.PER_DECADE), 0,
                         probes.NUM_LOG_BUCKETS - 1).astype(int)
        expected = weight * np.bincount(bucket, minlength=probes.NUM_LOG_BUCKETS)
        tensor = histograms[(1, layer)]
        left = np.round((tensor[:, 0] - probes.LOG10_LOW) * probes.PER_DECADE).astype(int)
        got = np.zeros(probes.NUM_LOG_BUCKETS)
        got[left] = tensor[:, 2]
        # float32 vs float64 log10 may move a value sitting on a bucket edge by one bucket
        assert np.abs(got - expected).sum() <= 2 * weight, layer
        assert got.sum() == nonzero.size * weight, layer


def _numpy_log_counts(vectors, weights, scale):
    """Reference: per vector, log10|g| buckets, then zeros, then non-finite entries (weighted)."""
    rows = []
    for values, weight in zip(vectors, weights):
        values = values.astype(np.float64) * scale
        finite = np.isfinite(values)
        nonzero = finite & (values != 0)
        bucket = np.clip(np.floor((np.log10(np.abs(values[nonzero])) - probes.LOG10_LOW) * probes.PER_DECADE),
                         0, probes.NUM_LOG_BUCKETS - 1).astype(int)
        row = np.bincount(bucket, minlength=probes.NUM_LOG_BUCKETS).astype(np.float64)
        rows.append(weight * np.concatenate([row, [np.sum(finite & ~nonzero), np.sum(~finite)]]))
    return np.stack(rows)


@pytest.mark.fast
def test_histogram_rows_offset_alike_with_lengths_known_or_not():
    # every length known when traced: each row's offset is a running sum of marks at its
    # vectors' first entries; a length unknown: a fill per vector. Both against numpy,
    # with an empty vector between two others and at the end, sampled vectors' weights
    # and the loss scale
    rng = np.random.default_rng(3)
    vectors = [rng.normal(0, 1e-3, 700).astype(np.float32), np.zeros(0, np.float32),
               np.concatenate([rng.normal(0, 10, 90), [0, 0, np.nan, np.inf]]).astype(np.float32),
               rng.normal(0, 1e-9, 33).astype(np.float32), np.zeros(0, np.float32)]
    weights = [3.0, 1.0, 1.0, 2.0, 1.0]
    slots = [0, 2, 3, 5, 6]  # slots 1 and 4 without a gradient: rows of zeros
    expected = np.zeros((8, probes.NUM_LOG_BUCKETS + 2))
    expected[slots] = _numpy_log_counts(vectors, weights, 0.5)

    def count(*flats):
        pieces = [probes.Piece(tf.reshape(flat, [1, -1]), (slot,), weight)
                  for flat, slot, weight in zip(flats, slots, weights)]
        return probes.HistogramProbe._log_counts(pieces, 8, tf.constant(0.5))

    known = tf.function(count)(*[tf.constant(v) for v in vectors])
    unknown = tf.function(count, input_signature=[tf.TensorSpec([None], tf.float32)] * len(vectors))(
        *[tf.constant(v) for v in vectors])
    np.testing.assert_array_equal(known.numpy(), expected)
    np.testing.assert_array_equal(unknown.numpy(), expected)


@pytest.mark.fast
def test_histogram_rows_of_stacked_pieces_count_as_their_variables():
    # the step hands the histogram its stacked groups (pieces_of): each row is its slot's
    # vector. Rows of 2- and 3-row pieces beside a one-row piece, in an order that is not
    # the slots', with a sampled piece's weight; lengths known when traced or not
    rng = np.random.default_rng(5)
    stacked = rng.normal(0, 1e-2, (3, 40)).astype(np.float32)
    stacked[1, :7] = 0.0
    pair = np.stack([rng.normal(0, 1e3, 25),
                     np.r_[rng.normal(0, 1e-6, 23), np.nan, -np.inf]]).astype(np.float32)
    single = rng.normal(0, 1, 60).astype(np.float32)
    pieces = [(stacked, (4, 0, 6), 1.0), (single, (2,), 3.0), (pair, (5, 1), 2.0)]
    expected = np.zeros((7, probes.NUM_LOG_BUCKETS + 2))
    for matrix, slots, weight in pieces:
        rows = np.reshape(matrix, (len(slots), -1))
        expected[list(slots)] = _numpy_log_counts(list(rows), [weight] * len(slots), 0.25)

    def count(*matrices):
        given = [probes.Piece(tf.reshape(m, [len(slots), -1]), slots, weight)
                 for m, (_, slots, weight) in zip(matrices, pieces)]
        return probes.HistogramProbe._log_counts(given, 7, tf.constant(0.25))

    tensors = [tf.constant(matrix) for matrix, _, _ in pieces]
    known = tf.function(count)(*tensors)
    unknown = tf.function(count, input_signature=[tf.TensorSpec(None, tf.float32)] * len(pieces))(*tensors)
    np.testing.assert_array_equal(known.numpy(), expected)
    np.testing.assert_array_equal(unknown.numpy(), expected)


@pytest.mark.parametrize("fit", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_update_measure_of_equal_sizes_in_other_shapes_matches_numpy(tmp_path, jit, fit):
    # the step's stacked gradients (one group per shape) become the measure's size
    # blocks: variables of one size in three shapes, interleaved in slot order, a repeated
    # shape, a sparse gradient (its own row), a variable without a gradient and one over
    # STACK_LIMIT. SGD moves each by lr x its gradient, so every ratio is lr |g| / |w0|
    # with cosine 1 (snapshot at step 1: Watch measures at step 2 with step 1's gradient
    # kept, fit right after step 1's update)
    rng = np.random.default_rng(8)
    shapes = {"a": (4, 4), "b": (16,), "table": (10, 4), "c": (4, 4), "unused": (16,), "d": (2, 8),
              "e": (16,), "f": (3,), "big": (140, 130)}
    values = {name: rng.normal(size=shape).astype("float32") for name, shape in shapes.items()}
    order = list(shapes)
    lr = 0.05
    ids = tf.constant([1, 3, 3, 7])

    def loss_of(held):
        terms = [tf.reduce_sum(tf.sin(tf.convert_to_tensor(held[name]) * (k + 1.0)))
                 for k, name in enumerate(order) if name not in ("table", "unused")]
        return tf.add_n(terms) + tf.reduce_sum(tf.gather(held["table"], ids) ** 2)

    start = {name: tf.Variable(value, name=name) for name, value in values.items()}
    with tf.GradientTape() as tape:
        loss = loss_of(start)
    first = tape.gradient(loss, [start[name] for name in order])
    assert isinstance(first[order.index("table")], tf.IndexedSlices) and first[order.index("unused")] is None
    expected = {name: lr * np.linalg.norm(tf.convert_to_tensor(g).numpy()) / np.linalg.norm(values[name])
                for name, g in zip(order, first) if g is not None}

    if fit:
        class Toy(keras.Model):
            def __init__(self):
                super().__init__()
                self.held = {}
                for name in order:
                    self.held[name] = self.add_weight(shape=shapes[name], initializer="zeros", name=name)
                    self.held[name].assign(values[name])

            def call(self, x):
                return x

            def train_step(self, data):
                variables = [self.held[name] for name in order]
                with tf.GradientTape() as tape:
                    loss = loss_of(self.held)
                grads = tape.gradient(loss, variables)
                self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
                return {"loss": loss}

        model = Toy()
        model.compile(keras.optimizers.SGD(lr), jit_compile=jit)
        log_dir = str(tmp_path / "fit")
        model.fit(np.zeros((4, 1), np.float32), epochs=1, batch_size=1, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir, log_every=4, histogram_every=0)])
    else:
        watched = [start[name] for name in order]

        @tf.function(jit_compile=jit)
        def step():
            with tf.GradientTape() as tape:
                loss = loss_of(start)
            grads = watch.observe(tape.gradient(loss, watched), watched)
            for var, g in zip(watched, grads):
                if g is not None:
                    var.assign_sub(lr * tf.convert_to_tensor(g))

        log_dir = str(tmp_path / "loop")
        with gw.Watch(log_dir, log_every=4, histogram_every=0) as watch:
            for _ in range(4):
                step()
                watch.step_end()
    stats = gw.read_stats(log_dir)
    for name, ratio in expected.items():
        rows = stats[(stats.step == 4) & stats.variable.str.fullmatch(rf"(.*/)?{name}")]
        assert len(rows) == 1, (name, sorted(stats.variable.unique()))
        assert rows.iloc[0].update_ratio == pytest.approx(ratio, rel=1e-4), name
        assert rows.iloc[0].update_cos == pytest.approx(1.0, abs=1e-5), name
