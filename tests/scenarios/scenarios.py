"""A labelled suite of small training runs: the alert kinds each must and must not raise.

Every scenario trains a tiny network for a few hundred steps on synthetic data
(seconds on 2 CPU cores) with gradwatch's default thresholds, and returns its
log directory.  ``MUST`` lists the kinds a scenario has to raise (warning or
error); every other kind counts as a false alarm, except the kinds listed in
``MAY`` with the reason they are acceptable there.

Run the whole suite with other seeds (reported, not gated):
``python tests/scenarios/scenarios.py --seeds 1 2 3``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

import gradwatch as gw
from gradwatch._io.schema import ALERT_KINDS


@dataclasses.dataclass
class Scenario:
    name: str
    run: Callable[[str, int], None]  # (log_dir, seed)
    must: frozenset[str]
    may: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> why it is acceptable


def _data(seed: int, n: int = 2048, features: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, 1)).astype("float32")
    y = (x @ w > 0).astype("float32")
    return x, y


def _fit(model, optimizer, log_dir, x, y, epochs=4, batch_size=32, loss="binary_crossentropy", **monitor):
    model.compile(optimizer, loss)
    monitor.setdefault("log_every", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[gw.GradientMonitor(log_dir, **monitor)])


def _mlp(units=(64, 32), activation="relu", features=20, out_activation="sigmoid", **dense):
    layers = [keras.Input((features,))]
    layers += [keras.layers.Dense(u, activation=activation, **dense) for u in units]
    layers += [keras.layers.Dense(1, activation=out_activation)]
    return keras.Sequential(layers)


# ----------------------------------------------------------------- healthy


def healthy_mlp_adam(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    _fit(_mlp(), keras.optimizers.Adam(1e-3), log_dir, x, y)


def healthy_mlp_sgd(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    _fit(_mlp(), keras.optimizers.SGD(0.05), log_dir, x, y)


def healthy_mlp_momentum(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    _fit(_mlp(), keras.optimizers.SGD(0.01, momentum=0.9), log_dir, x, y)


def healthy_mlp_rmsprop(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    _fit(_mlp(), keras.optimizers.RMSprop(1e-3), log_dir, x, y)


def healthy_cnn(log_dir, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1024, 12, 12, 1)).astype("float32")
    y = (x[:, :6].mean(axis=(1, 2, 3)) > x[:, 6:].mean(axis=(1, 2, 3))).astype("float32")[:, None]
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    _fit(model, keras.optimizers.Adam(1e-3), log_dir, x, y, epochs=6)


def healthy_lstm(log_dir, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1024, 10, 4)).astype("float32")
    y = (x[:, :, 0].sum(axis=1) > 0).astype("float32")[:, None]
    model = keras.Sequential([
        keras.Input((10, 4)), keras.layers.LSTM(16), keras.layers.Dense(1, activation="sigmoid"),
    ])
    _fit(model, keras.optimizers.Adam(3e-3), log_dir, x, y, epochs=6)


def healthy_residual(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    inputs = keras.Input((20,))
    h = keras.layers.Dense(32, activation="relu")(inputs)
    for _ in range(4):
        branch = keras.layers.Dense(32, activation="relu")(h)
        branch = keras.layers.Dense(32)(branch)
        h = keras.layers.Activation("relu")(keras.layers.Add()([h, branch]))
    outputs = keras.layers.Dense(1, activation="sigmoid")(h)
    _fit(keras.Model(inputs, outputs), keras.optimizers.Adam(1e-3), log_dir, x, y)


def healthy_batchnorm(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(64, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(32, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    _fit(model, keras.optimizers.Adam(1e-3), log_dir, x, y)


# ------------------------------------------------------------------ broken


def deep_sigmoid(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed, features=16)
    model = _mlp(units=(16,) * 12, activation="sigmoid", features=16)
    _fit(model, keras.optimizers.SGD(0.01), log_dir, x, y, epochs=2)


def large_learning_rate(log_dir, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(640, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 5).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    _fit(model, keras.optimizers.SGD(0.2), log_dir, x, y, epochs=2, batch_size=16, loss="mse", log_every=2)


def large_init(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    y = x[:, :1] * 3.0
    init = keras.initializers.RandomNormal(stddev=3.0, seed=seed)
    model = _mlp(units=(64, 64, 64), out_activation=None, kernel_initializer=init)
    _fit(model, keras.optimizers.SGD(1e-3), log_dir, x, y, epochs=1, loss="mse")


def dead_relu_bias(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    model = _mlp(units=(64, 32), bias_initializer=keras.initializers.Constant(-6.0))
    _fit(model, keras.optimizers.Adam(1e-3), log_dir, x, y, epochs=5)


def dead_relu_l2(log_dir, seed):
    """Dead units under an L2 kernel regulariser: the kernel gradient is never zero."""
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    model = _mlp(units=(64,), bias_initializer=keras.initializers.Constant(-6.0),
                 kernel_regularizer=keras.regularizers.L2(1e-3))
    _fit(model, keras.optimizers.Adam(1e-3), log_dir, x, y, epochs=5)


class _Pruned(keras.constraints.Constraint):
    """Keeps a layer's kernel at zero after every update (all its weights pruned)."""

    def __call__(self, w):
        return w * 0.0


