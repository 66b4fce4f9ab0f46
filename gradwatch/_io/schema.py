"""The one row schema every sink and reader derives from, and the version of the files.

Column order is part of the public contract (see DESIGN.md section 1): new
columns are only ever appended at the end.  This module imports nothing heavy
so that readers, the CLI and the TensorBoard plugin can use it without
TensorFlow.

A run's ``run.json`` (and the run summary of its TensorBoard events) says which
version of the files wrote it, under :data:`SCHEMA_VERSION_KEY`:

* 1: ``run.json`` without the key (gradwatch 0.1.0; ``tests/data/run_v1`` is one).
* 2: the same files; ``run.json`` carries ``"schema_version": 2``.
* 3: a norm over no finite entry (every entry NaN/Inf) is NaN, where versions 1 and 2
  wrote 0.0 (``l2``, ``l2_max``, ``l2_min``, ``l2_mean``, ``max_abs``, ``mean_abs``,
  ``global_l2``, ``global_l2_max``); a global norm past float32 is Inf, not NaN. The
  readers give older runs the same meaning (:func:`nan_norms_of_old_rows`).
* 4: ``run.json`` lists the run's *segments* (:data:`SEGMENTS_KEY`): a fit whose optimizer
  restarts at iteration 0, or whose watched variables changed, opens a new segment
  numbered after the last step written, so no fit's rows are erased. The top-level
  ``layers``/``variables`` describe the last segment; each segment lists its own
  variables. An older run is one segment (:func:`segments_of_run`).

Every reader checks it with :func:`check_schema_version`: each version up to
:data:`SCHEMA_VERSION` is read, a newer one is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The version of the files this gradwatch writes (see the module docstring for the history).
SCHEMA_VERSION = 4
#: The first version whose norms over no finite entry are NaN (before: 0.0).
NAN_NORMS_VERSION = 3
#: The ``run.json`` key that holds it; a run.json without it is version 1.
SCHEMA_VERSION_KEY = "schema_version"
#: The ``run.json`` key that lists the run's segments (version 4 on).
SEGMENTS_KEY = "segments"


class GradwatchDataError(ValueError):
    """A log directory holds no gradwatch data, or data that cannot be read."""


class SchemaVersionError(GradwatchDataError):
    """A run was written by a newer gradwatch (or says it was, with a version that is not one)."""


def with_schema_version(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """``run_info`` stamped with this gradwatch's :data:`SCHEMA_VERSION` (first key), as sinks write it."""
    rest = {key: value for key, value in run_info.items() if key != SCHEMA_VERSION_KEY}
    return {SCHEMA_VERSION_KEY: SCHEMA_VERSION, **rest}


def check_schema_version(run_info: Mapping[str, Any] | None, where: str) -> int:
    """The schema version of a run's metadata (``run.json`` content), checked.

    Args:
        run_info: the run's metadata; None (no ``run.json``) or a mapping without
            :data:`SCHEMA_VERSION_KEY` is version 1.
        where: what the metadata was read from, for the error message.

    Returns:
        The version, from 1 to :data:`SCHEMA_VERSION`.

    Raises:
        SchemaVersionError: the version is newer than :data:`SCHEMA_VERSION`, or not
            an integer >= 1.
    """
    if not isinstance(run_info, Mapping) or SCHEMA_VERSION_KEY not in run_info:
        return 1
    version = run_info[SCHEMA_VERSION_KEY]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SchemaVersionError(
            f"{where}: {SCHEMA_VERSION_KEY} must be an integer >= 1; received {version!r}. "
            "The file was edited or written by another program: restore it."
        )
    if version > SCHEMA_VERSION:
        from gradwatch import __version__

        raise SchemaVersionError(
            f"{where} was written by a newer gradwatch ({SCHEMA_VERSION_KEY} {version}; gradwatch "
            f"{__version__} reads versions 1 to {SCHEMA_VERSION}); upgrade gradwatch to read it."
        )
    return version


