"""How XLA's CPU backend sums a gradient's squares: the ways of writing one sum, timed
inside one compiled function beside the matrix product that makes the gradient.

Each variant is a ``tf.function(jit_compile=True)`` that computes the MLP's two large
kernel gradients (784 x 512 and 512 x 512, as ``x^T @ dy`` from a batch of 128, so the
sum reads an intermediate, as in a train step, not a parameter) and then their sums of
squares one way; ``none`` takes one entry of each instead. The variants are called in a
new random order each round, one call each, and each call is timed; the table gives the
median over the rounds and its excess over ``none``, and each sum's relative error
against numpy in float64.

- ``reduce_sum``: ``reduce_sum(square(g))`` over the whole gradient;
- ``row``: ``reduce_sum(square(g), axis=1)`` of ``g`` as a ``[1, n]`` row (the form
  gradwatch used under XLA before the fifteenth session);
- ``l2_loss``: ``2 * L2Loss(g)`` (gradwatch's form outside XLA);
- ``dot``: ``g . g`` as a dot product;
- ``pieces<w>``: ``square(g)`` cut into rows of ``w`` entries, each row's sum a
  product with a vector of ``w`` ones, then those sums added (``stats.row_sums``
  with its pieces fixed at ``w``).

Usage:
    python benchmarks/xla_sums.py --rounds 1000
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def pieces(width):
    def sums(g):
        rows = tf.reshape(tf.square(g), [-1, width])
        return tf.reduce_sum(tf.linalg.matvec(rows, tf.ones([width])))
    return sums


VARIANTS = {
    "none": None,
    "reduce_sum": lambda g: tf.reduce_sum(tf.square(g)),
    "row": lambda g: tf.reduce_sum(tf.square(tf.reshape(g, [1, -1])), axis=1)[0],
    "l2_loss": lambda g: 2.0 * tf.nn.l2_loss(g),
    "dot": lambda g: tf.tensordot(tf.reshape(g, [-1]), tf.reshape(g, [-1]), 1),
    **{f"pieces{w}": pieces(w) for w in (256, 512, 1024, 4096, 8192)},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pairs = [(tf.constant(rng.normal(size=(128, n_in)).astype("float32")),
              tf.constant(rng.normal(size=(128, 512)).astype("float32"))) for n_in in (784, 512)]

    def gradients():
        return [tf.matmul(x, dy, transpose_a=True) for x, dy in pairs]

    functions = {}
    for name, sums in VARIANTS.items():
        def step(sums=sums):
            grads = gradients()
            taken = [g[1, 1] for g in grads]
            return taken if sums is None else taken + [sums(g) for g in grads]
        functions[name] = tf.function(step, jit_compile=True)
    expected = [float(np.sum(np.square(g.numpy().astype(np.float64)))) for g in gradients()]
    errors = {}
    for name, function in functions.items():
        out = [float(v) for v in function()]
        errors[name] = (max(abs(o - e) / e for o, e in zip(out[2:], expected)) if len(out) > 2 else None)
    times = {name: [] for name in functions}
    names = list(functions)
    for _ in range(args.rounds):
        random.shuffle(names)
        for name in names:
            start = time.perf_counter()
            out = functions[name]()
            out[0].numpy()
            times[name].append((time.perf_counter() - start) * 1e6)
    base = float(np.median(times["none"]))
    print(f"XLA sums of squares of the MLP's 784x512 and 512x512 gradients, {args.rounds} rounds")
    print(f"  {'variant':12s} {'median us':>10s} {'over none':>10s} {'rel. error':>11s}")
    for name in functions:
        median = float(np.median(times[name]))
        error = "" if errors[name] is None else f"{errors[name]:.1e}"
        print(f"  {name:12s} {median:10.1f} {median - base:+10.1f} {error:>11s}")


if __name__ == "__main__":
    main()
