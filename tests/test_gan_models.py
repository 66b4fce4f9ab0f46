"""Models that train with their own optimizers, fitted with ``GradientMonitor``.

A DCGAN-style and a WGAN-GP-style model (two optimizers set in ``compile``, the
critic applied several times a batch, a gradient penalty through a nested tape) and
a VAE with a custom ``train_step``, small and on synthetic data: every variable of
both networks gets rows, the norms equal an independent ``GradientTape``, ``step``
is the fit's batch, each optimizer's variables are a group, gradwatch adds no
optimizer variable, and the ``loss`` column is the window's mean of per-step losses
or NaN with the reason in ``run.json``.
"""

from __future__ import annotations

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ResultsSink, np_stats

import gradwatch as gw

B = 8  # batch size
STEPS = 3  # batches per fit
LATENT, FEATURES = 4, 6


def _data(n=B * STEPS, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, FEATURES)).astype("float32")
    noise = rng.normal(size=(n, LATENT)).astype("float32")
    return real, noise


def _generator():
    return keras.Sequential([keras.Input((LATENT,)),
                             keras.layers.Dense(8, activation="relu", name="g_hidden"),
                             keras.layers.Dense(FEATURES, name="g_out")], name="generator")


def _critic(activation="sigmoid"):
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, name="d_hidden"),
                             keras.layers.LeakyReLU(negative_slope=0.2, name="d_act"),
                             keras.layers.Dense(1, activation=activation, name="d_out")],
                            name="discriminator")


class DCGAN(keras.Model):
    """keras-io's DCGAN, on vectors: the noise comes with the data (``y``) so an
    independent tape can replay a step."""

    def __init__(self):
        super().__init__()
        self.discriminator, self.generator = _critic(), _generator()

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy()
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")

    def d_loss(self, real, noise):
        fake = self.generator(noise)
        labels = tf.concat([tf.ones((tf.shape(real)[0], 1)), tf.zeros((tf.shape(real)[0], 1))], axis=0)
        return self.loss_fn(labels, self.discriminator(tf.concat([fake, real], axis=0)))

    def g_loss(self, noise):
        return self.loss_fn(tf.zeros((tf.shape(noise)[0], 1)), self.discriminator(self.generator(noise)))

    def train_step(self, data):
        real, noise = data[0], data[1]
        with tf.GradientTape() as tape:
            d_loss = self.d_loss(real, noise)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        with tf.GradientTape() as tape:
            g_loss = self.g_loss(noise)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss_metric.update_state(d_loss)
        return {"d_loss": self.d_loss_metric.result(), "g_loss": g_loss}


class WGANGP(keras.Model):
    """keras-io's WGAN-GP, on vectors: ``D_STEPS`` critic updates a batch, each with a
    gradient penalty through a nested tape (the interpolation weight fixed at 0.3)."""

    D_STEPS = 3

    def __init__(self):
        super().__init__()
        self.discriminator, self.generator = _critic(activation=None), _generator()

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

    def critic_loss(self, real, noise):
        fake = self.generator(noise, training=True)
        cost = tf.reduce_mean(self.discriminator(fake)) - tf.reduce_mean(self.discriminator(real))
        interpolated = real + 0.3 * (fake - real)
        with tf.GradientTape() as gp_tape:
            gp_tape.watch(interpolated)
            pred = self.discriminator(interpolated, training=True)
        norm = tf.sqrt(tf.reduce_sum(tf.square(gp_tape.gradient(pred, [interpolated])[0]), axis=1))
        return cost + 10.0 * tf.reduce_mean((norm - 1.0) ** 2)

    def generator_loss(self, noise):
        return -tf.reduce_mean(self.discriminator(self.generator(noise, training=True), training=True))

    def train_step(self, data):
        real, noise = data[0], data[1]
        for _ in range(self.D_STEPS):
            with tf.GradientTape() as tape:
                d_loss = self.critic_loss(real, noise)
            grads = tape.gradient(d_loss, self.discriminator.trainable_variables)
            self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_variables))
        with tf.GradientTape() as tape:
            g_loss = self.generator_loss(noise)
        grads = tape.gradient(g_loss, self.generator.trainable_variables)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_variables))
        return {"d_loss": d_loss, "g_loss": g_loss}


