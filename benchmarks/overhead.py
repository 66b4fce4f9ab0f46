"""Overhead of gradwatch vs plain ``model.fit``, measured side by side in one process.

For every model, configurations are run interleaved for ``--reps`` repetitions,
each repetition starting one configuration later than the last (plain, gradwatch,
clip, ...; then gradwatch, clip, ..., plain), so no configuration always runs first
or right after the same neighbour; after each run the model is dropped
(``keras.backend.clear_session``, ``gc.collect``). Each run times every training
step with a callback and keeps the median step time and the mean step time. The
table shows each configuration's median-of-medians as a ratio to plain ``fit``
of the same model (the issue's gate), and the ratio of the mean step times,
which also carries the steps that are not typical: gradwatch's host read every
``log_every`` steps and the window's sampled step. The mean skips the first
``MEAN_SKIP`` steps of a run (tracing, and the XLA compile of the fold at the
first read, paid once per run). Results go to ``benchmarks/results/<date>.json``.

Usage:
    python benchmarks/overhead.py            # all models
    python benchmarks/overhead.py --quick    # MLP only, fewer steps, jit off
    python benchmarks/overhead.py --jit off --configs gradwatch --models mlp,cnn
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from long_run import rss_mib  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._internal_options import InternalOptions  # noqa: E402

# Each timed fit is a short stand-in for a long training run, whose steady state is
# what the table reports: a fit of fewer than lean_min_steps planned steps would not
# trace the lean step (its start-up cost is refit_memory.py's subject, not this table's).
LONG_RUN = InternalOptions(lean_min_steps=0)

logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the nets raise alerts: keep the table readable


def mlp(second_bias="zeros"):
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu", bias_initializer=second_bias),
            keras.layers.Dense(10),
        ]
    ), (784,), 10


def cnn():
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    ), (32, 32, 3), 10


def deep24():
    layers = [keras.Input((256,))]
    layers += [keras.layers.Dense(256, activation="relu") for _ in range(24)]
    layers += [keras.layers.Dense(10)]
    return keras.Sequential(layers), (256,), 10


def lstm():
    return keras.Sequential(
        [keras.Input((20, 32)), keras.layers.LSTM(64), keras.layers.Dense(10)]
    ), (20, 32), 10


def res100():
    inputs = keras.Input((64,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    for _ in range(100):
        h = keras.layers.Add()([h, keras.layers.Dense(64, activation="relu")(h)])
        h = keras.layers.LayerNormalization()(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs), (64,), 10


MEAN_SKIP = 20

def mlp_dead():
    """The MLP with its second hidden layer dead from the start (every unit's bias
    -1e4): that layer and the one below it get all-zero gradients on every step, the
    case gradwatch is there to diagnose (not in the default table; ``--models``)."""
    return mlp(second_bias=keras.initializers.Constant(-1e4))


# the five models make the default table
TABLE_MODELS = ("mlp", "cnn", "deep24", "lstm", "res100")
MODELS = {"mlp": mlp, "cnn": cnn, "deep24": deep24, "lstm": lstm, "res100": res100, "mlp_dead": mlp_dead}


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []
        self._start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


class NaiveRecompute(keras.callbacks.Callback):
    """What gradient tools without in-graph capture do: after every step, recompute the
    gradients on a sample batch with a tf.function GradientTape and fetch per-variable norms."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = tf.constant(x), tf.constant(y)
        self._fn = None

    def on_train_batch_end(self, batch, logs=None):
        if self._fn is None:
            model = self.model

            @tf.function
            def norms(x, y):
                with tf.GradientTape() as tape:
                    loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                return [tf.norm(g) for g in grads if g is not None]

            self._fn = norms
        [n.numpy() for n in self._fn(self.x, self.y)]


def configurations(log_root, sample):
    def plain():
        return []

    def gradwatch_default():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), internal=LONG_RUN)]

    def gradwatch_clip():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), clip=gw.clip.GlobalNorm(1.0),
                                   internal=LONG_RUN)]

    def gradwatch_hist_every_step():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), histogram_every=1,
                                   internal=LONG_RUN)]

    def gradwatch_activations():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), activation_probe=True,
                                   internal=LONG_RUN)]

    def naive_recompute():
        return [NaiveRecompute(*sample)]

    def keras_tensorboard():
        return [keras.callbacks.TensorBoard(log_dir=tempfile.mkdtemp(dir=log_root), histogram_freq=1,
                                            update_freq="batch")]

    return {
        "plain": plain,
        "gradwatch": gradwatch_default,
        "gradwatch+clip": gradwatch_clip,
        "gradwatch+hist_every_step": gradwatch_hist_every_step,
        "gradwatch+activation_probe": gradwatch_activations,
        "naive_recompute": naive_recompute,
        "keras_tensorboard_hist": keras_tensorboard,
    }


