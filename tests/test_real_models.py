"""Real Keras architectures, watched whole and read in their true order.

A corpus of the models people train (convnet, ResNet block, U-Net, transformer
classifier, BiLSTM over an Embedding, seq2seq with attention, a small ViT, a VAE
with a custom ``train_step``, an unbuilt subclassed model, a nested model, a
two-branch model, a GAN in a custom loop), each on synthetic data for a few steps:
every trainable variable gets rows, each step is recorded once, the norms equal an
independent ``GradientTape`` on the same batch, and the layers come out input to
output with the activation that really follows each.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import np_stats

import gradwatch as gw

B = 8  # batch size; every fit runs 3 steps
STEPS = 3


def _mlp_data(features=6, n=B * STEPS):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def _image_data(size=8, channels=1, classes=3, n=B * STEPS):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, size, size, channels)).astype("float32")
    return x, rng.integers(0, classes, n).astype("int32")


def _token_data(length=6, vocab=20, classes=2, n=B * STEPS):
    rng = np.random.default_rng(2)
    return rng.integers(1, vocab, (n, length)).astype("int32"), rng.integers(0, classes, n).astype("int32")


# ------------------------------------------------------------------------- models


def convnet():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(3, name="logits"),
    ], name="convnet")


def resnet_block():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    shortcut = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="res_conv")(shortcut)
    x = keras.layers.BatchNormalization(name="res_bn")(x)
    x = keras.layers.Add(name="add")([x, shortcut])
    x = keras.layers.Activation("relu", name="out_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="resnet_block")


def unet():
    inputs = keras.Input((8, 8, 1))
    down = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="down")(inputs)
    pooled = keras.layers.MaxPooling2D(name="pool")(down)
    bottom = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="bottom")(pooled)
    up = keras.layers.UpSampling2D(name="upsample")(bottom)
    merged = keras.layers.Concatenate(name="skip")([up, down])
    decoded = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="up")(merged)
    return keras.Model(inputs, keras.layers.Conv2D(1, 1, name="mask")(decoded), name="unet")


class TransformerBlock(keras.layers.Layer):
    def __init__(self, dim, heads, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads, name="attention")
        self.norm1 = keras.layers.LayerNormalization(name="norm1")
        self.ffn = keras.layers.Dense(2 * dim, activation="relu", name="ffn")
        self.proj = keras.layers.Dense(dim, name="proj")
        self.norm2 = keras.layers.LayerNormalization(name="norm2")

    def call(self, x):
        x = self.norm1(x + self.attention(x, x))
        return self.norm2(x + self.proj(self.ffn(x)))


def transformer():
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embed")(inputs)
    x = TransformerBlock(8, 2, name="block_a")(x)
    x = TransformerBlock(8, 2, name="block_b")(x)
    x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="classify")(x), name="transformer")


def bilstm():
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(20, 8, name="embed"),
        keras.layers.Bidirectional(keras.layers.LSTM(4), name="bidirectional"),
        keras.layers.Dense(2, name="classify"),
    ], name="bilstm")


def seq2seq():
    source = keras.Input((6,), dtype="int32", name="source")
    target = keras.Input((5,), dtype="int32", name="target")
    encoded = keras.layers.Embedding(20, 8, name="src_embed")(source)
    encoded = keras.layers.LSTM(8, return_sequences=True, name="encoder")(encoded)
    decoded = keras.layers.Embedding(20, 8, name="tgt_embed")(target)
    decoded = keras.layers.LSTM(8, return_sequences=True, name="decoder")(decoded)
    context = keras.layers.Attention(name="attend")([decoded, encoded])
    merged = keras.layers.Concatenate(name="merge")([decoded, context])
    return keras.Model([source, target], keras.layers.Dense(20, name="vocab")(merged), name="seq2seq")


def vit():
    inputs = keras.Input((8, 8, 1))
    patches = keras.layers.Conv2D(8, 4, strides=4, name="patchify")(inputs)
    tokens = keras.layers.Reshape((4, 8), name="tokens")(patches)
    x = TransformerBlock(8, 2, name="encoder_block")(tokens)
    x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="vit")


class SubclassedMLP(keras.Model):
    """Never called before ``fit``: its variables are created by the first step."""

    def __init__(self):
        super().__init__(name="subclassed")
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))


class Wrapped(keras.Model):
    """A Sequential inside a subclassed model; its middle layer has 12 of 16 units dead."""

    def __init__(self):
        super().__init__(name="wrapped")
        dead_bias = np.r_[np.full(12, -1e3), np.zeros(4)].astype("float32")
        self.body = keras.Sequential([
            keras.layers.Dense(16, activation="relu", name="first"),
            keras.layers.Dense(16, activation="relu", name="dead",
                               bias_initializer=keras.initializers.Constant(dead_bias)),
            keras.layers.Dense(1, name="last"),
        ], name="body")

    def call(self, x):
        return self.body(x)


def two_branch():
    inputs = keras.Input((6,))
    a = keras.layers.Dense(8, name="branch_a")(inputs)
    b = keras.layers.Dense(8, name="branch_b_in")(inputs)
    b = keras.layers.Dense(8, activation="tanh", name="branch_b")(b)
    # branch a's ReLU is listed after branch b's first Dense: the list's next entry is not it
    a = keras.layers.Activation("relu", name="a_relu")(a)
    merged = keras.layers.Concatenate(name="merge")([a, b])
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(merged), name="two_branch")


class VAE(keras.Model):
    """A VAE with its own ``train_step`` (a deterministic noise draw keeps it comparable)."""

    def __init__(self):
        super().__init__(name="vae")
        self.encoder = keras.Sequential([keras.layers.Dense(8, activation="relu", name="enc_hidden"),
                                         keras.layers.Dense(4, name="enc_stats")], name="encoder")
        self.decoder = keras.Sequential([keras.layers.Dense(8, activation="relu", name="dec_hidden"),
                                         keras.layers.Dense(6, name="dec_out")], name="decoder")
        self.noise = tf.constant(np.random.default_rng(3).normal(size=(1, 2)).astype("float32"))

    def call(self, x):
        mean, log_var = tf.split(self.encoder(x), 2, axis=-1)
        return self.decoder(mean + tf.exp(0.5 * log_var) * self.noise), mean, log_var

    def vae_loss(self, x):
        reconstruction, mean, log_var = self(x, training=True)
        kl = -0.5 * tf.reduce_mean(1 + log_var - tf.square(mean) - tf.exp(log_var))
        return tf.reduce_mean(tf.square(reconstruction - x)) + kl

    def train_step(self, data):
        x = data[0] if isinstance(data, tuple) else data
        with tf.GradientTape() as tape:
            loss = self.vae_loss(x)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


# ------------------------------------------------------------------------- the corpus

def _classes(model, x, y):
    return model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)


CORPUS = {
    # name: (model, data, loss, layers in input-to-output order, {layer: activation that follows})
    "convnet": (convnet, _image_data, "sparse_categorical_crossentropy", ["conv1", "logits"],
                {"conv1": "relu", "logits": "linear"}),
    "resnet_block": (resnet_block, lambda: _image_data(channels=2), "sparse_categorical_crossentropy",
                     ["stem", "stem_bn", "res_conv", "res_bn", "head"],
                     {"stem_bn": "relu", "res_bn": "linear", "head": "linear"}),
    "unet": (unet, lambda: (_image_data()[0], _image_data()[0]), "mse",
             ["down", "bottom", "up", "mask"], {"down": "relu", "bottom": "relu", "mask": "linear"}),
    "transformer": (transformer, _token_data, "sparse_categorical_crossentropy",
                    ["embed", "block_a/attention/query", "block_a/ffn", "block_b/attention/query",
                     "block_b/ffn", "classify"],
                    {"block_a/ffn": "relu", "block_a/proj": "linear"}),
    "bilstm": (bilstm, _token_data, "sparse_categorical_crossentropy",
               ["embed", "forward_lstm", "classify"], {"classify": "linear"}),
    # two parallel branches: each is in order, and both come before the output layer
    "seq2seq": (seq2seq, None, "sparse_categorical_crossentropy",
                [["src_embed", "encoder", "vocab"], ["tgt_embed", "decoder", "vocab"]], {"vocab": "linear"}),
    "vit": (vit, _image_data, "sparse_categorical_crossentropy",
            ["patchify", "query", "ffn", "head"], {"ffn": "relu", "proj": "linear"}),
    "subclassed": (SubclassedMLP, _mlp_data, "mse", ["hidden", "out"], {"hidden": "relu", "out": "linear"}),
    "nested": (Wrapped, _mlp_data, "mse", ["first", "dead", "last"], {"first": "relu", "dead": "relu"}),
    "two_branch": (two_branch, _mlp_data, "mse", [["branch_a", "out"], ["branch_b_in", "branch_b", "out"]],
                   {"branch_a": "relu", "branch_b_in": "linear", "branch_b": "tanh"}),
    "vae": (VAE, lambda: (_mlp_data()[0], _mlp_data()[0]), None,
            ["enc_hidden", "enc_stats", "dec_hidden", "dec_out"],
            {"enc_hidden": "relu", "dec_hidden": "relu"}),
}


def _seq2seq_data():
    rng = np.random.default_rng(4)
    n = B * STEPS
    x = (rng.integers(1, 20, (n, 6)).astype("int32"), rng.integers(1, 20, (n, 5)).astype("int32"))
    return x, rng.integers(0, 20, (n, 5)).astype("int32")


def _batch(x, start):
    if isinstance(x, tuple):
        return tuple(part[start:start + B] for part in x)
    return x[start:start + B]


def _position(names, wanted):
    """Index of the layer named ``wanted`` or ending in it."""
    matches = [i for i, name in enumerate(names) if name == wanted or name.endswith("/" + wanted)
               or wanted in name.split("/")]
    assert matches, f"no layer {wanted!r} in {names}"
    return matches[0]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_variable_every_step_true_numbers_and_order(name, tmp_path):
    build, data, loss, order, activations = CORPUS[name]
    keras.utils.set_random_seed(0)
    x, y = _seq2seq_data() if name == "seq2seq" else data()
    model = build()
    # a zero learning rate keeps the weights: every step's gradient is checked on its batch
    model.compile(keras.optimizers.SGD(0.0), loss)
    log_dir = str(tmp_path / name)
    monitor = gw.GradientMonitor(log_dir, log_every=1, histogram_every=0)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    topology = monitor.topology
    variables = model.trainable_variables
    stats = gw.read_stats(log_dir)
    windows = gw.read_windows(log_dir)
    # every trainable variable has rows, and every step is recorded once
    assert len(topology.variables) == len(variables) > 0
    assert sorted(set(stats.variable)) == sorted(topology.variable_names)
    assert list(windows.step) == list(range(1, STEPS + 1)) and list(windows.steps) == [1] * STEPS
    assert (stats.groupby("variable").size() == STEPS).all()
    # the numbers: each step's norms against a plain GradientTape on its batch
    for step in (1, 2):
        xb, yb = _batch(x, (step - 1) * B), _batch(y, (step - 1) * B)
        with tf.GradientTape() as tape:
            value = model.vae_loss(xb) if name == "vae" else _classes(model, xb, yb)
        grads = tape.gradient(value, variables)
        rows = stats[stats.step == step].set_index("variable")
        for info, grad in zip(topology.variables, grads):
            expected = np_stats(tf.convert_to_tensor(grad).numpy())["l2"]
            assert rows.loc[info.name, "l2"] == pytest.approx(expected, rel=2e-4, abs=1e-7), (name, info.name)
    # layers input to output, and what follows each
    names = [layer.name for layer in topology.layers]
    for chain in order if isinstance(order[0], list) else [order]:
        positions = [_position(names, wanted) for wanted in chain]
        assert positions == sorted(positions), (name, names)
    following = {layer.name: layer.activation for layer in topology.layers}
    for wanted, activation in activations.items():
        assert following[names[_position(names, wanted)]] == activation, (name, wanted, following)


def test_a_transformer_fed_by_a_dataset_of_unknown_batch_size(tmp_path):
    """A ``tf.data`` pipeline's batch size is unknown when the step is traced, and a Dense
    layer on a sequence then has a kernel gradient of static shape (None, units): the
    fit raised "gradwatch needs gradients of static shape". The gradient takes its
    variable's shape, and the norms equal a plain GradientTape."""
    keras.utils.set_random_seed(0)
    x, y = _token_data()
    model = transformer()
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(B)
    assert dataset.element_spec[0].shape[0] is None
    log_dir = str(tmp_path / "run")
    monitor = gw.GradientMonitor(log_dir, log_every=1, histogram_every=0)
    model.fit(dataset, epochs=1, verbose=0, callbacks=[monitor])
    stats = gw.read_stats(log_dir)
    assert sorted(set(stats.step)) == list(range(1, STEPS + 1))
    with tf.GradientTape() as tape:
        value = _classes(model, x[:B], y[:B])
    grads = tape.gradient(value, model.trainable_variables)
    rows = stats[stats.step == 1].set_index("variable")
    assert len(rows) == len(grads) > 0
    for info, grad in zip(monitor.topology.variables, grads):
        expected = np_stats(tf.convert_to_tensor(grad).numpy())["l2"]
        assert rows.loc[info.name, "l2"] == pytest.approx(expected, rel=2e-4, abs=1e-7), info.name


