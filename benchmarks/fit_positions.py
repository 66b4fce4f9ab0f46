"""Where a whole ``fit``'s overhead sits in gradwatch's 10-step window: each step's time
by its place in the window, plain against ``GradientMonitor()`` defaults, in fits
interleaved in one process (``overhead.py``'s fits: 1,050 steps, the first 50 untimed).

A fit's batches are numbered from 0 and the monitor reads after every 10th step, so
place 9 is the step whose end holds the host read (``read``), place 0 the window's
first step, which takes the sampled full pass while the writer thread folds,
interprets and writes the window just read (``window start``), and places 1-8 the
other steps (``others``: the every-step work). Each figure is a step's median at that
place, over fits; "excess" is the configuration's step less plain's at that place,
per window the sum over the places.

Why its own instrument: ``overhead.py`` gives one ratio per fit, inside this VM's
fit-to-fit spread (~8%), and ``step_ab.py`` interleaves configurations step by step,
which spreads each monitor's writer thread over every configuration's steps. Here
the writer's share is the window start's excess with the writer's work against
without it (``no_writer``: the read is kept, its fold, interpretation and writes
are dropped; a benchmark's seam for this process only, nothing is written), both
read against the same fit's other places, so the fits' drift cancels.

Usage:
    python benchmarks/fit_positions.py mlp
    python benchmarks/fit_positions.py deep24 --jit on --reps 4
    python benchmarks/fit_positions.py mlp --baseline HEAD~3     # an earlier revision beside
    python benchmarks/fit_positions.py mlp --sync-reads          # the window's fold at its read, beside
    python benchmarks/fit_positions.py mlp --norms-floor         # exact per-step norms alone, beside
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from overhead import BATCH_SIZE, MODELS, WARMUP, NormsFloor, balanced_orders, dataset, summarise, timed_fit  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch import _pipeline  # noqa: E402
from gradwatch._internal_options import InternalOptions  # noqa: E402

logging.getLogger("gradwatch").setLevel(logging.ERROR)
LOG_EVERY = 10  # the default: the window's places
STEPS = 1000
_READ = _pipeline.Pipeline.read


def _read_without_writer(self, fallback_loss=None, defer=False):
    """``Pipeline.read`` with the read kept and its fold, interpretation and writes dropped."""
    pending = self._recorder.read_pending()
    if pending is None:
        return _pipeline.Read(0, None, None)
    self.steps_seen += pending.steps
    return _pipeline.Read(pending.steps, pending.last_step, None)


def places(times):
    """Each place's median step (seconds), places 0..9 of the window."""
    place = (np.arange(len(times)) + WARMUP) % LOG_EVERY
    return np.array([np.median(times[place == p]) for p in range(LOG_EVERY)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--jit", choices=["off", "on"], default="off")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--baseline", metavar="REV", help="an earlier revision's GradientMonitor beside")
    parser.add_argument("--sync-reads", action="store_true",
                        help="also gradwatch with each window folded and interpreted at its read "
                             "(defer_reads=False)")
    parser.add_argument("--norms-floor", action="store_true",
                        help="also exact per-step norms alone (overhead.py's norms_floor)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="gradwatch-positions-")

    def monitor(package=gw, internal=None):
        return [package.GradientMonitor(log_dir=tempfile.mkdtemp(dir=root), internal=internal)]

    configs = {"plain": lambda: [], "gradwatch": monitor, "no_writer": monitor}
    if args.sync_reads:
        # every window folded and interpreted at its read, on the training thread (writes stay on the writer)
        sync = InternalOptions(defer_reads=False)
        configs["sync_reads"] = lambda: monitor(internal=sync)
    if args.norms_floor:
        configs["norms_floor"] = lambda: [NormsFloor()]
    if args.baseline:
        import baseline

        base = baseline.load(args.baseline)
        configs["baseline"] = lambda: monitor(base)
    names = list(configs)
    data = dataset(args.model, BATCH_SIZE)
    runs = {name: [] for name in names}
    orders = balanced_orders(len(names))
    for rep in range(args.reps):
        for k in orders[rep % len(orders)]:
            name = names[k]
            _pipeline.Pipeline.read = _read_without_writer if name == "no_writer" else _READ
            try:
                times, wall, cpu = timed_fit(args.model, configs[name](), data, STEPS, args.jit == "on")
                # the gate's mean step (one-off steps left out), beside the timed steps
                mean = summarise(times, wall)["mean_ms"] / 1e3
                runs[name].append((np.array(times[WARMUP:]), cpu, mean))
            finally:
                _pipeline.Pipeline.read = _READ
    print(f"{args.model}, jit_compile={args.jit == 'on'}, {args.reps} interleaved fits of {STEPS} timed "
          f"steps per configuration; medians over fits, ms")
    by_place_of = {name: np.median([places(t) for t, _, _ in runs[name]], axis=0) for name in names}
    plain = by_place_of["plain"]
    plain_mean = statistics.median(m for _, _, m in runs["plain"])
    print(f"  {'configuration':11s} {'mean':>7s} {'ratio':>6s} {'cpu s':>6s} | {'start':>6s} {'others':>6s} "
          f"{'read':>6s} | excess per window: {'start':>6s} {'others':>6s} {'read':>6s} {'all':>6s}")
    for name in names:
        by_place = by_place_of[name]
        mean = statistics.median(m for _, _, m in runs[name])
        cpu = statistics.median(c for _, c, _ in runs[name])
        excess = (by_place - plain) * 1e3
        print(f"  {name:11s} {mean * 1e3:7.2f} {mean / plain_mean:6.3f} {cpu:6.1f} | "
              f"{by_place[0] * 1e3:6.2f} {np.mean(by_place[1:9]) * 1e3:6.2f} {by_place[9] * 1e3:6.2f} | "
              f"{'':19s}{excess[0]:6.2f} "
              f"{np.sum(excess[1:9]):6.2f} {excess[9]:6.2f} {np.sum(excess):6.2f}")
    print("  each fit's mean step in run order (ms): " + "; ".join(
        f"{name} " + " ".join(f"{np.mean(t) * 1e3:.2f}" for t, _, _ in runs[name]) for name in names))
    print("  by place (ms): " + "; ".join(
        f"{name} " + " ".join(f"{x * 1e3:.2f}" for x in by_place_of[name]) for name in names))


if __name__ == "__main__":
    main()
