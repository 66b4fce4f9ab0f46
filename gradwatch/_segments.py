"""A run's history: its segments, and where the next fit's steps begin (no TensorFlow).

A run is written by one front, possibly over many fits (a monitor reused after a
recompile, on another model, or a new monitor with ``append=True``). Nothing of an
earlier fit is erased:

* a fit whose optimizer continues (same watched variables, iterations > 0) is a
  *resume*: its steps are the optimizer's iterations (shifted by the segment's
  ``step_offset``) and the rows from its first step on are replaced (BackupAndRestore
  replays a part of an epoch);
* a fit whose optimizer restarts at iteration 0, or whose watched variables changed
  (names or shapes), opens a new *segment* numbered after the last step written.

``run.json`` lists the segments (``SEGMENTS_KEY``), each with its first and last step,
why it began, the optimizer and the watched variables. A segment's ``last_step`` is
written when its fit ends; after a crash it is None and the rows say where it ended.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gradwatch._io.schema import RUN_FILE, SEGMENTS_KEY, WINDOWS_FILE, segments_of_run
from gradwatch._sinks.csv_sink import last_step as last_step_in

#: Why a segment began.
REASONS = ("start", "optimizer_restart", "variables_changed", "append")


def variables_key(variables: list[dict[str, Any]]) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes of a segment's watched variables (what must match to continue one)."""
    return [(v["name"], tuple(v.get("shape") or ())) for v in variables]


class RunHistory:
    """The segments of one run, kept over every fit of a front (and every pipeline it builds)."""

    def __init__(self):
        self.segments: list[dict[str, Any]] = []
        self.last_step = 0  # the last step written (or replaced up to, on a resume)
        self.opened = False  # the run's files were opened (later opens continue them)

    def load(self, log_dir: str) -> None:
        """Continues the run already in ``log_dir`` (``append=True``): its segments and last step."""
        try:
            with open(os.path.join(log_dir, RUN_FILE), encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            return
        windows = os.path.join(log_dir, WINDOWS_FILE)
        last = last_step_in(windows) if os.path.exists(windows) else None
        self.last_step = int(last or 0)
        self.segments = [dict(s) for s in segments_of_run(previous, last)]

    def begin(self, description: dict[str, Any], iterations: int | None, continuing: bool) -> int | None:
        """Places a fit's (or a ``Watch``'s) steps, before its first step.

        Args:
            description: the segment's facts: ``front``, ``optimizer``, ``model_name``, ``variables``
                (the topology's variable entries).
            iterations: the optimizer's iterations before the first step (None: a ``Watch``).
            continuing: the same recorder counts on from its last fit, whose end left the
                optimizer's iterations where they are now.

        Returns:
            The step before the first step, or None when the recorder's own count continues.
        """
        variables = [{k: v[k] for k in ("name", "layer", "shape", "dtype") if k in v}
                     for v in description.get("variables", [])]
        last = self.segments[-1] if self.segments else None
        same = last is not None and variables_key(last.get("variables", [])) == variables_key(variables)
        if same and continuing:
            return None
        offset = int(last.get("step_offset", 0)) if last is not None else 0
        if same and iterations and iterations + offset >= last["first_step"] - 1:
            start = iterations + offset  # a resume: rows from start + 1 on are replaced
            last["last_step"] = start if start >= last["first_step"] else None
            self.last_step = start
            return start
        if last is None:
            reason, start = "start", int(iterations or 0)
        else:
            reason = "variables_changed" if not same else ("append" if iterations is None
                                                           else "optimizer_restart")
            start = self.last_step
        self.segments.append({
            "segment": len(self.segments) + 1, "first_step": start + 1, "last_step": None,
            "reason": reason, "iterations_at_start": iterations, "step_offset": start - int(iterations or 0),
            "front": description.get("front"), "optimizer": description.get("optimizer"),
            "model_name": description.get("model_name", ""), "variables": variables,
        })
        self.last_step = start
        return start

    def note(self, last_step: int | None) -> None:
        """A window up to ``last_step`` was read."""
        if last_step is None:
            return
        self.last_step = int(last_step)
        if self.segments:
            self.segments[-1]["last_step"] = int(last_step)

    def to_json(self) -> list[dict[str, Any]]:
        """The segments as ``run.json`` lists them."""
        return [dict(s) for s in self.segments]


__all__ = ["REASONS", "RunHistory", "SEGMENTS_KEY", "variables_key"]
