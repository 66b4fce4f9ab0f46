"""One histogram count (``HistogramProbe._log_counts``) of the MLP's six gradients
(784x512, 512, 512x512, 512, 512x10, 10: 670k entries) as a graph function: its time
a call, what a histogram step pays for the counting. Run it on two revisions to
compare (``PYTHONPATH=<worktree> python benchmarks/histogram_speed.py``).

Usage:
    python benchmarks/histogram_speed.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch._capture import probes  # noqa: E402

SHAPES = [(784, 512), (512,), (512, 512), (512,), (512, 10), (10,)]
CALLS = 50


def main() -> None:
    rng = np.random.default_rng(0)
    flats = [tf.constant(rng.normal(size=shape).astype(np.float32).ravel()) for shape in SHAPES]
    weights = {slot: 1.0 for slot in range(len(flats))}
    count = tf.function(lambda *x: probes.HistogramProbe._log_counts(dict(enumerate(x)), weights, len(x)))
    count(*flats).numpy()
    start = time.perf_counter()
    for _ in range(CALLS):
        result = count(*flats)
    result.numpy()
    print(f"{os.path.dirname(gradwatch.__file__)}: a histogram count "
          f"{(time.perf_counter() - start) / CALLS * 1e3:.2f} ms a call")


if __name__ == "__main__":
    main()
