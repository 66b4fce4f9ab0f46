"""``gradwatch layout LOG_DIR``: adds gradwatch's Custom Scalars dashboard layout to runs written
without it (no TensorFlow).

``LOG_DIR`` is one run (the ``log_dir`` given to ``GradientMonitor``/``Watch``) or a directory
above several runs. The layout's per-layer charts follow the run's layer order (from
``run.json`` or the ``gradwatch/run`` summary). A run whose event files already hold a layout
is left alone unless ``force`` is set.
"""

from __future__ import annotations

import os

from gradwatch._io.readers import GradwatchDataError, event_files, iter_records, list_runs, read_run
from gradwatch._sinks.tb_sink import LAYOUT_TAG, write_layout


def has_layout(run_dir: str) -> bool:
    """Whether an event file of ``run_dir`` holds a Custom Scalars layout.

    Args:
        run_dir: one run's directory.

    Returns:
        True when a layout summary is there.
    """
    mark = LAYOUT_TAG.encode()
    return any(mark in record for path in event_files(run_dir) for record in iter_records(path))


def add_layout(log_dir: str, force: bool = False, echo=print) -> list[str]:
    """Writes the layout into every run under ``log_dir`` that lacks it.

    Args:
        log_dir: a run, or a directory above several runs.
        force: write a layout even into a run that has one.
        echo: where each run's one-line outcome goes.

    Returns:
        The event files written.

    Raises:
        GradwatchDataError: no gradwatch run under ``log_dir``.
    """
    written = []
    for rel in list_runs(log_dir):
        run_dir = os.path.normpath(os.path.join(log_dir, rel))
        if has_layout(run_dir) and not force:
            echo(f"{run_dir}: already has a Custom Scalars layout (use --force to add another).")
            continue
        try:
            layers = [layer["name"] for layer in read_run(run_dir).get("layers", [])]
        except GradwatchDataError:
            layers = []  # no run info: the charts by tag pattern still work, without per-layer charts
        path = write_layout(run_dir, layers)
        echo(f"{run_dir}: wrote the layout ({len(layers)} layers) to {os.path.basename(path)}")
        written.append(path)
    return written
