"""``model.fit`` with ``gradwatch.GradientMonitor``: Dense(64, relu) -> Dense(10, softmax).

Run: ``python examples/keras_fit.py --out runs/keras_fit``
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

import gradwatch as gw


def make_data(n: int = 2048, features: int = 20, classes: int = 10, seed: int = 0):
    """Synthetic classification data: class = argmax of a fixed linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int64")
    return x, y


def main(out: str = "runs/demo/keras_fit", epochs: int = 3, log_every: int = 10):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    monitor = gw.GradientMonitor(log_dir=out, log_every=log_every)
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[monitor])
    stats = gw.read_stats(out, level="layer")
    last = stats[stats.step == stats.step.max()]
    print(f"final loss {history.history['loss'][-1]:.4f}, accuracy {history.history['accuracy'][-1]:.3f}")
    print(last[["step", "layer", "l2", "l2_max", "mean_abs", "zero_frac"]].to_string(index=False))
    return model, monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/keras_fit")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.out, args.epochs)
