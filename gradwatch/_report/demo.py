"""``gradwatch demo``: the worked example and the example networks (a GAN trained with its own
optimizers among them), on synthetic data."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# The examples ship inside the package as ``gradwatch.examples`` (see
# pyproject.toml), so the demo runs the very files in ``examples/``.
DEMOS: tuple[tuple[str, str, dict], ...] = (
    ("worked_example", "gradwatch.examples.worked_example", {}),
    ("keras_fit", "gradwatch.examples.keras_fit", {}),
    ("gan_fit", "gradwatch.examples.gan_fit", {}),
    ("custom_loop", "gradwatch.examples.custom_loop", {}),
    ("raw_variables", "gradwatch.examples.raw_variables", {}),
    ("broken_nets", "gradwatch.examples.broken_nets", {}),
)


def run_demo(out: str = "runs/demo", echo: Callable[[str], None] = print) -> list[str]:
    """Runs every demo into ``out/<name>``, writes ``out/report.html`` over all of them, prints its
    path and the verdicts, and returns the run directories."""
    import importlib

    os.makedirs(out, exist_ok=True)
    runs = []
    for name, module_name, kwargs in DEMOS:
        run_dir = os.path.join(out, name)
        echo(f"\n=== {name}  ->  {run_dir}")
        started = time.perf_counter()
        module = importlib.import_module(module_name)
        module.main(run_dir, **kwargs)
        echo(f"({time.perf_counter() - started:.1f} s)")
        runs.append(run_dir)
    echo(f"\ngradwatch demo: {len(runs)} runs written under {os.path.abspath(out)}")
    for run_dir in runs:
        echo(f"  {run_dir}")
    echo("Each run holds run.json, windows.csv, stats.csv, layers.csv and alerts.csv; read them with "
         "gradwatch.read_stats / read_windows / read_alerts.")
    from gradwatch._report.report import build_report, summary_text

    started = time.perf_counter()
    path, verdicts = build_report(out, os.path.join(out, "report.html"))
    echo("\n" + summary_text(verdicts).rstrip())
    seconds = time.perf_counter() - started
    echo(f"\nReport of all {len(verdicts)} runs ({seconds:.1f} s): {os.path.abspath(path)}")
    echo(f"(also: gradwatch summary {out}   /   gradwatch report {out} -o report.md --format md)")
    return runs
