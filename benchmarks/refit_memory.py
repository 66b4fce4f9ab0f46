"""A loop of fresh models in one process (a hyperparameter search, k-fold runs):
what each new ``fit`` costs in start-up time and in memory the process keeps.

Each configuration runs in its own child process, which builds, compiles and fits
``--fits`` fresh models one after another (``--steps`` steps each), dropping each
one after its fit (``del``, ``keras.backend.clear_session``, ``gc.collect``). It
records the wall time of every fit and the process's RSS after it. The table shows
the median fit time and the RSS kept per fit: the least-squares slope of RSS over
the fits after the first three.

TensorFlow keeps every XLA executable it compiles for the life of the process (its
device compilation cache has no eviction). With ``jit_compile`` off, gradwatch
compiles nothing with XLA (its rarely taken branches were XLA calls on nets of 32
variables or more until the eighth session, and ``GRADWATCH_JIT=0`` turned them off).

Writes ``benchmarks/results/refit_memory.json``. Run:
``.venv/bin/python benchmarks/refit_memory.py [--model mlp] [--fits 16]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "refit_memory.json")

# name: (monitored, extra environment)
CONFIGS = {
    "plain": (False, {}),
    "gradwatch": (True, {}),
}


def child(model_name: str, monitored: bool, fits: int, steps: int) -> None:
    import gc
    import logging
    import tempfile

    import keras
    from long_run import rss_mib
    from overhead import MODELS

    import gradwatch as gw

    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    batch_size = 128
    _, shape, classes = MODELS[model_name]()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch_size, *shape)).astype("float32")
    y = rng.integers(0, classes, size=steps * batch_size)
    log_root = tempfile.mkdtemp(prefix="gradwatch-refit-")
    seconds, rss = [], []
    for _ in range(fits):
        start = time.perf_counter()
        model, _, _ = MODELS[model_name]()
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        callbacks = [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root))] if monitored else []
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=callbacks)
        seconds.append(time.perf_counter() - start)
        del model, callbacks
        keras.backend.clear_session()
        gc.collect()
        rss.append(rss_mib())
    print(json.dumps({"fit_seconds": seconds, "rss_mib": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--fits", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.model, CONFIGS[args.child][0], args.fits, args.steps)
        return
    if args.fits < 6:
        parser.error("--fits must be at least 6 (the slope skips the first three)")
    results = {}
    for name, (_, env) in CONFIGS.items():
        output = subprocess.run(
            [sys.executable, __file__, "--child", name, "--model", args.model,
             "--fits", str(args.fits), "--steps", str(args.steps)],
            env={**os.environ, **env}, check=True, capture_output=True, text=True,
        ).stdout
        run = json.loads(output.strip().splitlines()[-1])
        run["median_fit_seconds"] = statistics.median(run["fit_seconds"][1:])
        kept = run["rss_mib"][3:]
        run["rss_growth_mib_per_fit"] = float(np.polyfit(np.arange(len(kept)), kept, 1)[0])
        results[name] = run
        print(f"{name:28s} fit {run['median_fit_seconds']:6.2f} s (median after the first)  "
              f"RSS after fit 1 {run['rss_mib'][0]:7.0f} MiB, after fit {args.fits} "
              f"{run['rss_mib'][-1]:7.0f} MiB, kept per fit {run['rss_growth_mib_per_fit']:5.1f} MiB",
              flush=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "fits": args.fits,
                   "steps_per_fit": args.steps, "machine": {"cpus": os.cpu_count(),
                                                            "platform": platform.platform()},
                   "results": results}, f, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
