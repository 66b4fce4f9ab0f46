"""Detectors on a corpus of real architectures: per-kind precision and recall, steps to detect.

Two modes, each run against the current tree or an earlier revision (``--baseline REV``,
loaded by ``benchmarks/baseline.py`` as ``gradwatch_base``):

* ``--mode detect`` (default): a corpus of small real architectures on synthetic data
  (a transformer block with Embedding + MultiHeadAttention + LayerNormalization under
  Adam, wide & deep with an Embedding, a small CNN, an LSTM, a subclassed residual MLP),
  their broken variants (dead units from step 1, a deep sigmoid stack, exploding,
  non-finite input, gradients swapped between two small kernels in a raw-variable loop,
  learning rate far too small / too large) and the labelled scenarios of
  ``tests/scenarios/scenarios.py``.  Every run is short (a few epochs of a few dozen
  steps).  Prints per-kind precision and recall and each broken run's first step of
  the kind it must raise (its steps-to-detect).
  Part 2's models with their own optimizers are in it too: a DCGAN, a WGAN-GP (critic
  applied 3 times a batch, gradient penalty) and the WGAN-GP with NaN input rows.
* ``--mode healthy-long``: each of the five healthy architectures and the two GANs for
  ``--steps`` steps (2,000); any warning or error is a false alarm.  ``--only NAME``
  runs the runs whose name holds NAME.

Results go to ``benchmarks/results/corpus-<mode>-<label>.json``.

Usage::

    python benchmarks/corpus.py --mode detect --label after
    python benchmarks/corpus.py --mode detect --baseline 267282a --label before
    python benchmarks/corpus.py --mode healthy-long --steps 2000 --label after
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

KINDS = ("vanishing_gradient", "exploding_gradient", "dead_relu", "nonfinite_gradient", "no_gradient",
         "update_ratio", "update_mismatch", "no_learning_signal")
B = 16  # batch size


@dataclasses.dataclass
class Case:
    name: str
    run: Callable[..., None]  # (gw, log_dir, steps) -> None
    must: dict[str, str]  # kind -> the layer it must name ("" : any layer)
    may: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- data


def _rng(seed=0):
    return np.random.default_rng(seed)


def _noisy(y, seed):
    """10% of the labels flipped, as in real data: a noise-free toy task is fit to a loss of
    ~1e-4 within 2,000 steps, after which the gradients fall below Adam's epsilon and the
    weights really do stop (an update_ratio / vanishing alert that is then right)."""
    flip = _rng(seed + 100).random(len(y)) < 0.1
    return np.where(flip[:, None], 1.0 - y, y).astype("float32")


def _tabular(n, features=12, seed=0):
    rng = _rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x @ rng.normal(size=(features, 1)) > 0).astype("float32")
    return x, _noisy(y, seed)


def _tokens(n, length=8, vocab=40, seed=1):
    rng = _rng(seed)
    x = rng.integers(1, vocab, (n, length)).astype("int32")
    return x, _noisy(((x % 2).sum(axis=1) > length // 2).astype("float32")[:, None], seed)


def _images(n, seed=2):
    rng = _rng(seed)
    x = rng.normal(size=(n, 10, 10, 1)).astype("float32")
    y = (x[:, :5].mean(axis=(1, 2, 3)) > x[:, 5:].mean(axis=(1, 2, 3))).astype("float32")[:, None]
    return x, _noisy(y, seed)


def _sequences(n, seed=3):
    rng = _rng(seed)
    x = rng.normal(size=(n, 8, 3)).astype("float32")
    return x, _noisy((x[:, :, 0].sum(axis=1) > 0).astype("float32")[:, None], seed)


# ------------------------------------------------------------------------- models


class TransformerBlock(keras.layers.Layer):
    def __init__(self, dim=16, heads=2, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads, name="attention")
        self.norm1 = keras.layers.LayerNormalization(name="norm1")
        self.ffn = keras.layers.Dense(dim, activation="relu", name="ffn")
        self.norm2 = keras.layers.LayerNormalization(name="norm2")

    def call(self, x):
        x = self.norm1(x + self.attention(x, x))
        return self.norm2(x + self.ffn(x))


def transformer():
    inputs = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(40, 16, name="embed")(inputs)
    h = TransformerBlock(name="block")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="out")(h)), _tokens


def wide_deep():
    tokens = keras.Input((8,), dtype="int32")
    deep = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(40, 6, name="embed")(tokens))
    deep = keras.layers.Dense(16, activation="relu", name="deep1")(deep)
    wide = keras.layers.Dense(1, name="wide")(keras.layers.CategoryEncoding(40, "multi_hot")(tokens))
    out = keras.layers.Dense(1, name="deep_out")(deep)
    logits = keras.layers.Add()([wide, out])
    return keras.Model(tokens, keras.layers.Activation("sigmoid")(logits)), _tokens


def cnn(bias=0.0):
    return keras.Sequential([
        keras.Input((10, 10, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv1",
                            bias_initializer=keras.initializers.Constant(bias)),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ]), _images


def lstm():
    return keras.Sequential([
        keras.Input((8, 3)), keras.layers.LSTM(12, name="lstm"),
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ]), _sequences


class ResidualMLP(keras.Model):
    def __init__(self, width=24, blocks=3, activation="relu", init=None, bias=0.0):
        super().__init__()
        kwargs = {"kernel_initializer": init} if init is not None else {}
        self.stem = keras.layers.Dense(width, activation=activation, name="stem",
                                       bias_initializer=keras.initializers.Constant(bias), **kwargs)
        self.blocks = [keras.layers.Dense(width, activation=activation, name=f"res{i}", **kwargs)
                       for i in range(blocks)]
        self.head = keras.layers.Dense(1, activation="sigmoid", name="head")

    def call(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def residual():
    return ResidualMLP(), _tabular


def deep_sigmoid():
    layers = [keras.Input((12,))]
    layers += [keras.layers.Dense(16, activation="sigmoid", name=f"s{i}") for i in range(10)]
    layers += [keras.layers.Dense(1, activation="sigmoid", name="out")]
    return keras.Sequential(layers), _tabular


def dead_mlp():
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(32, activation="relu", name="dead",
                           bias_initializer=keras.initializers.Constant(-20.0)),
        keras.layers.Dense(16, activation="relu", name="after"),
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ]), _tabular


# -------------------------------------------------------------------------- runs


def _fit(gw, build, log_dir, steps, optimizer=None, epochs=3, poison=None, **monitor):
    keras.utils.set_random_seed(0)
    model, data = build()
    x, y = data(B * max(1, steps // epochs))
    if poison is not None:
        poison(x)
    model.compile(optimizer or keras.optimizers.Adam(1e-3), "binary_crossentropy")
    monitor.setdefault("log_every", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=B, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[gw.GradientMonitor(log_dir, **monitor)])


# --------------------------------------------------------------------------- GANs


class WGANGP(keras.Model):
    """keras-io's WGAN-GP on vectors: a linear-output critic applied ``critic_steps`` times a
    batch with its own optimizer, a gradient penalty from a nested tape, then the generator."""

    def __init__(self, critic_steps=3, latent=4):
        super().__init__()
        self.critic = keras.Sequential([
            keras.Input((2,)), keras.layers.Dense(32, name="c_hidden"),
            keras.layers.LeakyReLU(negative_slope=0.2, name="c_act"), keras.layers.Dense(1, name="c_out")],
            name="critic")
        self.generator = keras.Sequential([
            keras.Input((latent,)), keras.layers.Dense(32, activation="relu", name="g_hidden"),
            keras.layers.Dense(2, name="g_out")], name="generator")
        self.critic_steps, self.latent = critic_steps, latent

    def compile(self, c_optimizer, g_optimizer):
        super().compile()
        self.c_optimizer, self.g_optimizer = c_optimizer, g_optimizer

    def _penalty(self, real, fake):
        alpha = tf.random.uniform([tf.shape(real)[0], 1])
        mixed = real + alpha * (fake - real)
        with tf.GradientTape() as tape:
            tape.watch(mixed)
            score = self.critic(mixed)
        norm = tf.norm(tape.gradient(score, mixed), axis=1)
        return tf.reduce_mean(tf.square(norm - 1.0))

    def train_step(self, data):
        real, noise = data
        for _ in range(self.critic_steps):
            with tf.GradientTape() as tape:
                fake = self.generator(noise)
                c_loss = (tf.reduce_mean(self.critic(fake)) - tf.reduce_mean(self.critic(real))
                          + 10.0 * self._penalty(real, fake))
            grads = tape.gradient(c_loss, self.critic.trainable_weights)
            self.c_optimizer.apply_gradients(zip(grads, self.critic.trainable_weights))
        with tf.GradientTape() as tape:
            g_loss = -tf.reduce_mean(self.critic(self.generator(noise)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        return {"c_loss": c_loss, "g_loss": g_loss}


def _ring(n, seed=5, latent=4):
    rng = _rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    real = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype("float32")
    return real, rng.normal(size=(n, latent)).astype("float32")


def _fit_gan(gw, kind, log_dir, steps, epochs=3, poison=None):
    """A DCGAN (``examples/gan_fit.py``) or a WGAN-GP fitted with ``GradientMonitor`` (the
    monitor finds both optimizers among the model's attributes)."""
    from examples.gan_fit import GAN

    keras.utils.set_random_seed(0)
    real, noise = _ring(B * max(1, steps // epochs))
    if poison is not None:
        poison(real)
    if kind == "dcgan":
        model = GAN()
        model.compile(d_optimizer=keras.optimizers.Adam(1e-3), g_optimizer=keras.optimizers.Adam(1e-3))
    else:
        model = WGANGP()
        model.compile(keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9),
                      keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(real, noise, batch_size=B, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[gw.GradientMonitor(log_dir, log_every=10)])


def _swapped_raw(gw, log_dir, steps):
    """A raw-variable loop whose two 6x6 kernels get each other's gradient (Watch)."""
    rng = _rng(4)
    x, y = _tabular(B * steps, features=6)
    k1 = tf.Variable(rng.normal(size=(6, 6)).astype("float32") * 0.4, name="k1")
    b1 = tf.Variable(np.zeros(6, np.float32), name="b1")
    k2 = tf.Variable(rng.normal(size=(6, 6)).astype("float32") * 0.4, name="k2")
    b2 = tf.Variable(np.zeros(6, np.float32), name="b2")
    k3 = tf.Variable(rng.normal(size=(6, 1)).astype("float32") * 0.4, name="k3")
    variables = [k1, b1, k2, b2, k3]
    names = ["h1/kernel", "h1/bias", "h2/kernel", "h2/bias", "out/kernel"]
    watch = gw.Watch(log_dir, log_every=10, names=names)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            h = tf.nn.tanh(xb @ k1 + b1)
            h = tf.nn.tanh(h @ k2 + b2)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(yb, h @ k3))
        grads = watch.observe(tape.gradient(loss, variables), variables, loss=loss)
        swapped = [grads[2], grads[1], grads[0], grads[3], grads[4]]  # the bug
        for v, g in zip(variables, swapped):
            v.assign_sub(0.1 * g)

    with watch:
        for i in range(steps):
            step(tf.constant(x[i * B:(i + 1) * B]), tf.constant(y[i * B:(i + 1) * B]))
            watch.step_end()


def _nan_rows(x):
    x[5 * B:6 * B] = np.nan


def corpus(steps: int) -> list[Case]:
    """The labelled runs of ``--mode detect`` (``steps`` steps each, in 3 epochs)."""
    explode_may = frozenset({"nonfinite_gradient", "update_ratio", "dead_relu", "no_learning_signal"})
    return [
        Case("transformer", lambda gw, d, s: _fit(gw, transformer, d, s), {}),
        Case("wide_deep", lambda gw, d, s: _fit(gw, wide_deep, d, s), {}),
        Case("cnn", lambda gw, d, s: _fit(gw, cnn, d, s), {}),
        Case("lstm", lambda gw, d, s: _fit(gw, lstm, d, s), {}),
        Case("residual", lambda gw, d, s: _fit(gw, residual, d, s), {}),
        Case("dead_mlp", lambda gw, d, s: _fit(gw, dead_mlp, d, s), {"dead_relu": "dead"},
             frozenset({"no_learning_signal"})),
        Case("dead_cnn", lambda gw, d, s: _fit(gw, lambda: cnn(bias=-30.0), d, s), {"dead_relu": "conv1"},
             frozenset({"no_learning_signal"})),
        Case("dead_residual", lambda gw, d, s: _fit(gw, lambda: (ResidualMLP(bias=-30.0), _tabular), d, s),
             {"dead_relu": "stem"}, frozenset({"no_learning_signal"})),
        Case("deep_sigmoid", lambda gw, d, s: _fit(gw, deep_sigmoid, d, s, keras.optimizers.SGD(0.01)),
             {"vanishing_gradient": ""}, frozenset({"update_ratio"})),
        Case("exploding_residual", lambda gw, d, s: _fit(
            gw, lambda: (ResidualMLP(activation="linear", init=keras.initializers.RandomNormal(stddev=3.0)),
                         _tabular), d, s, keras.optimizers.SGD(0.1)),
             {"exploding_gradient": ""}, explode_may),
        # NaN weights make conv1's ReLU output 0 from then on: its units are dead, conv2 gets no signal
        Case("nan_input_cnn", lambda gw, d, s: _fit(gw, cnn, d, s, poison=_nan_rows),
             {"nonfinite_gradient": ""}, frozenset({"dead_relu", "no_learning_signal"})),
        Case("swapped_raw", _swapped_raw, {"update_mismatch": ""}),
        Case("lr_tiny_lstm", lambda gw, d, s: _fit(gw, lstm, d, s, keras.optimizers.SGD(1e-6)),
             {"update_ratio": ""}, frozenset({"vanishing_gradient"})),
        Case("lr_huge_transformer", lambda gw, d, s: _fit(gw, transformer, d, s, keras.optimizers.Adam(1.0)),
             {"update_ratio": ""}, explode_may | {"exploding_gradient", "vanishing_gradient"}),
        # part 2's models with their own optimizers (a model.fit batch applies two or four times)
        Case("dcgan", lambda gw, d, s: _fit_gan(gw, "dcgan", d, s), {}),
        Case("wgan_gp", lambda gw, d, s: _fit_gan(gw, "wgan_gp", d, s), {}),
        Case("nan_input_wgan_gp", lambda gw, d, s: _fit_gan(gw, "wgan_gp", d, s, poison=_nan_rows),
             {"nonfinite_gradient": ""}, frozenset({"dead_relu", "no_learning_signal"})),
    ]


HEALTHY = {"transformer": transformer, "wide_deep": wide_deep, "cnn": cnn, "lstm": lstm, "residual": residual}


# ------------------------------------------------------------------------ scoring


def _alerts(gw, log_dir):
    alerts = gw.read_alerts(log_dir)
    return alerts[alerts["severity"].isin(["warning", "error"])]


def judge(gw, log_dir, must: dict[str, str]) -> dict:
    """The kinds a run raised, and each must-kind's first step (at the right layer)."""
    alerts = _alerts(gw, log_dir)
    raised = sorted(set(alerts["kind"]))
    first = {}
    for kind, layer in must.items():
        rows = alerts[(alerts["kind"] == kind) & ((alerts["layer"] == layer) if layer else True)]
        first[kind] = int(rows["step"].min()) if len(rows) else None
    messages = [f"{r.step} {r.kind} {r.layer}: {r.message}" for r in alerts.itertuples()][:12]
    return {"raised": raised, "first_step": first, "messages": messages}


def score(results: list[dict]) -> dict[str, dict]:
    """Per kind: tp (must-kind raised at its layer), fn, fp (raised where neither must nor may)."""
    table = {}
    for kind in KINDS:
        tp = fp = fn = 0
        for r in results:
            if kind in r["must"]:
                hit = r["first_step"].get(kind) is not None
                tp, fn = tp + hit, fn + (not hit)
            elif kind in r["raised"] and kind not in r["may"]:
                fp += 1
        table[kind] = {"tp": tp, "fp": fp, "fn": fn,
                       "precision": round(tp / (tp + fp), 3) if tp + fp else None,
                       "recall": round(tp / (tp + fn), 3) if tp + fn else None}
    return table


def _scenario_results(gw, root) -> list[dict]:
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
    from scenarios import scenarios as suite

    suite.gw = gw  # the scenarios call the package under test
    out = []
    for scenario in suite.SCENARIOS:
        log_dir = os.path.join(root, "scenario_" + scenario.name)
        began = time.perf_counter()
        scenario.run(log_dir, 1)
        result = judge(gw, log_dir, {kind: "" for kind in scenario.must})
        out.append({"name": "scenario:" + scenario.name, "must": sorted(scenario.must),
                    "may": sorted(scenario.may), "seconds": round(time.perf_counter() - began, 1), **result})
        print(f"  {out[-1]['name']:34s} {result['first_step']} raised={result['raised']}", flush=True)
    return out


def detect(gw, root, steps, scenarios=True, only=None) -> dict:
    results = []
    for case in corpus(steps):
        if only and only not in case.name:
            continue
        log_dir = os.path.join(root, case.name)
        began = time.perf_counter()
        case.run(gw, log_dir, steps)
        result = judge(gw, log_dir, case.must)
        results.append({"name": case.name, "must": sorted(case.must), "may": sorted(case.may),
                        "seconds": round(time.perf_counter() - began, 1), **result})
        print(f"  {case.name:34s} {result['first_step']} raised={result['raised']}", flush=True)
    scenario_results = _scenario_results(gw, root) if scenarios else []
    return {"corpus": results, "corpus_score": score(results),
            "scenarios": scenario_results, "scenario_score": score(scenario_results)}


def healthy_long(gw, root, steps, only=None) -> dict:
    out = {}
    runs = {**{name: (lambda d, build=build: _fit(gw, build, d, steps, epochs=10))
               for name, build in HEALTHY.items()},
            **{name: (lambda d, name=name: _fit_gan(gw, name, d, steps, epochs=10))
               for name in ("dcgan", "wgan_gp")}}
    for name, run in runs.items():
        if only and only not in name:
            continue
        log_dir = os.path.join(root, "long_" + name)
        began = time.perf_counter()
        run(log_dir)
        alerts = _alerts(gw, log_dir)
        out[name] = {"steps": steps, "seconds": round(time.perf_counter() - began, 1),
                     "alerts": [f"{r.step} {r.kind} {r.layer}: {r.message}" for r in alerts.itertuples()]}
        print(f"  {name:14s} {len(alerts)} alerts in {out[name]['seconds']} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("detect", "healthy-long"), default="detect")
    parser.add_argument("--baseline", default=None, help="git revision to run instead of the tree")
    parser.add_argument("--label", default="after")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (detect 60, long 2000)")
    parser.add_argument("--no-scenarios", action="store_true")
    parser.add_argument("--only", default=None, help="only the runs whose name holds this")
    args = parser.parse_args()
    if args.baseline:
        import baseline

        gw = baseline.load(args.baseline)
    else:
        import gradwatch as gw
    root = tempfile.mkdtemp(prefix="gradwatch_corpus_")
    began = time.perf_counter()
    if args.mode == "detect":
        result = detect(gw, root, args.steps or 60, scenarios=not args.no_scenarios, only=args.only)
        for part in ("corpus_score", "scenario_score"):
            print(part)
            for kind, row in result[part].items():
                print(f"  {kind:22s} precision {row['precision']}  recall {row['recall']}  "
                      f"tp {row['tp']} fp {row['fp']} fn {row['fn']}")
    else:
        result = healthy_long(gw, root, args.steps or 2000, only=args.only)
    result = {"mode": args.mode, "revision": args.baseline or "working tree", "label": args.label,
              "seconds": round(time.perf_counter() - began, 1), "tf": tf.__version__,
              "keras": keras.__version__, **result}
    path = os.path.join(_HERE, "results", f"corpus-{args.mode}-{args.label}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print("wrote", path, f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
