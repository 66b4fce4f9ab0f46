"""What a window costs off the training thread: the writer thread's CPU time per window
(``time.thread_time``, split into the fold of the read's rows, the interpretation and
the writes), and the read's wall time on the training thread, in one ``fit`` with the
default ``GradientMonitor``.

Why its own instrument: ``step_ab.py`` interleaves configurations step by step, so a
monitor's writer thread works during the other configurations' steps and its cost is
spread over all of them; ``overhead.py`` sees it, but within this VM's fit-to-fit
noise. The writer's CPU per window is the work that competes with the step for the
two cores (and for the GIL), measured directly. The first ``--skip`` windows are left
out of the medians and shown apart (the read's first call is its trace).

Usage:
    python benchmarks/writer_cost.py mlp
    python benchmarks/writer_cost.py deep24 --steps 400
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from overhead import BATCH_SIZE, MODELS, dataset  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._capture import recorder as recorder_lib  # noqa: E402
from gradwatch._interpret import interpreter as interpreter_lib  # noqa: E402
from gradwatch._sinks import output  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name: str, function: Any, clock: Any = time.thread_time) -> Any:
    """``function``, its calls' times (on ``clock``) kept under ``name`` (this process only)."""
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[name].append(clock() - start)
    return wrapper


def instrument() -> None:
    submit = output._Writer.submit
    output._Writer.submit = lambda self, work, *args: submit(self, timed("writer, all", work), *args)
    recorder_lib.PendingRead.finish = timed("fold (PendingRead.finish)", recorder_lib.PendingRead.finish)
    interpreter_lib.Interpreter.interpret = timed("interpretation", interpreter_lib.Interpreter.interpret)
    recorder_lib.Recorder.read_pending = timed("read on the training thread (wall)",
                                               recorder_lib.Recorder.read_pending, time.perf_counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--skip", type=int, default=3)
    args = parser.parse_args()
    instrument()
    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[args.model]()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    start = time.perf_counter()
    model.fit(dataset(args.model, BATCH_SIZE), steps_per_epoch=args.steps, epochs=1, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=tempfile.mkdtemp())])
    wall = time.perf_counter() - start
    print(f"{args.model}: {args.steps} steps in {wall:.1f} s, log_every 10; per window, median "
          f"(first {args.skip} windows apart), ms:")
    for name, values in TIMES.items():
        rest = values[args.skip:] or values
        first = " ".join(f"{v * 1e3:.1f}" for v in values[:args.skip])
        print(f"  {name:40s} {statistics.median(rest) * 1e3:7.2f}   (n={len(rest)}; first: {first})")
    all_writer = statistics.median(TIMES["writer, all"][args.skip:])
    parts = sum(statistics.median(TIMES[name][args.skip:])
                for name in ("fold (PendingRead.finish)", "interpretation"))
    print(f"  {'writes and the rest (difference)':40s} {(all_writer - parts) * 1e3:7.2f}")


if __name__ == "__main__":
    main()
