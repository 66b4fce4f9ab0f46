"""The host read's fold of a window's buffered rows, alone: in numpy (what the host
runs since the ninth session), as a graph function (what it ran before) and as one
XLA call (before the sixth session: its compile left the process 85 MiB larger): its
first call (trace; and the XLA compile) and its time a call, for a small and a large
net (6 and 300 variables, 20 rows of which 10 are folded). The numpy fold's time is
also given as the time it holds the GIL (thread CPU time: numpy's small arrays do
not release it), which the training thread may wait on between two steps.

Usage:
    python benchmarks/fold_speed.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradwatch._capture import model_topology  # noqa: E402
from gradwatch._capture.accumulate import StepBuffer, StepFolder  # noqa: E402
from gradwatch._capture.layouts import StepRow  # noqa: E402
from gradwatch._capture.window import Window  # noqa: E402

ROWS, CALLS = 20, 200


def main() -> None:
    for num_vars in (6, 300):
        variables = [tf.Variable(np.zeros((2, 3), np.float32)) for _ in range(num_vars)]
        topology = model_topology.from_variables(variables, [f"layer{i // 2}/v{i}" for i in range(num_vars)])
        window = Window(num_vars + len(topology.layers))
        buffer = StepBuffer(StepFolder(topology, window, False), window, num_vars, ROWS)
        width = StepRow(num_vars).width
        rows = np.abs(np.random.default_rng(0).normal(size=(ROWS, width))).astype(np.float32)
        args = (tf.constant(window._var_reset), tf.constant(window._global_reset), tf.constant(rows),
                tf.range(1, ROWS + 1, dtype=tf.int64), tf.constant(ROWS // 2, tf.int64),
                tf.zeros([2], tf.float64))
        host_args = [np.asarray(a) for a in args]
        fetched = {"rows": host_args[2], "steps": host_args[3], "loss_prev": host_args[5]}

        def numpy_fold(*_, buffer=buffer, host_args=host_args, fetched=fetched):
            return buffer.fold_fetched(host_args[0], host_args[1], fetched, ROWS // 2)

        for kind, fold in (("numpy", numpy_fold),
                           ("graph", tf.function(buffer._folder.fold, autograph=False)),
                           ("xla", tf.function(buffer._folder.fold, autograph=False, jit_compile=True))):
            start = time.perf_counter()
            np.asarray(fold(*args)[0])
            first = time.perf_counter() - start
            for _ in range(20):
                fold(*args)
            start, cpu = time.perf_counter(), time.thread_time()
            for _ in range(CALLS):
                result = fold(*args)
            np.asarray(result[0])
            per_call = (time.perf_counter() - start) / CALLS
            cpu = (time.thread_time() - cpu) / CALLS
            print(f"variables {num_vars:4d}  {kind:5s}  first call {first:.3f} s  "
                  f"a call {per_call * 1e3:.3f} ms  (this thread's CPU {cpu * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
