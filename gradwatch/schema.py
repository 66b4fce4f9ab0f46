"""The one row schema every sink and reader derives from.

Column order is part of the public contract (see DESIGN.md section 1): new
columns are only ever appended at the end.  This module imports nothing heavy
so that readers, the CLI and the TensorBoard plugin can use it without
TensorFlow.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

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
    "l2_sum",
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
    "loss_nonfinite_at_first",  # at the first non-finite step: 1 loss non-finite, 0 finite, -1 unknown
)