class VAE(keras.Model):
    """A VAE with a custom ``train_step``; ``tracks_loss``: it also updates Keras's loss
    tracker with each step's loss (as Keras's guide to a custom ``train_step`` does)."""

    def __init__(self, tracks_loss):
        super().__init__()
        self.tracks_loss = tracks_loss
        self.encoder = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"),
                                         keras.layers.Dense(4)], name="encoder")
        self.decoder = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="relu"),
                                         keras.layers.Dense(FEATURES)], name="decoder")
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")

    def vae_loss(self, x, eps):
        mean, log_var = tf.split(self.encoder(x), 2, axis=-1)
        reconstruction = self.decoder(mean + tf.exp(0.5 * log_var) * eps)
        kl = -0.5 * tf.reduce_mean(1 + log_var - tf.square(mean) - tf.exp(log_var))
        return tf.reduce_mean(tf.square(reconstruction - x)) + kl

    def train_step(self, data):
        x, eps = data[0], data[1][:, :2]
        with tf.GradientTape() as tape:
            loss = self.vae_loss(x, eps)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.total_loss_tracker.update_state(loss)
        if self.tracks_loss:
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
        return {"loss": self.total_loss_tracker.result()}


def _gan(cls, d_optimizer, g_optimizer):
    keras.utils.set_random_seed(0)
    model = cls()
    model.compile(d_optimizer=d_optimizer, g_optimizer=g_optimizer)
    return model