def pruned_outgoing(log_dir, seed):
    """Live ReLU units whose outgoing weights are pruned to zero: they never get a gradient."""
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid", kernel_initializer="zeros", kernel_constraint=_Pruned()),
    ])
    _fit(model, keras.optimizers.Adam(1e-3), log_dir, x, y, epochs=5)


NAN_STEP = 37  # the step (1-based) whose batch holds a NaN input


def nan_in_data(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    x[(NAN_STEP - 1) * 32 + 5, 3] = np.nan
    _fit(_mlp(), keras.optimizers.Adam(1e-3), log_dir, x, y, epochs=1, on_nonfinite="skip_step")


def unused_variable(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    rng = np.random.default_rng(seed)
    w = tf.Variable(rng.normal(size=(20, 1)).astype("float32") * 0.1, name="w")
    b = tf.Variable([0.0], name="b")
    unused = tf.Variable(np.ones((4, 4), np.float32), name="unused")
    variables = [w, b, unused]
    optimizer = keras.optimizers.SGD(0.1)
    with gw.Watch(log_dir, log_every=10, names=["w", "b", "unused"]) as watch:
        for i in range(0, 2048, 32):
            xb, yb = tf.constant(x[i:i + 32]), tf.constant(y[i:i + 32])
            with tf.GradientTape() as tape:
                logits = xb @ w + b
                loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(yb, logits))
            grads = watch.observe(tape.gradient(loss, variables), variables)
            optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            watch.step_end(float(loss))


def wrong_zip(log_dir, seed):
    """A hand-written loop that applies each hidden kernel's gradient to the other one."""
    keras.utils.set_random_seed(seed)
    x, y = _data(seed, features=32)
    model = _mlp(units=(32, 32), features=32)
    model.build((None, 32))
    variables = model.trainable_variables
    k1, k2 = variables[0], variables[2]
    assert k1.shape == k2.shape == (32, 32)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(yb, model(xb, training=True)))
        grads = watch.observe(tape.gradient(loss, variables), variables)
        swapped = list(grads)
        swapped[0], swapped[2] = grads[2], grads[0]  # the bug
        for v, g in zip(variables, swapped):
            v.assign_sub(0.05 * g)
        return loss

    with gw.Watch(log_dir, log_every=10, model=model) as watch:
        for _ in range(7):  # 448 steps (kept as it was for the before/after benchmark)
            for i in range(0, 2048, 32):
                step(tf.constant(x[i:i + 32]), tf.constant(y[i:i + 32]))
                watch.step_end()


def lr_too_small(log_dir, seed):
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    _fit(_mlp(), keras.optimizers.SGD(5e-5), log_dir, x, y)


def log_of_negative(log_dir, seed):
    """A custom loss takes the log of a value that turns negative: the loss itself is NaN."""
    keras.utils.set_random_seed(seed)
    x, y = _data(seed)
    x[(NAN_STEP - 1) * 32:NAN_STEP * 32] *= 50.0

    def bad_loss(y_true, y_pred):
        return tf.reduce_mean(tf.math.log(1.0 - 10.0 * tf.abs(y_pred - y_true)) ** 2)

    _fit(_mlp(out_activation="tanh"), keras.optimizers.SGD(1e-3), log_dir, x, y, epochs=1, loss=bad_loss,
         on_nonfinite="skip_step")


