"""Step-interleaved A/B of gradwatch configurations: a finer instrument than ``overhead.py``.

``overhead.py`` interleaves whole ``fit`` runs, so a slow minute of this shared
machine lands on one configuration and moves a ratio by several percent. Here every
configuration gets its own compiled model, and their train steps are called in turn,
step by step, in a new random order each step (a fixed order favoured whichever
configuration ran second by 2-3% here), each through the same ``CallbackList`` calls
``fit`` makes around a step; noise is shared evenly. Use it to judge a change of a
few percent; the README shows both instruments' figures.

The paired column is the median over steps of each step's time divided by the plain
step of the same round, which the machine's drift moves least.

``--control`` adds a second plain model (``plain:control``): its ratio to the first
is this instrument's floor on this machine (plain against plain measured within
+-1% here), the scale against which a few percent can be judged.

Below each gradwatch configuration, its steps are split by kind, as its host knew
them before the step: ``lean`` (the lean trace), ``window start`` (the window's
sampled step, a full step), ``read`` (the step whose batch end reads the window),
``other full`` (a histogram step or a pending update measure away from a window
start). The gate is a median over all steps; the split shows what moves it.

The cpu column is the process's CPU time (all threads) per step, mean: the work a
configuration adds, less moved by this VM's neighbours than wall time. The mean
column carries the host read every ``log_every`` steps; the first ``--skip`` steps
(tracing, the XLA compile of the fold at the first read) are not timed.

Usage:
    python benchmarks/step_ab.py mlp                       # plain vs defaults, jit off
    python benchmarks/step_ab.py res100 --configs gradwatch,gradwatch+hist_every_step
    python benchmarks/step_ab.py mlp --jit --steps 600
    python benchmarks/step_ab.py mlp --control      # plus plain against plain
    python benchmarks/step_ab.py deep24 --full --baseline HEAD~1   # full steps only, as the gate
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import random
import statistics
import tempfile
import time
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from overhead import CONTROL, LONG_RUN, MODELS, configurations, make_data  # noqa: E402
from overhead import baseline_configuration as overhead_baseline  # noqa: E402


class Run(NamedTuple):
    """One configuration's compiled model, its callbacks and what its steps measured."""

    name: str
    model: Any
    callbacks: Any
    iterator: Any
    monitor: Any  # its GradientMonitor, if it has one
    times: list
    cpu: list
    kinds: list