def test_a_custom_loop_over_a_dataset_of_unknown_batch_size(tmp_path):
    """The same transformer in a custom loop: a ``tf.function`` step traced with the
    dataset's element spec (batch size None) hands ``Watch.observe`` kernel gradients
    of partly unknown shape. They take their variables' shapes; the norms equal the
    step's own ``tf.norm`` of each gradient. The model is called once eagerly after the
    ``Watch`` exists (its call trace then holds eager tensors, which have no consumers:
    ``observe`` raised NotImplementedError before)."""
    keras.utils.set_random_seed(0)
    x, y = _token_data()
    model = transformer()
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(B)
    log_dir = str(tmp_path / "loop")
    watch = gw.Watch(log_dir=log_dir, log_every=1, histogram_every=0, model=model)

    @tf.function(input_signature=dataset.element_spec)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        assert any(not g.shape.is_fully_defined() for g in grads if not isinstance(g, tf.IndexedSlices))
        observed = watch.observe(grads, model.trainable_variables, loss=loss)
        optimizer.apply_gradients(zip(observed, model.trainable_variables))
        return [tf.norm(tf.convert_to_tensor(g)) for g in grads]

    model(x[:B])  # built before the step is traced
    norms = []
    for xb, yb in dataset:
        norms.append([float(n) for n in step(xb, yb)])
        watch.step_end()
    watch.close()
    stats = gw.read_stats(log_dir)
    assert sorted(set(stats.step)) == list(range(1, STEPS + 1))
    for number, step_norms in enumerate(norms, start=1):
        rows = stats[stats.step == number]
        assert len(rows) == len(step_norms)
        for row, expected in zip(rows.itertuples(), step_norms):
            assert row.l2 == pytest.approx(expected, rel=2e-4, abs=1e-7), (number, row.variable)