_EXPLODE_MAY = {
    "nonfinite_gradient": "the exploding run goes on to NaN",
    "update_ratio": "huge steps relative to the weights are what exploding means",
    "dead_relu": "diverging ReLU nets kill units on the way",
    "no_learning_signal": "after the blow-up, layers fed by dead units get no signal",
}

SCENARIOS: list[Scenario] = [
    Scenario("healthy_mlp_adam", healthy_mlp_adam, frozenset()),
    Scenario("healthy_mlp_sgd", healthy_mlp_sgd, frozenset()),
    Scenario("healthy_mlp_momentum", healthy_mlp_momentum, frozenset()),
    Scenario("healthy_mlp_rmsprop", healthy_mlp_rmsprop, frozenset()),
    Scenario("healthy_cnn", healthy_cnn, frozenset()),
    Scenario("healthy_lstm", healthy_lstm, frozenset()),
    Scenario("healthy_residual", healthy_residual, frozenset()),
    Scenario("healthy_batchnorm", healthy_batchnorm, frozenset()),
    Scenario("deep_sigmoid", deep_sigmoid, frozenset({"vanishing_gradient"}),
             {"update_ratio": "the vanishing layers barely move: that is the symptom"}),
    Scenario("large_learning_rate", large_learning_rate, frozenset({"exploding_gradient"}), _EXPLODE_MAY),
    Scenario("large_init", large_init, frozenset({"exploding_gradient"}), _EXPLODE_MAY),
    Scenario("dead_relu_bias", dead_relu_bias, frozenset({"dead_relu"}),
             {"no_learning_signal": "the output layer is fed by dead units only"}),
    Scenario("dead_relu_l2", dead_relu_l2, frozenset({"dead_relu"}),
             {"no_learning_signal": "the output layer is fed by dead units only"}),
    Scenario("pruned_outgoing", pruned_outgoing, frozenset({"no_learning_signal"}),
             {"update_ratio": "the pruned layer's kernel never moves (its bias does)"}),
    Scenario("nan_in_data", nan_in_data, frozenset({"nonfinite_gradient"})),
    Scenario("log_of_negative", log_of_negative, frozenset({"nonfinite_gradient"})),
    Scenario("unused_variable", unused_variable, frozenset({"no_gradient"})),
    Scenario("wrong_zip", wrong_zip, frozenset({"update_mismatch"})),
    Scenario("lr_too_small", lr_too_small, frozenset({"update_ratio"})),
]


def raised_kinds(log_dir: str) -> set[str]:
    alerts = gw.read_alerts(log_dir)
    return set(alerts.loc[alerts["severity"].isin(["warning", "error"]), "kind"])


def score(results: dict[str, set[str]]) -> dict[str, dict[str, float]]:
    """Per kind: precision, recall and counts over the suite (``results``: scenario -> kinds raised)."""
    by_name = {s.name: s for s in SCENARIOS}
    table = {}
    for kind in ALERT_KINDS:
        tp = fp = fn = 0
        for name, raised in results.items():
            scenario = by_name[name]
            if kind in scenario.must:
                tp += kind in raised
                fn += kind not in raised
            elif kind in raised and kind not in scenario.may:
                fp += 1
        table[kind] = {
            "tp": tp, "fp": fp, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0,
        }
    return table


def run_suite(root: str, seed: int, names: list[str] | None = None) -> dict[str, set[str]]:
    results = {}
    for scenario in SCENARIOS:
        if names and scenario.name not in names:
            continue
        log_dir = os.path.join(root, f"seed{seed}", scenario.name)
        scenario.run(log_dir, seed)
        results[scenario.name] = raised_kinds(log_dir)
    return results


def format_score(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'kind':22s} {'precision':>9s} {'recall':>7s}  tp fp fn"]
    for kind, row in table.items():
        lines.append(f"{kind:22s} {row['precision']:9.2f} {row['recall']:7.2f}  "
                     f"{row['tp']:2d} {row['fp']:2d} {row['fn']:2d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="gradwatch_scenarios_")
    for seed in args.seeds:
        results = run_suite(root, seed, args.only)
        print(f"seed {seed}:")
        for name, raised in results.items():
            print(f"  {name:22s} {sorted(raised)}")
        print(format_score(score(results)))


if __name__ == "__main__":
    main()
