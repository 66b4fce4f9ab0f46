"""From window accumulators to rows of the one schema (host side, numpy only)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch._io.schema import STATS_COLUMNS, WINDOW_COLUMNS
from gradwatch._topology import Topology


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float("nan")


def _largest(value: float) -> float:
    """A window maximum: NaN when no step had a number (the -inf reset), Inf kept (an overflow)."""
    return float(value) if value > -math.inf else float("nan")


LAYER_VARIABLE = "*"


def _window_row(glob: dict[str, float], clipping: bool) -> dict[str, Any]:
    """Returns the ``windows.csv`` row of a window's global accumulators."""
    steps = int(glob["steps"])
    step = int(glob["last_step"])
    loss_count = glob["loss_count"]
    first_nonfinite = int(glob["first_nonfinite_step"])
    window_row = {
        "step": step,
        "steps": steps,
        "loss": glob["loss_sum"] / loss_count if loss_count > 0 else float("nan"),
        "learning_rate": glob["learning_rate_last"],
        "global_l2": glob["global_l2_last"],
        "global_l2_max": _largest(glob["global_l2_max"]),
        "nonfinite_steps": int(glob["nonfinite_steps"]),
        "first_nonfinite_step": first_nonfinite if first_nonfinite >= 0 else None,
        "skipped_steps": int(glob["skipped_steps"]),
        "clip_global_l2": glob["clip_l2_last"],
        "clip_global_l2_max": _largest(glob["clip_l2_max"]),
        "clip_scale_min": _finite(glob["clip_scale_min"]),
        "clip_fraction": glob["clip_fired_steps"] / steps if clipping else float("nan"),
        "clip_threshold": glob["clip_threshold_last"],
        "nonfinite_loss_at_first": (
            int(glob["loss_nonfinite_at_first"]) if glob["loss_nonfinite_at_first"] >= 0 else None
        ),
    }
    return window_row


def _norms(per_var: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """(last, max, min, mean) norm per column: max, min and mean over the steps with a norm;
    NaN where there was none (no gradient, or every entry NaN/Inf)."""
    nan = np.full_like(per_var["grad_steps"], np.nan)
    measured = per_var["l2_steps"]
    has_norm = measured > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        l2_mean = np.where(has_norm, per_var["l2_sum"] / np.where(has_norm, measured, 1), nan)
    last = np.where(per_var["grad_steps"] > 0, per_var["l2_last"], nan)
    l2_max, l2_min = (np.where(has_norm, per_var[name], nan) for name in ("l2_max", "l2_min"))
    return last, l2_max, l2_min, l2_mean


def build_rows(
    per_var: dict[str, np.ndarray], glob: dict[str, float], topology: Topology, clipping: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Returns (window row, variable rows, layer rows) of one window, keyed by schema column.

    The accumulator columns are the topology's variables followed by its layers;
    a layer row has ``variable == "*"`` (all of the layer's variables).
    """
    window_row = _window_row(glob, clipping)
    steps, step = window_row["steps"], window_row["step"]
    assert tuple(window_row) == WINDOW_COLUMNS
    grad_steps = per_var["grad_steps"]
    has = grad_steps > 0
    nan = np.full_like(grad_steps, np.nan)
    l2_last, l2_max, l2_min, l2_mean = _norms(per_var)
    max_abs, mean_abs, zero_frac = per_var["max_abs"], per_var["mean_abs"], per_var["zero_frac"]
    with np.errstate(invalid="ignore", divide="ignore"):
        clip_scale_min = np.where(has & clipping, per_var["clip_scale_min"], nan)
        fired_share = per_var["clip_fired_sum"] / np.where(has, grad_steps, 1)
        clip_fraction = np.where(has & clipping, fired_share, nan)
    update_ratio = per_var.get("update_ratio", nan)
    update_cos = per_var.get("update_cos", nan)
    dead_frac = per_var.get("dead_frac", nan)
    no_signal_frac = per_var.get("no_signal_frac", nan)
    stats_rows = []
    columns = [(info.layer, info.name) for info in topology.variables]
    columns += [(layer.name, LAYER_VARIABLE) for layer in topology.layers]
    for i, (layer_name, variable_name) in enumerate(columns):
        stats_rows.append(
            {
                "step": step,
                "steps": steps,
                "layer": layer_name,
                "variable": variable_name,
                "l2": float(l2_last[i]),
                "l2_max": float(l2_max[i]),
                "l2_min": float(l2_min[i]),
                "l2_mean": float(l2_mean[i]),
                "max_abs": float(max_abs[i]),
                "mean_abs": float(mean_abs[i]),
                "zero_frac": float(zero_frac[i]),
                "nonfinite": int(per_var["nonfinite_sum"][i]),
                "grad_steps": int(grad_steps[i]),
                "clip_scale_min": float(clip_scale_min[i]),
                "clip_fraction": float(clip_fraction[i]),
                "update_ratio": float(update_ratio[i]),
                "update_cos": float(update_cos[i]),
                "dead_frac": float(dead_frac[i]),
                "no_signal_frac": float(no_signal_frac[i]),
            }
        )
    if stats_rows:
        assert tuple(stats_rows[0]) == STATS_COLUMNS
    num_vars = len(topology.variables)
    return window_row, stats_rows[:num_vars], stats_rows[num_vars:]