def test_nested_dead_units_are_read_from_the_layer_that_really_follows(tmp_path):
    """12 of 16 ReLU units of the middle layer of a Sequential wrapped in a subclassed
    model are dead: the evidence comes from the next layer in the forward pass."""
    keras.utils.set_random_seed(0)
    x, y = _mlp_data(n=B * 40)
    model = Wrapped()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    log_dir = str(tmp_path / "nested")
    monitor = gw.GradientMonitor(log_dir, log_every=10, histogram_every=0,
                                 thresholds=gw.Thresholds(dead_steps=10))
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert [layer.name for layer in monitor.topology.layers] == ["first", "dead", "last"]
    layers = gw.read_stats(log_dir, level="layer")
    last = layers[layers.step == layers.step.max()].set_index("layer")
    assert last.loc["dead", "dead_frac"] == pytest.approx(12 / 16)
    alerts = gw.read_alerts(log_dir)
    assert "dead_relu" in set(alerts[alerts.layer == "dead"].kind)
    assert "no_learning_signal" not in set(alerts[alerts.layer == "dead"].kind)


def test_layer_names_tell_blocks_apart_and_stay_short_where_unique(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _token_data()
    model = transformer()
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    monitor = gw.GradientMonitor(str(tmp_path / "t"), log_every=1, histogram_every=0)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    names = [layer.name for layer in monitor.topology.layers]
    assert names[0] == "embed" and names[-1] == "classify"
    assert "block_a/attention/key" in names and "block_b/attention/key" in names
    assert "block_a/ffn" in names and "key" not in names
    assert len(set(names)) == len(names)


def test_an_unbuilt_subclassed_model_in_a_custom_loop_is_watched_in_call_order(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _mlp_data()
    model = Wrapped()
    optimizer = keras.optimizers.SGD(0.01)
    watch = gw.Watch(str(tmp_path / "w"), log_every=1, histogram_every=0, model=model)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = watch.observe(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for start in range(0, B * STEPS, B):
        step(x[start:start + B], y[start:start + B])
        watch.step_end()
    watch.close()
    assert [layer.name for layer in watch.topology.layers] == ["first", "dead", "last"]
    assert [layer.activation for layer in watch.topology.layers] == ["relu", "relu", "linear"]
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())


def test_a_gan_in_a_custom_loop_watches_the_critic_in_order(tmp_path):
    keras.utils.set_random_seed(0)
    generator = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Dense(8, activation="relu", name="g_hidden"),
                                  keras.layers.Dense(6, name="g_out")], name="generator")
    critic = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="c_hidden"),
                               keras.layers.LeakyReLU(name="c_act"), keras.layers.Dense(1, name="c_out")],
                              name="critic")
    g_opt, c_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
    real = _mlp_data()[0]
    c_watch = gw.Watch(str(tmp_path / "critic"), log_every=1, histogram_every=0, model=critic)
    g_watch = gw.Watch(str(tmp_path / "generator"), log_every=1, histogram_every=0, model=generator)
    noise = tf.random.normal((B, 4), seed=1)
    for start in range(0, B * STEPS, B):
        with tf.GradientTape() as tape:
            c_loss = tf.reduce_mean(critic(generator(noise))) - tf.reduce_mean(critic(real[start:start + B]))
        grads = tape.gradient(c_loss, critic.trainable_variables)
        grads = c_watch.observe(grads, critic.trainable_variables)
        c_opt.apply_gradients(zip(grads, critic.trainable_variables))
        c_watch.step_end()
        with tf.GradientTape() as tape:
            g_loss = -tf.reduce_mean(critic(generator(noise)))
        grads = tape.gradient(g_loss, generator.trainable_variables)
        g_opt.apply_gradients(zip(g_watch.observe(grads, generator.trainable_variables),
                                  generator.trainable_variables))
        g_watch.step_end()
    c_watch.close()
    g_watch.close()
    assert [(layer.name, layer.activation) for layer in c_watch.topology.layers] == [
        ("c_hidden", "leaky_relu"), ("c_out", "linear")]
    assert [layer.name for layer in g_watch.topology.layers] == ["g_hidden", "g_out"]
    assert len(gw.read_windows(str(tmp_path / "critic"))) == STEPS


