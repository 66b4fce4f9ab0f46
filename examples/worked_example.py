"""The 2-layer scalar network of the backpropagation notes, watched by gradwatch.

    h = relu(w1 * x + b1),  y_pred = sigmoid(w2 * h + b2),  L = (y_pred - target)**2
    with x = 2, target = 1, w1 = 0.5, b1 = 0.1, w2 = 0.3, b2 = -0.2.

One step of plain gradient descent is observed with ``gradwatch.Watch``; the
gradient magnitudes gradwatch writes to ``stats.csv`` are the exact ones
(|dL/dw2| = 0.2561, |dL/db2| = 0.2328, |dL/dw1| = 0.1397, |dL/db1| = 0.0698).

Run: ``python examples/worked_example.py --out runs/worked``
"""

from __future__ import annotations

import argparse
import math
import os

import tensorflow as tf

import gradwatch as gw

X, TARGET = 2.0, 1.0
INITIAL = {"w1": 0.5, "b1": 0.1, "w2": 0.3, "b2": -0.2}


def hand_worked(rounded: bool) -> dict[str, float]:
    """The chain rule by hand; ``rounded`` repeats the notes' 3-digit rounding."""
    h = max(0.0, INITIAL["w1"] * X + INITIAL["b1"])
    y_pred = 1.0 / (1.0 + math.exp(-(INITIAL["w2"] * h + INITIAL["b2"])))
    sigma_prime = y_pred * (1.0 - y_pred)
    if rounded:
        y_pred, sigma_prime = round(y_pred, 2), round(sigma_prime, 3)
    dz2 = 2.0 * (y_pred - TARGET) * sigma_prime
    dh = dz2 * INITIAL["w2"]
    return {"w1": dh * X, "b1": dh, "w2": dz2 * h, "b2": dz2}


def main(out: str = "runs/demo/worked_example", learning_rate: float = 0.1) -> dict[str, float]:
    """Runs one observed step; returns {variable: |gradient|} as gradwatch wrote it."""
    variables = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    ordered = [variables[n] for n in ("w1", "b1", "w2", "b2")]
    names = ["hidden/w1", "hidden/b1", "output/w2", "output/b2"]
    with gw.Watch(log_dir=out, log_every=1, names=names) as watch:
        with tf.GradientTape() as tape:
            h = tf.nn.relu(variables["w1"] * X + variables["b1"])
            y_pred = tf.sigmoid(variables["w2"] * h + variables["b2"])
            loss = (y_pred - TARGET) ** 2
        grads = tape.gradient(loss, ordered)
        grads = watch.observe(grads, ordered, loss=loss)
        for var, grad in zip(ordered, grads):
            var.assign_sub(learning_rate * grad)
        watch.step_end()
    stats = gw.read_stats(out)
    written = {row.variable.split("/")[-1]: row.l2 for row in stats.itertuples()}
    exact, rounded = hand_worked(False), hand_worked(True)
    print(f"loss = {float(loss):.6f}   (written to {os.path.join(out, 'stats.csv')})")
    print("param  |grad| gradwatch   exact      notes (rounded)")
    for name in ("w2", "b2", "w1", "b1"):
        print(
            f"{name:5s}  {written[name]:.4f}           {abs(exact[name]):.4f}     "
            f"{abs(rounded[name]):.3f}"
        )
    print(
        "The notes' hand-worked 0.257 / 0.234 for w2 / b2 come from rounding the output to "
        "0.53 and sigma' to 0.249 before multiplying; unrounded, the chain rule gives the "
        "gradwatch values."
    )
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/worked_example")
    main(parser.parse_args().out)
