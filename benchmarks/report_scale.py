"""Report scale benchmark: ``gradwatch report`` and ``gradwatch summary`` on a large synthetic run.

The run: 100 layers x (kernel + bias) = 200 variables, 5,000 windows: stats.csv 1M rows,
layers.csv 500k rows, windows.csv 5k rows, a few alerts, written with the schema's columns.
Each command runs in a subprocess (wall time; peak RSS from ``RUSAGE_CHILDREN``).
Targets: report under 15 s and under 2 GiB peak.  Writes ``benchmarks/results/report_scale.json``.

Run: ``.venv/bin/python benchmarks/report_scale.py [--layers 100 --windows 5000 --keep DIR]``

``--runs 300`` measures the other scale instead: ``gradwatch report`` over a directory of 300
small runs (4 layers, 50 windows each; one in ten diverges, one in ten clips on every step):
wall time, peak RSS and the bytes written (the index page and every page beside it). Target:
under 20 s. Writes ``benchmarks/results/report_many.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from gradwatch._io.schema import ALERT_COLUMNS, SCHEMA_VERSION, STATS_COLUMNS, WINDOW_COLUMNS

TARGET_SECONDS = 15.0
MANY_TARGET_SECONDS = 20.0
MANY_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "report_many.json")
TARGET_BYTES = 2 << 30
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "report_scale.json")


def _stats_frame(steps: np.ndarray, names: list[str], layer_of: list[str], rng: np.random.Generator,
                 depth: np.ndarray, variable: list[str] | None) -> pd.DataFrame:
    """Rows (window x name) with plausible values: norms shrink with depth (a vanishing trend)."""
    n_steps, n_names = len(steps), len(names)
    size = n_steps * n_names
    decay = np.tile(10.0 ** (-depth / 12.0), n_steps)
    l2 = (decay * rng.lognormal(0.0, 0.3, size)).astype(np.float32)
    frame = pd.DataFrame({
        "step": np.repeat(steps, n_names),
        "steps": 10,
        "layer": np.tile(np.array(layer_of, dtype=object), n_steps),
        "variable": np.tile(np.array(variable or ["*"] * n_names, dtype=object), n_steps),
        "l2": l2,
        "l2_max": l2 * np.float32(1.3),
        "l2_min": l2 * np.float32(0.7),
        "l2_mean": l2,
        "max_abs": l2 * np.float32(0.1),
        "mean_abs": l2 * np.float32(0.01),
        "zero_frac": np.float32(0.0),
        "nonfinite": 0,
        "grad_steps": 10,
        "clip_scale_min": np.nan,
        "clip_fraction": np.nan,
        "update_ratio": (1e-3 * rng.lognormal(0.0, 0.5, size)).astype(np.float32),
        "update_cos": np.float32(-0.9),
        "dead_frac": (rng.random(size) < 0.01).astype(np.float32) * np.float32(0.05),
        "no_signal_frac": np.float32(0.0),
    })
    return frame[list(STATS_COLUMNS)]


def _healthy_windows(steps: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """windows.csv rows of a healthy run: a falling loss, a steady global norm, no NaN."""
    windows = len(steps)
    rows = pd.DataFrame({c: np.nan for c in WINDOW_COLUMNS}, index=range(windows))
    rows["step"], rows["steps"] = steps, 10
    rows["loss"] = 2.0 * np.exp(-steps / steps[-1]) + 0.05 * rng.random(windows)
    rows["learning_rate"] = 1e-3
    rows["global_l2"] = rng.lognormal(0.0, 0.2, windows)
    rows[["nonfinite_steps", "skipped_steps"]] = 0
    rows["first_nonfinite_step"] = ""
    rows["nonfinite_loss_at_first"] = ""
    return rows


def generate(log_dir: str, layers: int, windows: int) -> dict[str, float]:
    """Writes the synthetic run; returns file sizes (MB) and the generation time."""
    started = time.perf_counter()
    os.makedirs(log_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    layer_names = [f"block_{i:03d}" for i in range(layers)]
    variables = [f"{name}/{part}" for name in layer_names for part in ("kernel", "bias")]
    var_layers = [v.split("/")[0] for v in variables]
    run = {
        "gradwatch_version": "benchmark", "model_name": "synthetic", "front": "benchmark",
        "layers": [{"name": n, "index": i, "class_name": "Dense", "activation": "relu",
                    "variables": [f"{n}/kernel", f"{n}/bias"]} for i, n in enumerate(layer_names)],
        "variables": [{"name": v, "layer": v.split("/")[0], "shape": [64, 64]} for v in variables],
    }
    with open(os.path.join(log_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(run, f)
    steps = np.arange(1, windows + 1, dtype=np.int64) * 10
    float_format = "%.6g"
    stats = _stats_frame(steps, variables, var_layers, rng, np.repeat(np.arange(layers), 2), variables)
    stats.to_csv(os.path.join(log_dir, "stats.csv"), index=False, float_format=float_format)
    del stats
    layer_rows = _stats_frame(steps, layer_names, layer_names, rng, np.arange(layers), None)
    layer_rows.to_csv(os.path.join(log_dir, "layers.csv"), index=False, float_format=float_format)
    del layer_rows
    window_rows = _healthy_windows(steps, rng)
    window_rows.to_csv(os.path.join(log_dir, "windows.csv"), index=False, float_format=float_format)
    at = [steps[int(f * (windows - 1))] for f in (0.006, 0.24, 0.4, 0.8)]
    alerts = [
        (at[0], "block_000", "*", "vanishing_gradient", "warning", 2e-9, 1e-8,
         "Layer 'block_000': RMS gradient 2e-09", "Use ReLU-family activations."),
        (at[2], "block_000", "*", "vanishing_gradient", "info", 2e-7, 1e-8,
         "Layer 'block_000': vanishing gradient has cleared (recovered).", ""),
        (at[1], f"block_{layers // 2:03d}", "*", "exploding_gradient", "warning", 3e4, 1e4,
         f"Layer 'block_{layers // 2:03d}': gradient norm up to 3e+04 in this window.",
         "Lower the learning rate."),
        (at[3], f"block_{layers - 1:03d}", "*", "dead_relu", "warning", 0.6, 0.5,
         f"Layer 'block_{layers - 1:03d}': 60% of units dead.", "Use Leaky ReLU."),
    ]
    pd.DataFrame(alerts, columns=list(ALERT_COLUMNS)).to_csv(os.path.join(log_dir, "alerts.csv"), index=False)
    sizes = {name: os.path.getsize(os.path.join(log_dir, name)) / 1e6
             for name in ("stats.csv", "layers.csv", "windows.csv", "alerts.csv")}
    return {"generate_s": time.perf_counter() - started, **{f"{k}_MB": v for k, v in sizes.items()}}


def generate_small(log_dir: str, index: int, layers: int = 4, windows: int = 50) -> None:
    """One small run of ``layers`` Dense layers and ``windows`` windows of 10 steps; run ``index``
    % 10 == 3 diverges (NaN from the middle on), % 10 == 7 clips on every step."""
    os.makedirs(log_dir, exist_ok=True)
    rng = np.random.default_rng(index)
    names = [f"dense_{i}" for i in range(layers)]
    variables = [f"{name}/{part}" for name in names for part in ("kernel", "bias")]
    run = {"schema_version": SCHEMA_VERSION, "gradwatch_version": "benchmark", "model_name": f"small_{index}",
           "front": "benchmark",
           "layers": [{"name": n, "index": i, "class_name": "Dense", "activation": "relu",
                       "variables": [f"{n}/kernel", f"{n}/bias"]} for i, n in enumerate(names)],
           "variables": [{"name": v, "layer": v.split("/")[0], "shape": [16, 16]} for v in variables]}
    with open(os.path.join(log_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(run, f)
    steps = np.arange(1, windows + 1, dtype=np.int64) * 10
    diverges, clips = index % 10 == 3, index % 10 == 7
    for name, rows_of, layer_of, depth, variable in (
        ("stats.csv", variables, [v.split("/")[0] for v in variables], np.repeat(np.arange(layers), 2),
         variables),
        ("layers.csv", names, names, np.arange(layers), None),
    ):
        frame = _stats_frame(steps, rows_of, layer_of, rng, depth, variable)
        if diverges:
            bad = frame["step"] > steps[windows // 2]
            frame.loc[bad, ["l2", "l2_max", "l2_min", "l2_mean", "max_abs", "mean_abs"]] = np.nan
            frame.loc[bad, "nonfinite"] = 2560
        if clips:
            frame[["clip_fraction", "clip_scale_min"]] = [1.0, 0.2]
        frame.to_csv(os.path.join(log_dir, name), index=False, float_format="%.6g")
    window_rows = _healthy_windows(steps, rng)
    alerts = []
    if diverges:
        bad = window_rows["step"] > steps[windows // 2]
        window_rows.loc[bad, ["loss", "global_l2"]] = np.nan
        window_rows.loc[bad, "nonfinite_steps"] = 10
        window_rows.loc[bad, "first_nonfinite_step"] = (window_rows.loc[bad, "step"] - 9).astype(str)
        first = int(steps[windows // 2] + 1)
        alerts.append((first, "", "", "nonfinite_gradient", "error", 2560.0, 0.0,
                       f"Non-finite loss at step {first}.", "Lower the learning rate."))
    if clips:
        window_rows[["clip_fraction", "clip_scale_min", "clip_threshold"]] = [1.0, 0.2, 1.0]
    window_rows.to_csv(os.path.join(log_dir, "windows.csv"), index=False, float_format="%.6g")
    pd.DataFrame(alerts, columns=list(ALERT_COLUMNS)).to_csv(os.path.join(log_dir, "alerts.csv"), index=False)


def written_bytes(output: str) -> int:
    """The bytes of the report at ``output`` and of every file beside it in ``<stem>_files/``."""
    total = os.path.getsize(output)
    files = os.path.splitext(output)[0] + "_files"
    for root, _, names in os.walk(files):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in names)
    return total


def many_runs(count: int, gradwatch: list[str]) -> None:
    """``gradwatch report`` over ``count`` small runs; writes ``MANY_RESULTS``."""
    with tempfile.TemporaryDirectory() as scratch:
        root = os.path.join(scratch, "runs")
        started = time.perf_counter()
        for index in range(count):
            generate_small(os.path.join(root, f"run_{index:03d}"), index)
        generate_s = time.perf_counter() - started
        output = os.path.join(scratch, "report.html")
        report = timed([*gradwatch, "report", root, "-o", output])
        report["main_page_MB"] = os.path.getsize(output) / 1e6
        report["written_MB"] = written_bytes(output) / 1e6
    result = {
        "benchmark": "report_many",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15": os.getloadavg(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "note": "shared, noisy machine (several engineers); one run, not a median"},
        "runs": {"count": count, "layers": 4, "windows": 50, "generate_s": generate_s},
        "report": report,
        "target_seconds": MANY_TARGET_SECONDS,
        "meets_target": report["seconds"] < MANY_TARGET_SECONDS,
    }
    print(f"gradwatch report over {count} runs: {report['seconds']:.1f} s, peak RSS "
          f"{report['peak_rss_bytes'] / 2**20:.0f} MiB, main page {report['main_page_MB']:.2f} MB, "
          f"{report['written_MB']:.2f} MB written in all (target < {MANY_TARGET_SECONDS:.0f} s)")
    os.makedirs(os.path.dirname(MANY_RESULTS), exist_ok=True)
    with open(MANY_RESULTS, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {MANY_RESULTS}")


def timed(command: list[str]) -> dict[str, float]:
    """Runs ``command`` in a subprocess: wall seconds, exit status, peak RSS of the child (bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over waited children
    if result.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return {"seconds": seconds, "exit": result.returncode, "peak_rss_bytes": peak_kb * 1024,
            "peak_is_this_command": peak_kb > before, "stderr_tail": result.stderr[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--windows", type=int, default=5000)
    parser.add_argument("--keep", help="generate into this directory and keep it")
    parser.add_argument("--runs", type=int, default=0, help="measure a report over this many small runs")
    args = parser.parse_args()
    gradwatch = os.path.join(os.path.dirname(sys.executable), "gradwatch")
    if args.runs:  # the gradwatch that PYTHONPATH (or the venv) gives this interpreter
        many_runs(args.runs, [sys.executable, "-m", "gradwatch"])
        return
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = args.keep or os.path.join(scratch, "run")
        print(f"generating {args.layers} layers x 2 variables x {args.windows} windows in {log_dir} ...")
        generated = generate(log_dir, args.layers, args.windows)
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in generated.items()))
        # The report first: RUSAGE_CHILDREN's maximum then belongs to it alone.
        report = timed([gradwatch, "report", log_dir, "-o", os.path.join(scratch, "report.html")])
        report["html_MB"] = os.path.getsize(os.path.join(scratch, "report.html")) / 1e6
        summary = timed([gradwatch, "summary", log_dir])
    load = os.getloadavg()
    result = {
        "benchmark": "report_scale",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15": load, "python": platform.python_version(),
                    "pandas": pd.__version__, "platform": platform.platform(),
                    "note": "shared, noisy machine (several engineers); one run, not a median"},
        "run": {"layers": args.layers, "variables": 2 * args.layers, "windows": args.windows,
                "stats_rows": 2 * args.layers * args.windows, "layer_rows": args.layers * args.windows},
        "generated": generated,
        "report": report,
        "summary": {k: v for k, v in summary.items() if k != "peak_rss_bytes"},
        "targets": {"report_seconds": TARGET_SECONDS, "report_peak_bytes": TARGET_BYTES},
        "meets_targets": report["seconds"] < TARGET_SECONDS and report["peak_rss_bytes"] < TARGET_BYTES,
    }
    peak_mib = report["peak_rss_bytes"] / 2**20
    print(f"gradwatch report : {report['seconds']:.1f} s, peak RSS {peak_mib:.0f} MiB, "
          f"HTML {report['html_MB']:.2f} MB (targets < {TARGET_SECONDS:.0f} s, < 2048 MiB)")
    print(f"gradwatch summary: {summary['seconds']:.1f} s, exit {summary['exit']}")
    print(f"load average {load[0]:.2f} on {os.cpu_count()} CPUs (shared machine: numbers are noisy)")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