@pytest.mark.fast
def test_without_a_trace_the_functional_graph_gives_what_follows_each_layer():
    """Under a distribution strategy the monitor binds before any trace: the activation
    that follows a layer still comes from the functional model's edges, not the list."""
    from gradwatch._capture import model_topology

    model = two_branch()
    layers = model_topology.from_model(model, model.trainable_variables).layers
    assert {layer.name: layer.activation for layer in layers} == {
        "branch_a": "relu", "branch_b_in": "linear", "branch_b": "tanh", "out": "linear"}


@pytest.mark.fast
def test_a_layer_counts_as_relu_only_if_every_path_reaches_a_relu_first():
    from gradwatch._capture import model_topology

    inputs = keras.Input((6,))
    shared = keras.layers.Dense(8, name="shared")(inputs)
    through_relu = keras.layers.Dense(4, name="after_relu")(keras.layers.ReLU(name="relu")(shared))
    raw = keras.layers.Dense(4, name="raw")(shared)  # a second consumer, with no ReLU between
    normed = keras.layers.Dense(8, name="normed")(inputs)
    normed = keras.layers.ReLU(name="relu2")(keras.layers.BatchNormalization(name="bn")(normed))
    merged = keras.layers.Concatenate()([through_relu, raw, normed])
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(merged))
    following = {layer.name: layer.activation
                 for layer in model_topology.from_model(model, model.trainable_variables).layers}
    assert following["shared"] == "linear"
    assert following["bn"] == "relu"  # through BatchNormalization to the ReLU


