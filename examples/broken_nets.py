"""Deliberately broken networks, and what gradwatch says about them.

* ``vanishing``: a 12-layer sigmoid MLP; the first layers' gradients vanish.
* ``exploding``: a learning rate far too high; gradients explode, then go NaN.
* ``exploding_clipped``: the same net with ``clip=gw.clip.GlobalNorm(1.0)``: it trains.
* ``dead_relu``: ReLU layers whose biases start at -6: every unit is dead from the start.

Run: ``python examples/broken_nets.py --out runs/broken``
"""

from __future__ import annotations

import argparse
import os
import warnings

import keras
import numpy as np

import gradwatch as gw


def _print_alerts(log_dir: str) -> None:
    alerts = gw.read_alerts(log_dir)
    if alerts.empty:
        print("  no alerts")
        return
    for row in alerts.itertuples():
        print(f"  step {row.step:>4} {row.severity:7s} {row.kind:20s} {row.layer or '-':8s} {row.message}")
    for kind, hint in alerts[alerts.hint != ""].groupby("kind", sort=False)["hint"].first().items():
        print(f"  hint ({kind}): {hint}")


def vanishing(out: str) -> None:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((16,))]
    layers += [keras.layers.Dense(16, activation="sigmoid", name=f"sigmoid_{i}") for i in range(12)]
    layers += [keras.layers.Dense(1, name="out")]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype("float32")
    model.fit(x, x[:, :1], batch_size=32, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=out, log_every=8)])
    _print_alerts(out)


def exploding(out: str, clip=None) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 5).astype("float32")
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.2), "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the alerts are printed below
        history = model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0,
                            callbacks=[gw.GradientMonitor(log_dir=out, log_every=1, clip=clip)])
    loss = history.history["loss"][-1]
    print(f"  final loss {loss:.4g}")
    _print_alerts(out)
    return loss


def dead_relu(out: str) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 20)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32")
    bad_bias = keras.initializers.Constant(-6.0)
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu", bias_initializer=bad_bias, name="relu_1"),
        keras.layers.Dense(32, activation="relu", bias_initializer=bad_bias, name="relu_2"),
        keras.layers.Dense(1, activation="sigmoid", name="out"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    # 320 steps: a unit counts as dead after 200 consecutive zero-gradient steps (the default)
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=[gw.GradientMonitor(log_dir=out)])
    _print_alerts(out)


def main(out: str = "runs/demo/broken_nets") -> None:
    print("12-layer sigmoid MLP:")
    vanishing(os.path.join(out, "vanishing"))
    print("learning rate 0.2, no clipping:")
    exploding(os.path.join(out, "exploding"))
    print("learning rate 0.2, clip=gw.clip.GlobalNorm(1.0):")
    exploding(os.path.join(out, "exploding_clipped"), clip=gw.clip.GlobalNorm(1.0))
    print("ReLU layers with biases initialised at -6:")
    dead_relu(os.path.join(out, "dead_relu"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/broken_nets")
    main(parser.parse_args().out)
