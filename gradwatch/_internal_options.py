"""Seams for tests and benchmarks (not API): ``GradientMonitor(internal=...)`` and
``Watch(internal=...)`` take these to switch a mechanism off or to observe it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class InternalOptions:
    """Internal switches; the defaults are what users get.

    Attributes:
        defer_reads: ``GradientMonitor`` interprets a window with no non-finite step
            on the writer thread (False: every window at its read).
        lean_steps: ``GradientMonitor`` traces the lean step for long fits.
        lean_min_steps: a fit planned shorter than this traces no lean step.
        lean_break_even: the lean step is traced only once it pays for its trace
            (``fit_tap.LeanDecision``); False: from the fit's first steps on.
        extra_sinks: sinks that get every window result too (opened and closed with the files).
        on_step_kind: called before each ``fit`` step with True when it runs the lean step.
    """

    defer_reads: bool = True
    lean_steps: bool = True
    lean_min_steps: int = 1000
    lean_break_even: bool = True
    extra_sinks: Sequence[Any] = ()
    on_step_kind: Callable[[bool], None] | None = None


def as_internal(internal: Any) -> InternalOptions:
    """Returns the fronts' ``internal=`` argument, or the defaults for None.

    Raises:
        TypeError: anything but an ``InternalOptions`` or None.
    """
    if internal is None:
        return InternalOptions()
    if not isinstance(internal, InternalOptions):
        raise TypeError("internal must be a gradwatch._internal_options.InternalOptions or None (a seam for "
                        f"tests; leave it out); received {internal!r} ({type(internal).__name__}).")
    return internal
