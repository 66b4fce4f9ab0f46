"""Memory against ``log_every``: process RSS growth of a short monitored ``fit`` for
``log_every`` from 10 to 5,000,000, each in a fresh process.

The step buffer holds at most 256 rows whatever ``log_every`` is (a full step folds
it), so the growth must not follow ``log_every``. A 4-variable MLP, 600 steps (past
two buffer folds), the growth measured from before ``fit`` to after it. Writes
``benchmarks/results/log_every_memory.json``. Run:
``.venv/bin/python benchmarks/log_every_memory.py``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "log_every_memory.json")
LOG_EVERY = (10, 1_000, 100_000, 5_000_000)


def one(log_every: int, steps: int) -> dict:
    """Fits the MLP with ``GradientMonitor(log_every=log_every)``; returns RSS before and after."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    from long_run import rss_mib

    import gradwatch as gw

    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * 8, 20)).astype("float32")
    y = x[:, :1] * 0.5
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x[:64], y[:64], batch_size=8, verbose=0)  # TensorFlow's own first-fit memory
    before = rss_mib()
    with tempfile.TemporaryDirectory() as log_dir:
        monitor = gw.GradientMonitor(log_dir=log_dir, log_every=log_every)
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[monitor])
        windows = gw.read_windows(log_dir)
    return {"log_every": log_every, "steps": int(windows.steps.sum()), "rss_before_mib": before,
            "rss_after_mib": rss_mib(), "growth_mib": rss_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--one", type=int, help="(internal) measure this log_every in this process")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.steps)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    runs = []
    for log_every in LOG_EVERY:
        out = subprocess.run([sys.executable, __file__, "--one", str(log_every), "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True, env=env).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"log_every {log_every:>9,}: +{runs[-1]['growth_mib']:.1f} MiB over {runs[-1]['steps']} steps",
              flush=True)
    import tensorflow as tf

    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "tensorflow": tf.__version__},
              "runs": runs}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
