"""A ``@tf.function`` custom training loop with ``gradwatch.Watch``: SGD(0.01), MSE.

Run: ``python examples/custom_loop.py --out runs/custom_loop``
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf

import gradwatch as gw


def main(out: str = "runs/demo/custom_loop", steps: int = 200, log_every: int = 10):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 8)).astype("float32")
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2]).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1024, seed=0).batch(32).repeat()

    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="output"),
        ]
    )
    optimizer = keras.optimizers.SGD(learning_rate=0.01)
    loss_fn = keras.losses.MeanSquaredError()
    watch = gw.Watch(log_dir=out, log_every=log_every, model=model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = watch.observe(grads, model.trainable_variables, loss=loss)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    with watch:
        for xb, yb in dataset.take(steps):
            loss = train_step(xb, yb)
            watch.step_end()
    windows = gw.read_windows(out)
    print(f"{steps} steps, final loss {float(loss):.4f}")
    print(windows[["step", "loss", "global_l2", "global_l2_max"]].tail(5).to_string(index=False))
    return watch


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/custom_loop")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.out, args.steps)