def main(argv=None, extra=None):
    """``extra(log_root, internal)``: more configurations ({name: a function that makes
    the fit's callbacks}), chosen like the others with ``--configs`` (step_parts.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--configs", default="gradwatch",
                        help="comma-separated configurations of overhead.py (plain is always run)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--skip", type=int, default=30, help="untimed steps per configuration first")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--control", action="store_true",
                        help="also run a second plain model: the instrument's floor")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run gradwatch's defaults as of git revision REV ('baseline')")
    parser.add_argument("--full", action="store_true",
                        help="no lean step in any configuration (as in overhead.py's 1,050-step fits)")
    args = parser.parse_args(argv)
    batch_size = 128
    x, y = make_data(args.model, 64 * batch_size)
    log_root = tempfile.mkdtemp(prefix="gradwatch-ab-")
    internal = dataclasses.replace(LONG_RUN, lean_steps=False) if args.full else LONG_RUN
    available = configurations(log_root, (x[:batch_size], y[:batch_size]), internal=internal)
    if extra is not None:
        available.update(extra(log_root, internal))
    if args.baseline:
        available["baseline"] = baseline_configuration(args.baseline, log_root, lean=not args.full)
    names = ["plain"] + ([CONTROL] if args.control else []) + (["baseline"] if args.baseline else []) + [
        c for c in args.configs.split(",") if c not in ("plain", CONTROL)]
    unknown = set(names) - set(available)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {sorted(available)}")
    runs = []
    for name in names:
        keras.utils.set_random_seed(0)
        model, _, _ = MODELS[args.model]()
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=args.jit)
        callbacks = keras.callbacks.CallbackList(available[name](), model=model)
        model.make_train_function()
        callbacks.on_train_begin()
        iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat())
        monitor = next((c for c in callbacks.callbacks if type(c).__name__ == "GradientMonitor"), None)
        runs.append(Run(name, model, callbacks, iterator, monitor, [], [], []))

    def step(run, index):
        run.callbacks.on_train_batch_begin(index)
        logs = run.model.train_function(run.iterator)
        run.callbacks.on_train_batch_end(index, logs)

    for index in range(args.skip):
        for run in runs:
            step(run, index)
    order = random.Random(0)
    for index in range(args.skip, args.skip + args.steps):
        for run in order.sample(runs, len(runs)):
            run.kinds.append(step_kind(run.monitor))
            start, start_cpu = time.perf_counter(), time.process_time()
            step(run, index)
            run.times.append(time.perf_counter() - start)
            run.cpu.append(time.process_time() - start_cpu)
    for run in runs:
        run.callbacks.on_train_end()
    base = runs[0].times
    base_median = statistics.median(base)
    base_mean = statistics.mean(base)
    base_cpu = statistics.mean(runs[0].cpu)
    print(f"{args.model}, jit_compile={args.jit}, {args.steps} interleaved steps per configuration")
    for run in runs:
        times = run.times
        median, mean, cpu = statistics.median(times), statistics.mean(times), statistics.mean(run.cpu)
        paired = statistics.median(t / b for t, b in zip(times, base))
        print(f"  {run.name:28s} median {median * 1e3:8.3f} ms  ratio {median / base_median:.3f}   "
              f"paired {paired:.3f}   "
              f"mean {mean * 1e3:8.3f} ms  ratio {mean / base_mean:.3f}   "
              f"cpu {cpu * 1e3:8.3f} ms  ratio {cpu / base_cpu:.3f}")
        if run.monitor is None:
            continue
        for kind in ("lean", "window start", "read", "other full"):
            chosen = [(t, b) for t, b, k in zip(times, base, run.kinds) if k == kind]
            if chosen:
                print(f"      {kind:24s} {len(chosen) / len(times):4.0%} of steps   "
                      f"median ratio {statistics.median(t for t, _ in chosen) / base_median:.3f}   "
                      f"paired {statistics.median(t / b for t, b in chosen):.3f}")


def baseline_configuration(revision: str, log_root: str, lean: bool = True):
    """The default GradientMonitor of an earlier revision (overhead.py's), whose lean
    step is traced for short runs too (as LONG_RUN does for the current code), or
    never (``lean`` False, where the revision has the switch)."""
    configure = overhead_baseline(revision, log_root)
    monitor_module = importlib.import_module("gradwatch_base.monitor")
    if hasattr(monitor_module, "LEAN_MIN_STEPS"):
        monitor_module.LEAN_MIN_STEPS = 0
    try:
        options = importlib.import_module("gradwatch_base._internal_options")
    except ImportError:
        return configure
    fields = {f.name for f in dataclasses.fields(options.InternalOptions)}
    internal = options.InternalOptions(**{name: value for name, value in
                                          (("lean_min_steps", 0), ("lean_break_even", False),
                                           ("lean_steps", lean))
                                          if name in fields})
    return lambda: [monitor_module.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), internal=internal)]


def step_kind(monitor) -> str | None:
    """What the monitor's host knows of the coming step (see the module docstring)."""
    if monitor is None or not monitor._active:
        return None
    if monitor._steps_since_read + 1 >= monitor.options.log_every:
        return "read"
    if monitor._steps_since_read == 0:
        return "window start"
    if monitor._lean_function is not None and not monitor._full_step_due():
        return "lean"
    return "other full"


if __name__ == "__main__":
    main()