def _fit(model, log_dir, real, noise, **monitor_options):
    options = dict(log_every=1, histogram_every=0)
    options.update(monitor_options)
    monitor = gw.GradientMonitor(str(log_dir), **options)
    model.fit(real, noise, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    return monitor


def _expected_l2(loss_fn, args, variables):
    with tf.GradientTape() as tape:
        value = loss_fn(*args)
    return [np_stats(tf.convert_to_tensor(g).numpy())["l2"] for g in tape.gradient(value, variables)]


def _run_json(log_dir):
    with open(os.path.join(str(log_dir), "run.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("cls", [DCGAN, WGANGP])
def test_both_networks_every_batch_true_numbers_one_step_per_batch(cls, tmp_path):
    real, noise = _data()
    # a zero learning rate keeps the weights: each batch's gradients are replayed by a plain tape
    model = _gan(cls, keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0))
    monitor = _fit(model, tmp_path, real, noise)
    critic, generator = model.discriminator.trainable_variables, model.generator.trainable_variables
    topology = monitor.topology
    assert len(topology.variables) == len(critic) + len(generator)
    stats, windows = gw.read_stats(str(tmp_path)), gw.read_windows(str(tmp_path))
    assert list(windows.step) == list(range(1, STEPS + 1)) and list(windows.steps) == [1] * STEPS
    assert (stats.groupby("variable").size() == STEPS).all()
    # the critic applied D_STEPS times a batch: that many observations in each one-step window
    d_steps = getattr(cls, "D_STEPS", 1)
    groups = stats.set_index(["step", "variable"]).group
    grad_steps = stats.set_index(["step", "variable"]).grad_steps
    # the topology lists the watched variables in the model's order
    by_name = {v.path: info.name for v, info in zip(model.trainable_variables, topology.variables)}
    for v in critic:
        assert (groups.xs(by_name[v.path], level="variable") == "d_optimizer").all()
        assert (grad_steps.xs(by_name[v.path], level="variable") == d_steps).all()
    for v in generator:
        assert (groups.xs(by_name[v.path], level="variable") == "g_optimizer").all()
        assert (grad_steps.xs(by_name[v.path], level="variable") == 1).all()
    for step in (1, 2):
        xb, nb = real[(step - 1) * B: step * B], noise[(step - 1) * B: step * B]
        if cls is DCGAN:
            d_expected = _expected_l2(model.d_loss, (xb, nb), critic)
            g_expected = _expected_l2(model.g_loss, (nb,), generator)
        else:
            d_expected = _expected_l2(model.critic_loss, (xb, nb), critic)
            g_expected = _expected_l2(model.generator_loss, (nb,), generator)
        rows = stats[stats.step == step].set_index("variable")
        for v, expected in zip(critic + generator, d_expected + g_expected):
            assert rows.loc[by_name[v.path], "l2"] == pytest.approx(expected, rel=2e-4, abs=1e-7), v.path
    info = _run_json(tmp_path)
    assert [(o["group"], o["class"]) for o in info["optimizers"]] == [
        ("optimizer", "RMSprop"), ("d_optimizer", "SGD"), ("g_optimizer", "SGD")]
    assert {v["group"] for v in info["variables"]} == {"d_optimizer", "g_optimizer"}


class SharedDCGAN(DCGAN):
    """The critic's optimizer is ``model.optimizer`` (given to ``Model.compile``)."""

    def compile(self, d_optimizer, g_optimizer):
        super().compile(d_optimizer, g_optimizer)
        keras.Model.compile(self, optimizer=d_optimizer)


@pytest.mark.parametrize("cls,options", [(DCGAN, {}), (WGANGP, {}), (DCGAN, {"activation_probe": True}),
                                         (SharedDCGAN, {})])
def test_gradwatch_adds_no_optimizer_variable(cls, options, tmp_path):
    real, noise = _data()
    counts = []
    for monitored in (False, True):
        model = _gan(cls, keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
        callbacks = [gw.GradientMonitor(str(tmp_path / str(monitored)), log_every=2, **options)
                     ] if monitored else []
        model.fit(real, noise, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        counts.append([len(o.variables) for o in (model.optimizer, model.d_optimizer, model.g_optimizer)])
    assert counts[1] == counts[0]
    if cls is not SharedDCGAN:
        assert counts[0][0] == 2  # the unused model.optimizer stays unbuilt (iterations, learning rate)


def test_a_gan_loss_is_nan_and_run_json_says_why_and_the_report_shows_the_groups(tmp_path):
    real, noise = _data()
    model = _gan(DCGAN, keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    _fit(model, tmp_path / "run", real, noise)
    run = str(tmp_path / "run")
    assert gw.read_windows(run).loss.isna().all()
    note = _run_json(run)["loss"]["note"]
    assert "DCGAN.train_step" in note and "NaN" in note
    layers = gw.read_stats(run, level="layer").drop_duplicates("layer").set_index("layer").group
    assert layers.to_dict() == {"d_hidden": "d_optimizer", "d_out": "d_optimizer",
                                "g_hidden": "g_optimizer", "g_out": "g_optimizer"}
    from gradwatch._report.report import build_report

    path, _ = build_report(run, str(tmp_path / "report.html"))
    with open(path) as f:
        html = f.read()
    assert "d_hidden [d_optimizer]" in html and "g_out [g_optimizer]" in html
    assert "optimizers d_optimizer (Adam), g_optimizer (Adam)" in html  # the unused model.optimizer is not


def _run_info(groups):
    return {"layers": [{"name": name} for name in groups],
            "variables": [{"name": f"{name}/kernel", "layer": name, "group": group}
                          for name, group in groups.items()]}


@pytest.mark.fast
def test_the_tab_labels_each_row_with_its_group_when_there_are_several():
    from gradwatch.tb_plugin.plugin import build_run, flow_json

    two = _run_info({"d_hidden": "d_optimizer", "g_out": "g_optimizer"})
    labels = flow_json("r", build_run(two, []), 10)["layers"]
    assert labels == ["d_hidden [d_optimizer]", "g_out [g_optimizer]"]
    one = _run_info({"hidden": "optimizer", "out": "optimizer"})
    assert flow_json("r", build_run(one, []), 10)["layers"] == ["hidden", "out"]
    old = {"layers": [{"name": "hidden"}], "variables": [{"name": "hidden/kernel", "layer": "hidden"}]}
    assert flow_json("r", build_run(old, []), 10)["layers"] == ["hidden"]  # a run before groups


@pytest.mark.parametrize("tracks_loss", [False, True])
def test_a_custom_train_step_loss_is_the_windows_mean_of_step_losses_or_nan(tracks_loss, tmp_path):
    real, noise = _data(n=B * 4)
    keras.utils.set_random_seed(0)
    model = VAE(tracks_loss)
    model.compile(keras.optimizers.SGD(0.0))
    _fit(model, tmp_path, real, noise, log_every=2)
    windows = gw.read_windows(str(tmp_path))
    assert list(windows.step) == [2, 4]
    if not tracks_loss:
        # the train_step's own "loss" is a running mean over the epoch: not used
        assert windows.loss.isna().all()
        return
    per_step = [float(model.vae_loss(real[k * B:(k + 1) * B], noise[k * B:(k + 1) * B, :2]))
                for k in range(4)]
    assert list(windows.loss) == pytest.approx([np.mean(per_step[:2]), np.mean(per_step[2:])], rel=1e-5)


class HiddenOptimizer(keras.Model):
    """A train_step whose optimizer is not an attribute of the model (kept in a dict)."""

    def __init__(self):
        super().__init__()
        self.net = _generator()
        self.held = {}

    def train_step(self, data):
        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.net(y) - x))
        grads = tape.gradient(loss, self.net.trainable_variables)
        self.held["opt"].apply_gradients(zip(grads, self.net.trainable_variables))
        return {"loss": loss}


def test_no_optimizer_applied_after_the_first_batch_warns_then_and_optimizers_names_it(tmp_path):
    real, noise = _data()
    keras.utils.set_random_seed(0)
    model = HiddenOptimizer()
    model.compile()
    model.held["opt"] = hidden = keras.optimizers.SGD(0.01)
    seen_at_second_batch = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:
                seen_at_second_batch.extend(str(w.message) for w in caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = gw.GradientMonitor(str(tmp_path / "missed"), log_every=1)
        model.fit(real, noise, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, Probe()])
    [message] = [m for m in seen_at_second_batch if "first batch" in m]
    assert "optimizer (RMSprop)" in message and "optimizers=[...]" in message
    assert not [w for w in caught if "observed no training step" in str(w.message)]  # said once
    monitor = gw.GradientMonitor(str(tmp_path / "named"), log_every=1, optimizers={"net": hidden})
    model.fit(real, noise, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    stats = gw.read_stats(str(tmp_path / "named"))
    assert set(stats.group) == {"net"} and list(gw.read_windows(str(tmp_path / "named")).step) == [1, 2, 3]


def test_skip_step_skips_only_the_group_whose_gradient_was_not_finite(tmp_path):
    real, noise = _data()
    scale = np.ones(B * STEPS, "float32")
    scale[B: 2 * B] = np.nan  # batch 2: the generator's loss (only) is NaN

    class Scaled(DCGAN):
        def g_loss(self, noise, weight=None):
            loss = super().g_loss(noise)
            return loss if weight is None else loss * tf.reduce_mean(weight)

        def train_step(self, data):
            real, noise, weight = data
            with tf.GradientTape() as tape:
                d_loss = self.d_loss(real, noise)
            grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
            self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
            with tf.GradientTape() as tape:
                g_loss = self.g_loss(noise, weight)
            grads = tape.gradient(g_loss, self.generator.trainable_weights)
            self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
            return {"g_loss": g_loss}

    model = _gan(Scaled, keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1))
    weights = []

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights.append([[v.numpy().copy() for v in net.trainable_variables]
                            for net in (model.discriminator, model.generator)])

    monitor = gw.GradientMonitor(str(tmp_path), log_every=1, histogram_every=0, on_nonfinite="skip_step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(real, noise, sample_weight=scale, batch_size=B, epochs=1, shuffle=False, verbose=0,
                  callbacks=[monitor, Keep()])
    (d1, g1), (d2, g2), (_, g3) = weights
    assert all(np.array_equal(a, b) for a, b in zip(g1, g2))  # the generator's update was skipped
    assert any(not np.array_equal(a, b) for a, b in zip(d1, d2))  # the critic's was applied
    assert all(np.isfinite(w).all() for w in g3)
    windows = gw.read_windows(str(tmp_path)).set_index("step")
    assert windows.loc[2, "skipped_steps"] == 1 and windows.loc[2, "nonfinite_steps"] == 1
    stats = gw.read_stats(str(tmp_path))
    bad = stats[(stats.step == 2) & (stats.nonfinite > 0)]
    assert set(bad.group) == {"g_optimizer"}


@pytest.mark.parametrize("cls", [DCGAN, WGANGP])
def test_a_healthy_gan_raises_nothing_over_a_few_epochs(cls, tmp_path):
    # The WGAN critic's output bias gets an exactly-zero gradient by construction (its
    # loss is mean(D(fake)) - mean(D(real)) plus a penalty on input gradients), while its
    # kernel's is not zero: the unit is not silent. The generator's observation in the same
    # step holds no critic gradient, so it must not overwrite what the critic's measured.
    real, noise = _data(n=B * 8)
    model = _gan(cls, keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(real, noise, batch_size=B, epochs=4, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(str(tmp_path), log_every=4, histogram_every=0)])
    alerts = gw.read_alerts(str(tmp_path))
    assert alerts[alerts.severity.isin(["warning", "error"])].empty, alerts.message.tolist()
    layers = gw.read_stats(str(tmp_path), level="layer")
    out = layers[layers.layer == "d_out"]
    assert len(out) == 8 and (out.no_signal_frac.fillna(0.0) == 0.0).all()
    if cls is WGANGP:
        stats = gw.read_stats(str(tmp_path))
        bias = stats[stats.variable.str.endswith("d_out/bias")]
        kernel = stats[stats.variable.str.endswith("d_out/kernel")]
        assert (bias.l2_max == 0.0).all() and (kernel.l2_min > 0.0).all()  # the case above, as built


def test_a_histogram_step_counts_both_networks_observed_in_it(tmp_path):
    # The critic's optimizer applies first in each batch, then the generator's: on a
    # histogram step the second observation of the step takes its histogram too.
    from gradwatch._internal_options import InternalOptions

    real, noise = _data(n=B * 6)
    model = _gan(DCGAN, keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0))  # weights kept: replayable
    results = ResultsSink()
    _fit(model, tmp_path, real, noise, log_every=1, histogram_every=2,
         internal=InternalOptions(defer_reads=False, extra_sinks=[results]))
    by_step = {}
    for result in results.results:
        for h in result.histograms or []:
            if h["kind"] == "log10_abs":
                by_step.setdefault(h["step"], {})[h["layer"]] = h
    assert sorted(by_step) == [1, 2, 4, 6]  # the first step, then every second
    sizes = {layer.name: sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
             for network in (model.discriminator, model.generator) for layer in network.layers
             if layer.trainable_variables}
    for step, layers in by_step.items():
        assert set(layers) == set(sizes), step
        for name, h in layers.items():
            assert h["counts"].sum() + h["zeros"] + h["nonfinite"] == sizes[name], (step, name)
    nb = noise[3 * B: 4 * B]  # step 4's batch
    with tf.GradientTape() as tape:
        g_loss = model.g_loss(nb)
    hidden = model.generator.get_layer("g_hidden").trainable_variables
    grads = np.concatenate([g.numpy().ravel() for g in tape.gradient(g_loss, hidden)])
    h = by_step[4]["g_hidden"]
    expected = np.histogram(np.log10(np.abs(grads[grads != 0])), bins=h["edges"])[0]
    np.testing.assert_array_equal(h["counts"], expected)
    assert h["zeros"] == np.count_nonzero(grads == 0)
