"""Adds gradwatch's Custom Scalars dashboard layout to runs written without it.

Usage: ``python dashboards/layout.py LOG_DIR [--force]``

``LOG_DIR`` is one run (the ``log_dir`` given to ``GradientMonitor``/``Watch``) or a directory
above several runs.  The layout's per-layer charts follow the run's layer order (from
``run.json`` or the ``gradwatch/run`` summary).  A run whose event files already hold a layout
is left alone unless ``--force`` is given.  No TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

from gradwatch._io.readers import GradwatchDataError, event_files, iter_records, list_runs, read_run
from gradwatch._sinks.tb_sink import LAYOUT_TAG, write_layout


def has_layout(run_dir: str) -> bool:
    """Whether an event file of ``run_dir`` holds a Custom Scalars layout."""
    mark = LAYOUT_TAG.encode()
    return any(mark in record for path in event_files(run_dir) for record in iter_records(path))


def add_layout(log_dir: str, force: bool = False) -> list[str]:
    """Writes the layout into every run under ``log_dir`` that lacks it; returns the files written."""
    written = []
    for rel in list_runs(log_dir):
        run_dir = os.path.normpath(os.path.join(log_dir, rel))
        if has_layout(run_dir) and not force:
            print(f"{run_dir}: already has a Custom Scalars layout (use --force to add another).")
            continue
        try:
            layers = [layer["name"] for layer in read_run(run_dir).get("layers", [])]
        except GradwatchDataError:
            layers = []  # no run info: the charts by tag pattern still work, without per-layer charts
        path = write_layout(run_dir, layers)
        print(f"{run_dir}: wrote the layout ({len(layers)} layers) to {os.path.basename(path)}")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", help="a gradwatch run, or a directory above several runs")
    parser.add_argument("--force", action="store_true", help="write the layout even if one is there")
    args = parser.parse_args(argv)
    try:
        add_layout(args.log_dir, args.force)
    except GradwatchDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
