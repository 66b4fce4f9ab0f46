"""Memory under ``model.fit``: process RSS after 20,000 monitored steps against after 2,000.

The issue's check ("no growth with steps") for the ``GradientMonitor`` front: a small
Keras MLP trained with ``fit`` and ``GradientMonitor()`` defaults (CSV and TensorBoard
files written every 10 steps, histograms every 100, update snapshots taken by the
host every 50), over several epochs of a repeated dataset. ``VmRSS`` is sampled by a
callback every ``--sample-every`` steps. ``long_run.py`` does the same for ``Watch``
in a custom loop over 100,000 steps.

Writes ``benchmarks/results/fit_memory.json``. Run:
``.venv/bin/python benchmarks/fit_memory.py [--steps 20000]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from long_run import rss_mib  # noqa: E402

import gradwatch as gw  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fit_memory.json")


class RssSampler(keras.callbacks.Callback):
    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.steps = 0
        self.samples: list[tuple[int, float]] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps % self.every == 0:
            self.samples.append((self.steps, rss_mib()))
            print(f"  step {self.steps}: RSS {self.samples[-1][1]:.1f} MiB, "
                  f"{(time.perf_counter() - self.start) / self.steps * 1e3:.2f} ms/step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--sample-every", type=int, default=1_000)
    parser.add_argument("--early", type=int, default=2_000, help="the step compared against the last")
    args = parser.parse_args()
    steps_per_epoch = 500
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps_per_epoch * 32, 20)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    sampler = RssSampler(args.sample_every)
    with tempfile.TemporaryDirectory() as log_dir:
        monitor = gw.GradientMonitor(log_dir=log_dir)
        model.fit(x, y, batch_size=32, epochs=args.steps // steps_per_epoch, shuffle=False,
                  verbose=0, callbacks=[monitor, sampler])
        log_bytes = sum(os.path.getsize(os.path.join(log_dir, f)) for f in os.listdir(log_dir))
        windows = len(gw.read_windows(log_dir))
    seconds = time.perf_counter() - sampler.start
    rss = dict(sampler.samples)
    early, last = rss[args.early], sampler.samples[-1][1]
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "steps": sampler.steps,
        "seconds": round(seconds, 1),
        "windows": windows,
        "log_bytes": log_bytes,
        "rss_mib": [[s, round(r, 2)] for s, r in sampler.samples],
        f"rss_at_{args.early}_mib": round(early, 2),
        f"rss_at_{sampler.steps}_mib": round(last, 2),
        "growth_fraction": round((last - early) / early, 4),
        "within_5_percent": abs(last - early) <= 0.05 * early,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as out:
        json.dump(result, out, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