def run_once(model_name, config_callbacks, x, y, steps, batch_size, jit_compile):
    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[model_name]()
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    timer = StepTimer()
    callbacks = config_callbacks() + [timer]
    # One epoch of `steps` batches; the first 5 steps (tracing) are dropped.
    model.fit(
        x[: steps * batch_size], y[: steps * batch_size], batch_size=batch_size,
        epochs=1, shuffle=False, verbose=0, callbacks=callbacks,
    )
    del model, callbacks
    keras.backend.clear_session()
    gc.collect()
    return statistics.median(timer.times[5:]), statistics.mean(timer.times[MEAN_SKIP:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--jit", choices=["off", "on", "both"], default=None,
                        help="jit_compile of the model (default: both; off with --quick)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of the configurations (plain is always run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    names = args.models.split(",") if args.models else (["mlp"] if args.quick else list(TABLE_MODELS))
    reps = args.reps or (3 if args.quick else 5)
    steps = args.steps or (60 if args.quick else 120)
    batch_size = 128
    jit = args.jit or ("off" if args.quick else "both")
    jits = {"off": [False], "on": [True], "both": [False, True]}[jit]
    log_root = tempfile.mkdtemp(prefix="gradwatch-bench-")
    results = []
    rss_after = []  # (jit, model, MiB): what the process holds after a model's runs
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = os.path.join(args.out, f"{stamp}.json")

    def write():
        """(Re)writes the results file; called after every model, so a stopped run keeps them."""
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(path, "w") as f:
            json.dump(
                {
                    "date": stamp,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                                 "gradwatch": gw.__version__},
                    "batch_size": batch_size, "steps": steps, "reps": reps, "mean_skips_steps": MEAN_SKIP,
                    "peak_rss_mb": peak_rss_mb,
                    "rss_after_each_model_mib": rss_after,
                    "results": results,
                },
                f, indent=2,
            )
        return peak_rss_mb

    for jit_compile in jits:
        for name in names:
            _, shape, classes = MODELS[name]()
            rng = np.random.default_rng(0)
            x = rng.normal(size=(steps * batch_size, *shape)).astype("float32")
            y = rng.integers(0, classes, size=steps * batch_size)
            configs = configurations(log_root, (x[:batch_size], y[:batch_size]))
            if args.configs:
                wanted = {"plain", *args.configs.split(",")}
                unknown = wanted - set(configs)
                if unknown:
                    parser.error(f"unknown configurations {sorted(unknown)}; choose from {sorted(configs)}")
                configs = {k: v for k, v in configs.items() if k in wanted}
            medians = {c: [] for c in configs}
            means = {c: [] for c in configs}
            order = list(configs)
            for rep in range(reps):
                shift = rep % len(order)
                for config_name in order[shift:] + order[:shift]:
                    median, mean = run_once(name, configs[config_name], x, y, steps, batch_size, jit_compile)
                    medians[config_name].append(median)
                    means[config_name].append(mean)
            plain = statistics.median(medians["plain"])
            plain_mean = statistics.median(means["plain"])
            for config_name, values in medians.items():
                ratio = statistics.median(values) / plain
                mean_ratio = statistics.median(means[config_name]) / plain_mean
                results.append(
                    {
                        "model": name,
                        "jit_compile": jit_compile,
                        "config": config_name,
                        "median_step_ms": statistics.median(values) * 1e3,
                        "ratio_to_plain": ratio,
                        "mean_step_ms": statistics.median(means[config_name]) * 1e3,
                        "mean_ratio_to_plain": mean_ratio,
                        "per_rep_ms": [v * 1e3 for v in values],
                        "per_rep_mean_ms": [v * 1e3 for v in means[config_name]],
                    }
                )
                print(
                    f"{name:8s} jit={str(jit_compile):5s} {config_name:26s} "
                    f"{statistics.median(values) * 1e3:8.2f} ms/step  ratio {ratio:.3f}  "
                    f"(mean {statistics.median(means[config_name]) * 1e3:8.2f} ms, ratio {mean_ratio:.3f})",
                    flush=True,
                )
            rss_after.append([jit_compile, name, rss_mib()])
            write()
    peak_rss_mb = write()
    print(f"peak RSS {peak_rss_mb:.0f} MB")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
