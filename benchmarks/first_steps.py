"""What a fit's first steps cost: the first train-function call (traces, XLA compile,
binding the monitor), the lean step's first call, and any other slow step, for one
model, plain or with ``GradientMonitor()``. The lean step's break-even
(``fit_tap.LEAN_TRACE_SHARE``) comes from these figures.

Usage:
    python benchmarks/first_steps.py mlp off 1050 plain
    python benchmarks/first_steps.py res100 off 1050 gw
    python benchmarks/first_steps.py deep24 off 1050 gw --always-lean   # the lean step from step 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from overhead import BATCH_SIZE, MODELS, dataset  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._internal_options import InternalOptions  # noqa: E402

logging.getLogger("gradwatch").setLevel(logging.ERROR)
SLOW = 0.1  # seconds: a step slower than this is listed


class StepTimes(keras.callbacks.Callback):
    """Each batch's wall time from the previous batch end (the first from the fit's start)."""

    def on_train_begin(self, logs=None):
        self.last = time.perf_counter()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("jit", choices=["off", "on"])
    parser.add_argument("steps", type=int)
    parser.add_argument("config", choices=["plain", "gw"])
    parser.add_argument("--always-lean", action="store_true",
                        help="trace the lean step from the fit's first steps on (no break-even)")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[args.model]()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=args.jit == "on")
    timer = StepTimes()
    callbacks = [timer]
    if args.config == "gw":
        internal = InternalOptions(lean_break_even=not args.always_lean)
        callbacks.append(gw.GradientMonitor(log_dir=tempfile.mkdtemp(), internal=internal))
    start = time.perf_counter()
    model.fit(dataset(args.model, BATCH_SIZE), steps_per_epoch=args.steps, epochs=1, verbose=0,
              callbacks=callbacks)
    total = time.perf_counter() - start
    slow = [(step, round(seconds, 3)) for step, seconds in enumerate(timer.times) if seconds > SLOW]
    print(f"{args.model} jit {args.jit} {args.config}{' always-lean' if args.always_lean else ''}: "
          f"fit {total:.2f} s, median step {statistics.median(timer.times) * 1e3:.2f} ms, "
          f"first call {timer.times[0]:.2f} s; slow steps (step, s): {slow[:12]}")


if __name__ == "__main__":
    main()
