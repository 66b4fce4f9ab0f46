"""Where a window's extra time goes: each step of a ``GradientMonitor()`` fit by its
kind, against the fit's own typical steps, and the typical step against plain ``fit``.

A fit of ``log_every=10`` has steps of a few kinds: most steps only measure their
gradients (typical); the window's first step is also its sampled step (the finite pass,
the unit probe); the window's last step ends with the host read (and, at the end of
its call, hands the fold and interpretation to the writer thread); every
``UPDATE_EVERY`` = 50 steps (51, 101, ...) the update probe snapshots the weights
before the step and measures after it; every ``histogram_every`` = 100 steps (100,
200, ...: a window's last step) a histogram is taken. The
table gives each kind's median and mean excess over the typical step, in ms, and
what it adds per step of the fit (its mean excess times its share of the steps): the
budget a target such as "mean <= 1.05 x plain" has to fit in. The excesses are
against the same fit's typical steps, so the drift between fits (several percent on
this VM) does not move them; the typical step against plain's is between fits.

Step times are callback-to-callback wall times (Keras's ``on_train_batch_end``), so a
read's host work and any writer-thread work that overlaps a step land in that step.
Fits alternate plain and gradwatch, ``--reps`` of each, in one process; the first
``--skip`` steps of a fit (traces, compiles) are left out.

Usage:
    python benchmarks/window_phases.py mlp off
    python benchmarks/window_phases.py mlp on --reps 3
    python benchmarks/window_phases.py transformer off --interpret-at-read
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from first_steps import StepTimes  # noqa: E402
from overhead import BATCH_SIZE, MODELS, dataset  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._internal_options import InternalOptions  # noqa: E402
from gradwatch._interpret.probe_layout import UPDATE_EVERY  # noqa: E402

logging.getLogger("gradwatch").setLevel(logging.ERROR)
LOG_EVERY = 10
HISTOGRAM_EVERY = 100


def kinds(steps: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the step kinds over steps numbered from 1 (``log_every=10``, the
    defaults' update and histogram schedules after the early ones). The update step
    (51, 101, ...) is also a window's first step; the histogram step (100, 200, ...,
    ``HistogramProbe``'s cadence) is also a window's last, whose batch end reads. A kind's
    mask leaves out the steps of a costlier kind."""
    update = steps % UPDATE_EVERY == 1
    histogram = steps % HISTOGRAM_EVERY == 0
    first = (steps % LOG_EVERY == 1) & ~update
    read = (steps % LOG_EVERY == 0) & ~histogram
    return {
        "typical": ~(first | read | update | histogram),
        "window's first (sampled)": first,
        "read (window's last)": read,
        "update measure (+ sampled)": update,
        "histogram (+ read)": histogram,
    }


def fit_times(name: str, jit: bool, steps: int, monitor: gw.GradientMonitor | None) -> np.ndarray:
    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[name]()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    timer = StepTimes()
    model.fit(dataset(name, BATCH_SIZE), steps_per_epoch=steps, epochs=1, verbose=0,
              callbacks=[timer] + ([monitor] if monitor is not None else []))
    return np.asarray(timer.times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("jit", choices=["off", "on"])
    parser.add_argument("--steps", type=int, default=1050,
                        help="steps per fit (planned >= 1,000: the host reads in time, no fold in the step)")
    parser.add_argument("--skip", type=int, default=100, help="untimed first steps of each fit")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--interpret-at-read", action="store_true",
                        help="InternalOptions(defer_reads=False): the fold and interpretation at the read, "
                             "on the training thread (what the writer thread's work costs the steps)")
    args = parser.parse_args()
    jit = args.jit == "on"
    plain, monitored = [], []
    for _ in range(args.reps):
        plain.append(fit_times(args.model, jit, args.steps, None)[args.skip:])
        internal = InternalOptions(defer_reads=not args.interpret_at_read)
        monitor = gw.GradientMonitor(log_dir=tempfile.mkdtemp(), log_every=LOG_EVERY,
                                     histogram_every=HISTOGRAM_EVERY, internal=internal)
        monitored.append(fit_times(args.model, jit, args.steps, monitor)[args.skip:])
    times = np.concatenate(monitored)
    numbers = np.concatenate([np.arange(args.skip, args.skip + len(t)) + 1 for t in monitored])
    masks = kinds(numbers)
    typical = float(np.median(times[masks["typical"]]))
    plain_median = float(np.median(np.concatenate(plain)))
    plain_mean = float(np.mean(np.concatenate(plain)))
    print(f"{args.model} jit {args.jit}{' interpret-at-read' if args.interpret_at_read else ''}, "
          f"{args.reps} x {args.steps} steps (first {args.skip} left out):")
    print(f"  plain: median {plain_median:.3f} ms, mean {plain_mean:.3f} ms; gradwatch: mean "
          f"{np.mean(times):.3f} ms ({np.mean(times) / plain_mean:.3f} x plain's mean)")
    # other fits: a few percent either way on this VM (step_ab.py measures this ratio)
    print(f"  typical step {typical:.3f} ms against plain's median: {typical / plain_median:.3f} x "
          "(other fits; step_ab.py is the instrument for this ratio)")
    print(f"  {'kind':32s} {'steps':>6s} {'median+ms':>10s} {'mean+ms':>9s} {'per step+ms':>12s}")
    for kind, mask in masks.items():
        if kind == "typical" or not mask.any():
            continue
        excess = times[mask] - typical
        share = mask.mean()
        print(f"  {kind:32s} {int(mask.sum()):6d} {np.median(excess):10.2f} {np.mean(excess):9.2f} "
              f"{np.mean(excess) * share:12.3f}")


if __name__ == "__main__":
    main()