def segments_of_run(run_info: Mapping[str, Any] | None, last_step: int | None = None) -> list[dict[str, Any]]:
    """The segments of a run's metadata: those ``run.json`` lists, or one segment for a run
    written before version 4 (its ``last_step`` is ``last_step``: the last row's).

    Each segment: ``segment`` (1, 2, ...), ``first_step``, ``last_step`` (None while the
    fit runs, or after a crash), ``reason`` ("start", "optimizer_restart",
    "variables_changed", "append"), ``iterations_at_start`` (the optimizer's, None for a
    ``Watch``), ``step_offset`` (step minus iterations), ``front``, ``optimizer``,
    ``model_name`` and ``variables`` (name, layer, shape, dtype).
    """
    if not isinstance(run_info, Mapping):
        return []
    listed = run_info.get(SEGMENTS_KEY)
    if isinstance(listed, list) and listed:
        return [dict(segment) for segment in listed if isinstance(segment, Mapping)]
    variables = [{k: v[k] for k in ("name", "layer", "shape", "dtype") if k in v}
                 for v in run_info.get("variables", []) if isinstance(v, Mapping)]
    return [{"segment": 1, "first_step": 1, "last_step": last_step, "reason": "start",
             "iterations_at_start": None, "step_offset": 0, "front": run_info.get("front"),
             "optimizer": run_info.get("optimizer"), "model_name": run_info.get("model_name", ""),
             "variables": variables}]


def segment_ranges(run_info: Mapping[str, Any] | None, steps: Any = ()) -> list[dict[str, Any]]:
    """The run's segments (:func:`segments_of_run`) with every ``last_step`` known: a segment
    whose fit did not say (it runs, or crashed) ends before the next one, or at the last of
    ``steps`` (the windows' steps) in its range."""
    known = sorted(int(step) for step in steps)
    segments = segments_of_run(run_info, known[-1] if known else None)
    for i, segment in enumerate(segments):
        if segment.get("last_step") is not None:
            continue
        end = segments[i + 1]["first_step"] - 1 if i + 1 < len(segments) else None
        inside = [step for step in known if step >= segment["first_step"] and (end is None or step <= end)]
        segment["last_step"] = inside[-1] if inside else end
    return segments


def nan_norms_of_old_rows(frame: Any, version: int) -> Any:
    """A pandas frame of stats/layers or windows rows read from a run of ``version``, with the
    0.0 norms that versions before :data:`NAN_NORMS_VERSION` wrote for gradients without a finite
    entry turned into NaN (a zero norm in a window with non-finite entries is read as one)."""
    if version >= NAN_NORMS_VERSION or not len(frame):
        return frame
    frame = frame.copy()
    if "nonfinite_steps" in frame.columns:  # windows
        bad = frame["nonfinite_steps"] > 0
        for column in ("global_l2", "global_l2_max"):
            frame.loc[bad & (frame[column] == 0.0), column] = float("nan")
        return frame
    bad = frame["nonfinite"] > 0
    frame.loc[bad & (frame["l2"] == 0.0), "l2"] = float("nan")
    never = bad & (frame["l2_max"] == 0.0)
    frame.loc[never, ["l2_max", "l2_min", "l2_mean", "max_abs", "mean_abs"]] = float("nan")
    return frame


def groups_of(run_info: Mapping[str, Any] | None, level: str = "variable") -> dict[str, str]:
    """Each variable's (``level="variable"``) or layer's group from ``run.json``: the
    optimizer that updates it (its attribute on the model, e.g. ``"d_optimizer"``); a
    layer's is its variables', joined by ``+`` if several; ``""`` where unknown (runs
    before groups, or a variable no optimizer applied)."""
    variables = [v for v in (run_info or {}).get("variables", []) or [] if isinstance(v, Mapping)]
    if level == "variable":
        return {v.get("name", ""): v.get("group", "") or "" for v in variables}
    layers: dict[str, list[str]] = {}
    for v in variables:
        groups = layers.setdefault(v.get("layer", ""), [])
        if v.get("group") and v["group"] not in groups:
            groups.append(v["group"])
    return {layer: "+".join(groups) for layer, groups in layers.items()}


def group_labels(names: list[str], run_info: Mapping[str, Any] | None) -> list[str]:
    """Layer names as a report or the tab shows them: ``"d_hidden [d_optimizer]"`` when
    the run's layers belong to more than one group (several optimizers), else as they are."""
    groups = groups_of(run_info, "layer")
    if len({g for g in groups.values() if g}) <= 1:
        return list(names)
    return [f"{name} [{groups[name]}]" if groups.get(name) else name for name in names]


RUN_FILE = "run.json"
WINDOWS_FILE = "windows.csv"
STATS_FILE = "stats.csv"
LAYERS_FILE = "layers.csv"  # same columns as stats.csv, variable == "*"
ALERTS_FILE = "alerts.csv"

