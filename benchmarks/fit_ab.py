"""Whole fits of plain Keras, this revision's monitor and an earlier revision's, in one
process, in rotating order: the fit-level A/B between two revisions.

``overhead.py --baseline REV`` runs each cell in a fresh process, which is what the
gate needs; here the three configurations share one process and its machine minute,
so a change between revisions shows against the fit-to-fit drift of this VM (+-25%
between two plain fits here). Per repetition: each configuration's median and mean
step (steps over 20x the median left out) over the 1,000 steps after the 50 untimed
ones; printed: the median over repetitions of each ratio to plain's.

Caution: in its three runs on 2026-12-06 (``results/fit_ab-2026-12-06-*.txt``) it put
the working tree's monitor behind the other revision's whichever was older, while
the same comparison within one package put them the other way round; until that is
understood, judge a change with ``step_ab.py``.

Usage:
    python benchmarks/fit_ab.py --baseline 8e68954 --jit --reps 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from overhead import MODELS, OUTLIER, WARMUP, StepTimer, dataset  # noqa: E402

import gradwatch as gw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", required=True)
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    import baseline

    old = baseline.load(args.baseline)
    makers = {"plain": lambda: [], "gradwatch": lambda: [gw.GradientMonitor(log_dir=tempfile.mkdtemp())],
              "baseline": lambda: [old.GradientMonitor(log_dir=tempfile.mkdtemp())]}
    names = list(makers)
    figures = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            keras.utils.set_random_seed(0)
            model, _, _ = MODELS[args.model]()
            model.compile(keras.optimizers.Adam(1e-3),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=args.jit)
            timer = StepTimer()
            model.fit(dataset(args.model, 128), steps_per_epoch=WARMUP + args.steps, epochs=1, verbose=0,
                      callbacks=makers[name]() + [timer])
            times = np.array(timer.times[WARMUP:])
            median = float(np.median(times))
            figures[name].append((median, float(times[times < OUTLIER * median].mean())))
        print(f"repetition {rep + 1}: median ms " + ", ".join(
            f"{name} {figures[name][-1][0] * 1e3:.2f}" for name in names), flush=True)
    print(f"{args.model}, jit_compile={args.jit}, {args.reps} repetitions, baseline {args.baseline}")
    for name in names[1:]:
        ratios = [(m[0] / p[0], m[1] / p[1]) for m, p in zip(figures[name], figures["plain"])]
        print(f"  {name:10s} median ratio {statistics.median(r[0] for r in ratios):.3f}   "
              f"mean ratio {statistics.median(r[1] for r in ratios):.3f}")


if __name__ == "__main__":
    main()
