"""Long-run benchmark: bounded memory and no alert storm over many steps.

A tiny model of raw ``tf.Variable``s trained in a custom loop (``tf.function`` step,
``Watch(log_every=10)``, CSV + TensorBoard files written) for ``--steps`` steps:

* healthy run: RSS (``VmRSS`` of ``/proc/self/status``) sampled every ``--sample-every``
  steps; the slope of a least-squares line through the samples after the warm-up
  (the first ``--warmup`` steps) is reported in MiB per 10k steps; the alert rows are counted.
* persistent run (``--persistent-steps``): one variable reaches the loss through a
  1e-9 factor, so its gradient vanishes on every step; the condition never clears,
  so the alerts must be one per (kind, variable) plus at most one reminder every
  ``remind_every`` windows: rows <= conditions * (1 + windows // remind_every).

Writes ``benchmarks/results/long_run.json``.

Run: ``.venv/bin/python benchmarks/long_run.py [--steps 100000 --persistent-steps 20000]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradwatch as gw  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "long_run.json")
LOG_EVERY = 10
BATCH, FEATURES, HIDDEN = 32, 8, 16


def rss_mib() -> float:
    """This process's resident set size (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status (not Linux?)")


def train(steps: int, log_dir: str, persistent: bool, sample_every: int) -> dict:
    """Trains ``steps`` steps; returns RSS samples, timing and the alerts written."""
    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(1024, FEATURES)).astype("float32")
    y_all = np.tanh(x_all @ rng.normal(size=(FEATURES, 1))).astype("float32")
    w1 = tf.Variable(rng.normal(size=(FEATURES, HIDDEN)).astype("float32") * 0.4, name="w1")
    b1 = tf.Variable(np.zeros(HIDDEN, "float32"), name="b1")
    w2 = tf.Variable(rng.normal(size=(HIDDEN, 1)).astype("float32") * 0.3, name="w2")
    b2 = tf.Variable(np.zeros(1, "float32"), name="b2")
    variables = [w1, b1, w2, b2]
    if persistent:
        # Reaches the loss only through a 1e-9 factor: a vanishing gradient on every step.
        variables.append(tf.Variable(rng.normal(size=(FEATURES, HIDDEN)).astype("float32"), name="faint"))
    optimizer = tf.keras.optimizers.SGD(0.05)
    watch = gw.Watch(log_dir=log_dir, log_every=LOG_EVERY)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            pre = x @ w1 + b1
            if persistent:
                pre = pre + 1e-9 * (x @ variables[4])
            loss = tf.reduce_mean(tf.square(tf.tanh(pre) @ w2 + b2 - y))
        grads = tape.gradient(loss, variables)
        grads = watch.observe(grads, variables, loss=loss)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    batches = [(tf.constant(x_all[i:i + BATCH]), tf.constant(y_all[i:i + BATCH]))
               for i in range(0, len(x_all), BATCH)]
    samples = [(0, rss_mib())]
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        watch.step_end()
        if (i + 1) % sample_every == 0:
            samples.append((i + 1, rss_mib()))
            print(f"  step {i + 1}: RSS {samples[-1][1]:.1f} MiB, "
                  f"{(time.perf_counter() - start) / (i + 1) * 1e3:.2f} ms/step", flush=True)
    watch.close()
    seconds = time.perf_counter() - start
    alerts = gw.read_alerts(log_dir)
    windows = gw.read_windows(log_dir)
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "ms_per_step": round(seconds / steps * 1e3, 3),
        "windows": int(len(windows)),
        "rss_mib": [[s, round(r, 2)] for s, r in samples],
        "alert_rows": int(len(alerts)),
        "alert_rows_by_condition": {
            f"{kind} {layer}/{variable}": int(count)
            for (kind, layer, variable), count in alerts.groupby(["kind", "layer", "variable"]).size().items()
        } if len(alerts) else {},
        # A condition that clears and comes back ("flaps") starts again: > 1 start per
        # condition is a storm the remind_every bound does not limit.
        "alert_starts": int(((alerts.severity != "info") & ~alerts.message.str.startswith("Still:")).sum()),
        "alert_reminders": int(alerts.message.str.startswith("Still:").sum()),
        "alert_clears": int((alerts.severity == "info").sum()),
        "alert_steps_first_50": [int(s) for s in alerts.step][:50],
        "final_loss": float(windows.loss.iloc[-1]),
        "log_bytes": sum(os.path.getsize(os.path.join(log_dir, f)) for f in os.listdir(log_dir)),
    }


def slope_per_10k(samples: list[list[float]], warmup: int) -> float:
    """Least-squares RSS slope after ``warmup`` steps, in MiB per 10k steps."""
    points = np.array([p for p in samples if p[0] >= warmup], dtype=np.float64)
    if len(points) < 2:
        return float("nan")
    return float(np.polyfit(points[:, 0], points[:, 1], 1)[0] * 10_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--persistent-steps", type=int, default=20_000)
    parser.add_argument("--sample-every", type=int, default=5_000)
    parser.add_argument("--warmup", type=int, default=10_000)
    args = parser.parse_args()
    remind_every = gw.detectors.Thresholds().remind_every
    result: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
                    "python": sys.version.split()[0], "platform": platform.platform(),
                    "tensorflow": tf.__version__},
        "log_every": LOG_EVERY,
        "remind_every": remind_every,
    }
    with tempfile.TemporaryDirectory() as tmp:
        print(f"healthy run, {args.steps} steps", flush=True)
        healthy = train(args.steps, os.path.join(tmp, "healthy"), False, args.sample_every)
        healthy["rss_slope_mib_per_10k_steps"] = round(slope_per_10k(healthy["rss_mib"], args.warmup), 3)
        after = [r for s, r in healthy["rss_mib"] if s >= args.warmup]
        healthy["rss_growth_after_warmup_mib"] = round(after[-1] - after[0], 2) if after else None
        result["healthy"] = healthy
        if args.persistent_steps:
            print(f"persistent-condition run, {args.persistent_steps} steps", flush=True)
            persistent = train(args.persistent_steps, os.path.join(tmp, "persistent"), True,
                               args.sample_every)
            conditions = len(persistent["alert_rows_by_condition"])
            persistent["alert_row_bound"] = conditions * (1 + persistent["windows"] // remind_every)
            persistent["no_storm"] = persistent["alert_rows"] <= persistent["alert_row_bound"]
            persistent["faint_rows"] = sum(
                n for key, n in persistent["alert_rows_by_condition"].items() if "faint" in key
            )
            result["persistent"] = persistent
    result["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as out:
        json.dump(result, out, indent=1)
    print(json.dumps({k: v for k, v in result["healthy"].items() if k != "rss_mib"}, indent=1))
    if "persistent" in result:
        print(json.dumps({k: v for k, v in result["persistent"].items() if k != "rss_mib"}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