#: One row per window (the steps between two host reads).
WINDOW_COLUMNS: tuple[str, ...] = (
    "step",  # last step of the window (1-based count of training steps)
    "steps",  # number of steps folded into the window
    "loss",  # mean training loss over the window's steps (NaN when unknown)
    "learning_rate",  # learning rate at the window's last step
    "global_l2",  # global gradient norm at the last step
    "global_l2_max",  # largest global gradient norm in the window
    "nonfinite_steps",  # steps whose gradient had a NaN/Inf entry
    "first_nonfinite_step",  # first such step in the window (empty if none)
    "skipped_steps",  # steps whose update was not applied
    "clip_global_l2",  # global norm after gradwatch's clipping, at the last step
    "clip_global_l2_max",  # largest post-clip global norm in the window
    "clip_scale_min",  # smallest post/pre-clip global norm ratio in the window
    "clip_fraction",  # fraction of the window's steps on which clipping changed a gradient
    "clip_threshold",  # the clip bound at the last step (Percentile's moves; NaN if per unit)
    "nonfinite_loss_at_first",  # at first_nonfinite_step: 1 loss was non-finite, 0 finite, empty unknown
)

#: One row per (window, variable), tidy long form.
STATS_COLUMNS: tuple[str, ...] = (
    "step",
    "steps",
    "layer",
    "variable",
    "l2",  # gradient L2 norm at the window's last step (finite entries)
    "l2_max",
    "l2_min",
    "l2_mean",
    "max_abs",  # largest |g| (finite entries), on the window's first step
    "mean_abs",  # mean |g| (finite entries / all entries), on the window's first step
    "zero_frac",  # fraction of exact zeros, on the window's first step
    "nonfinite",  # NaN/Inf entries summed over the window
    "grad_steps",  # steps of the window in which the variable had a gradient
    "clip_scale_min",  # smallest post/pre-clip norm ratio over the window (NaN: no clip)
    "clip_fraction",  # fraction of the window's steps on which clipping changed it
    "update_ratio",  # ||w_after - w_before|| / ||w_before|| of one step, on the window's first
    #                  step that moved the weights (NaN: not measured this window)
    "update_cos",  # cosine of that same weight change with minus the gradient that made it
    #                (NaN: not measured)
    "dead_frac",  # layer rows of ReLU-family layers: fraction of units dead (gradient exactly zero
    #               and activation zero on the whole batch for dead_steps consecutive steps); else NaN
    "no_signal_frac",  # layer rows: fraction of units with an all-zero gradient for dead_steps
    #                    consecutive steps that are not dead ReLUs; NaN where units are not defined
)

#: The columns of the row tables that hold text (names, kinds, messages); every other column is a number.
TEXT_COLUMNS: frozenset[str] = frozenset({"layer", "variable", "kind", "severity", "message", "hint"})

#: One row per alert.
ALERT_COLUMNS: tuple[str, ...] = (
    "step",
    "layer",
    "variable",
    "kind",
    "severity",
    "value",
    "threshold",
    "message",
    "hint",
)

ALERT_KINDS: tuple[str, ...] = (
    "vanishing_gradient",
    "exploding_gradient",
    "dead_relu",
    "nonfinite_gradient",
    "no_gradient",
    "update_ratio",
    "update_mismatch",
    "no_learning_signal",
)

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")

#: The window statistics kept per variable (and per layer) in-graph, in this
#: order.  The L2 norm and the non-finite count are folded in on every step;
#: max |g|, mean |g| and the zero fraction cost a full extra pass each, so they
#: are measured on one sampled step per window (its first).
VAR_ACCUMULATORS: tuple[str, ...] = (
    "l2_last",
    "l2_max",
    "l2_min",
    "l2_sum",  # over the steps with a norm (not NaN)
    "l2_steps",  # steps with a norm: present, and some entry finite
    "grad_steps",
    "nonfinite_sum",
    "max_abs",
    "mean_abs",
    "zero_frac",
    "clip_scale_min",
    "clip_fired_sum",
    "nonfinite_at_first",  # non-finite entries at the window's first non-finite step
)

#: The window globals kept in-graph, in this order.
GLOBAL_ACCUMULATORS: tuple[str, ...] = (
    "steps",
    "last_step",
    "global_l2_last",
    "global_l2_max",
    "global_l2_min",
    "global_l2_sum",
    "nonfinite_steps",
    "first_nonfinite_step",
    "skipped_steps",
    "loss_sum",
    "loss_count",
    "learning_rate_last",
    "loss_scale_last",
    "clip_l2_last",
    "clip_l2_max",
    "clip_scale_min",
    "clip_fired_steps",
    "clip_threshold_last",
    "loss_nonfinite_steps",  # steps whose loss was known and non-finite
    "loss_nonfinite_at_first",  # at the first non-finite step: 1 loss non-finite, 0 finite, -1 unknown
    # the last step counted in nonfinite_steps, skipped_steps and clip_fired_steps: a step
    # observed several times (several optimizers) counts once (-1: none yet)
    "nonfinite_counted_step",
    "skipped_counted_step",
    "clip_counted_step",
)
