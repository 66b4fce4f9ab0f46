"""House-price-style regression on raw ``tf.Variable``s updated with ``assign_sub``.

A 1-hidden-unit network ``y_pred = w2 * relu(w1 * size + b1) + b2`` with loss
``0.5 * (y - y_pred)**2``, trained by hand: ``var.assign_sub(lr * grad)``.

Run: ``python examples/raw_variables.py --out runs/raw_variables``
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow as tf

import gradwatch as gw


def make_houses(n: int = 256, seed: int = 0):
    """Synthetic houses: price (100k) ~ 1.5 * size (100 m^2) + 0.5 + noise."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.5, 2.5, size=n).astype("float32")
    price = (1.5 * size + 0.5 + rng.normal(scale=0.1, size=n)).astype("float32")
    return size, price


def main(out: str = "runs/demo/raw_variables", epochs: int = 5, lr: float = 0.05, log_every: int = 16):
    sizes, prices = make_houses()
    w1 = tf.Variable(0.8, name="w1")
    b1 = tf.Variable(0.1, name="b1")
    w2 = tf.Variable(0.9, name="w2")
    b2 = tf.Variable(0.0, name="b2")
    variables = [w1, b1, w2, b2]
    watch = gw.Watch(
        log_dir=out,
        log_every=log_every,
        names=["hidden/w1", "hidden/b1", "output/w2", "output/b2"],
    )

    @tf.function
    def step(size, price):
        with tf.GradientTape() as tape:
            y_pred = w2 * tf.nn.relu(w1 * size + b1) + b2
            loss = 0.5 * (price - y_pred) ** 2
        grads = tape.gradient(loss, variables)
        grads = watch.observe(grads, variables, loss=loss)
        for var, grad in zip(variables, grads):
            var.assign_sub(lr * grad)
        return loss

    with watch:
        for _ in range(epochs):
            for size, price in zip(sizes, prices):
                step(tf.constant(size), tf.constant(price))
                watch.step_end()
    windows = gw.read_windows(out)
    print(f"w1={w1.numpy():.3f} b1={b1.numpy():.3f} w2={w2.numpy():.3f} b2={b2.numpy():.3f}")
    print(windows[["step", "loss", "global_l2"]].tail(5).to_string(index=False))
    return variables


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/raw_variables")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    main(args.out, args.epochs)
