"""What each probe adds to a fit's first train-function call (its trace, and under
``jit_compile`` its XLA compile): plain against ``GradientMonitor()`` fits of 60 steps
(planned 1,050, so the host reads in time and the step holds no fold), with some of
the probes' in-step work left out. A variant's "first-call extra" less the full
monitor's is what those probes cost at the start; "fit extra" adds the early update
measures, histograms and reads of the 60 steps.

Leaving a probe out is done by replacing its in-step method for this process only
(a benchmark's seam: the windows of such a fit lack that probe's columns).

Usage:
    python benchmarks/first_call_parts.py mlp on full
    python benchmarks/first_call_parts.py mlp on no-update          # the update measure left out
    python benchmarks/first_call_parts.py mlp on no-update,no-histogram,no-unit
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from overhead import BATCH_SIZE, MODELS, dataset  # noqa: E402

import gradwatch as gw  # noqa: E402

logging.getLogger("gradwatch").setLevel(logging.ERROR)
STEPS = 60


#: the parts ``leave_out`` takes
PARTS = ("no-update", "no-histogram", "no-unit", "no-rare")


def leave_out(parts: set[str], package: str = "gradwatch") -> None:
    """Replaces the in-step work of the named parts by nothing (this process only), in
    ``package`` (gradwatch, or a copy of another revision: ``baseline.load``): the update
    measure, the histograms, the unit probe, the rare passes (the conditional finite and
    careful passes over the gradients)."""
    probes = importlib.import_module(f"{package}._capture.probes")
    if "no-update" in parts:
        probes.UpdateProbe.measure_after_update = lambda self, grads, pieces=(): tf.constant(0)
    if "no-histogram" in parts:
        probes.HistogramProbe.record = lambda self, step: None
    if "no-unit" in parts:
        probes.UnitProbe.record = lambda self, step: None
    if "no-rare" in parts:
        measure = importlib.import_module(f"{package}._capture.measure")
        measure._DensePasses.rare = lambda self, squares, sampled: (tf.zeros([5 * self.count]),
                                                                    tf.constant(False))


class FirstCall(keras.callbacks.Callback):
    """The fit's first batch's wall time (from the fit's start), and a stop after STEPS."""

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.first = None

    def on_train_batch_end(self, batch, logs=None):
        if self.first is None:
            self.first = time.perf_counter() - self.start
        if batch == STEPS - 1:
            self.model.stop_training = True


def fit(name: str, jit: bool, monitored: bool) -> tuple[float, float]:
    model, _, _ = MODELS[name]()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    timer = FirstCall()
    callbacks = [timer] + ([gw.GradientMonitor(log_dir=tempfile.mkdtemp())] if monitored else [])
    start = time.perf_counter()
    model.fit(dataset(name, BATCH_SIZE), steps_per_epoch=1050, epochs=1, verbose=0, callbacks=callbacks)
    return timer.first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("jit", choices=["off", "on"])
    parser.add_argument("variant", help="full, or a comma-separated set of " + ", ".join(PARTS))
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    parts = set(args.variant.split(",")) - {"full"}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    leave_out(parts)
    jit = args.jit == "on"
    keras.utils.set_random_seed(0)
    fit(args.model, jit, monitored=False)  # warms TensorFlow and Keras themselves
    first, whole = [], []
    for _ in range(args.reps):
        plain = fit(args.model, jit, monitored=False)
        monitored = fit(args.model, jit, monitored=True)
        first.append(monitored[0] - plain[0])
        whole.append(monitored[1] - plain[1])
    print(f"{args.model} jit {args.jit} {args.variant}: first-call extra {statistics.median(first):.2f} s, "
          f"fit extra {statistics.median(whole):.2f} s (median of {args.reps})")


if __name__ == "__main__":
    main()
