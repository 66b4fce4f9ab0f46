"""Writes the schema-version-1 run directories under ``tests/data/`` (a test fixture).

The files in ``run_v1/`` and ``watch_v1/`` were written by the code of commit 31b2382
(before ``run.json`` carried a ``schema_version``): they are what gradwatch 0.1.0 left on
disk, and the tests check that every reader still opens them. Do not regenerate them: a
newer gradwatch would write a newer format, and the fixture would test nothing. This
script is kept to say how they were made; no test runs it.

* ``run_v1``: ``GradientMonitor`` on a small functional MLP (``make_model``: a "dead" ReLU
  layer whose biases start at -50, beside a "live" one), 40 steps, ``log_every=5``,
  ``histogram_every=10``, ``clip=gw.clip.GlobalNorm(1.0)``, ``dead_steps=10`` so the dead
  layer is reported; one batch (step 23) holds a NaN input, so a non-finite alert fires.
* ``watch_v1``: ``Watch`` in a custom loop on the same model, 20 steps, ``log_every=5``.

Run (from ``tests/data``): ``python make_run_v1.py``
"""

from __future__ import annotations

import os
import shutil
import warnings

import keras
import numpy as np
import tensorflow as tf

import gradwatch as gw
from gradwatch._interpret.detectors import Thresholds

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, BATCH = 40, 8


def make_model() -> keras.Model:
    """inputs -> "live" (12, relu) -> "dead" (6, relu, biases at -50: no unit ever passes a
    gradient); "out" (1) reads both "live" and "dead", so "live" still learns."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,), name="x")
    live = keras.layers.Dense(12, activation="relu", name="live")(inputs)
    dead = keras.layers.Dense(6, activation="relu", name="dead",
                              bias_initializer=keras.initializers.Constant(-50.0))(live)
    both = keras.layers.Concatenate(name="both")([live, dead])
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(both), name="mlp")


def make_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def monitor_run(log_dir: str) -> None:
    x, y = make_data(STEPS * BATCH)
    x[22 * BATCH] = np.nan  # the 23rd batch
    model = make_model()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = gw.GradientMonitor(
        log_dir=log_dir, log_every=5, histogram_every=10, clip=gw.clip.GlobalNorm(1.0),
        thresholds=Thresholds(dead_steps=10),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])


def watch_run(log_dir: str) -> None:
    x, y = make_data(20 * BATCH)
    model = make_model()
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.MeanSquaredError()
    watch = gw.Watch(log_dir=log_dir, log_every=5, histogram_every=10)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = watch.observe(grads, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for k in range(20):
        train_step(x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH])
        watch.step_end()
    watch.close()


def main() -> None:
    os.chdir(HERE)  # relative log_dir: run.json records it as given
    for name, write in (("run_v1", monitor_run), ("watch_v1", watch_run)):
        shutil.rmtree(name, ignore_errors=True)
        write(name)


if __name__ == "__main__":
    main()