def test_a_critic_output_bias_without_gradient_is_not_silent_when_its_kernel_learns(tmp_path):
    """A WGAN-style critic loss, mean(D(fake)) - mean(D(real)), gives the output Dense(1)
    bias an exactly-zero gradient by construction while its kernel learns."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B * 30, 6)).astype("float32")
    sign = np.tile(np.r_[np.ones(B // 2), -np.ones(B // 2)], 30).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="critic_out")])
    model.compile(keras.optimizers.SGD(0.01), lambda s, d: tf.reduce_mean(s * d))
    log_dir = str(tmp_path / "critic")
    monitor = gw.GradientMonitor(log_dir, log_every=5, histogram_every=0,
                                 thresholds=gw.Thresholds(dead_steps=10))
    model.fit(x, sign, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    stats = gw.read_stats(log_dir).set_index(["step", "variable"])
    last = stats.index.get_level_values("step").max()
    assert stats.loc[(last, "critic_out/bias"), "l2"] == 0.0  # the premise: zero by construction
    assert stats.loc[(last, "critic_out/kernel"), "l2"] > 1e-3
    layers = gw.read_stats(log_dir, level="layer").set_index(["step", "layer"])
    assert layers.loc[(last, "critic_out"), "no_signal_frac"] == 0.0
    assert "no_learning_signal" not in set(gw.read_alerts(log_dir).kind)

