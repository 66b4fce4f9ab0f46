"""A GAN in ``model.fit``: a subclassed model that trains its two networks with its own
optimizers (``compile(d_optimizer=..., g_optimizer=...)``), watched by ``GradientMonitor``.

The monitor finds both optimizers among the model's attributes and taps them; each
one's variables are a group (``read_stats(...).group``), and ``step`` is the fit's
batch. The generator learns to draw points on a ring from 4 noise values.

Run: ``python examples/gan_fit.py --out runs/gan_fit``
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf

import gradwatch as gw

LATENT = 4


def make_data(n: int = 1024, seed: int = 0):
    """Points on a unit ring (the real data) and the generator's noise, one row each."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    real = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype("float32")
    return real, rng.normal(size=(n, LATENT)).astype("float32")


class GAN(keras.Model):
    """A DCGAN-style model on vectors (as keras-io's DCGAN, without images)."""

    def __init__(self):
        super().__init__()
        self.discriminator = keras.Sequential([
            keras.Input((2,)), keras.layers.Dense(32, name="d_hidden"),
            keras.layers.LeakyReLU(negative_slope=0.2, name="d_act"),
            keras.layers.Dense(1, activation="sigmoid", name="d_out")], name="discriminator")
        self.generator = keras.Sequential([
            keras.Input((LATENT,)), keras.layers.Dense(32, activation="relu", name="g_hidden"),
            keras.layers.Dense(2, name="g_out")], name="generator")

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy()

    def train_step(self, data):
        real, noise = data
        batch = tf.shape(real)[0]
        labels = tf.concat([tf.ones((batch, 1)), tf.zeros((batch, 1))], axis=0)  # 1: fake
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(tf.concat([self.generator(noise), real], 0)))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(tf.zeros((batch, 1)), self.discriminator(self.generator(noise)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        return {"d_loss": d_loss, "g_loss": g_loss}


def main(out: str = "runs/demo/gan_fit", epochs: int = 3, log_every: int = 10):
    keras.utils.set_random_seed(0)
    real, noise = make_data()
    model = GAN()
    model.compile(d_optimizer=keras.optimizers.Adam(1e-3), g_optimizer=keras.optimizers.Adam(1e-3))
    monitor = gw.GradientMonitor(log_dir=out, log_every=log_every)
    history = model.fit(real, noise, batch_size=32, epochs=epochs, verbose=0, callbacks=[monitor])
    stats = gw.read_stats(out, level="layer")
    last = stats[stats.step == stats.step.max()]
    print(f"final d_loss {history.history['d_loss'][-1]:.4f}, g_loss {history.history['g_loss'][-1]:.4f}")
    print(last[["step", "group", "layer", "l2", "grad_steps", "mean_abs"]].to_string(index=False))
    return model, monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/gan_fit")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.out, args.epochs)
