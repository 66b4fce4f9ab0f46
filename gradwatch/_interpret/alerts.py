"""Alerts: one row schema (``alerts.csv``), the remedies to try, and the
non-finite gradient alert (numpy only, no TensorFlow)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from gradwatch._io.schema import ALERT_COLUMNS
from gradwatch._topology import Topology

HINTS: dict[str, str] = {
    "vanishing_gradient": (
        "Use ReLU-family activations instead of sigmoid/tanh in deep stacks, He (ReLU) or "
        "Glorot/Xavier initialisation, batch normalisation, or skip connections."
    ),
    "exploding_gradient": (
        "Lower the learning rate, clip gradients (GradientMonitor(clip=gw.clip.GlobalNorm(1.0))), "
        "add normalisation layers, or use a smaller-variance initialisation."
    ),
    "dead_relu": (
        "Use Leaky ReLU/ELU, lower the learning rate, or initialise biases slightly positive "
        "and weights with He initialisation."
    ),
    "nonfinite_gradient": (
        "Lower the learning rate or clip gradients; check for log/sqrt/division of values that "
        "can reach 0 or below in the layer named, and for NaN/Inf in the input data."
    ),
    "nonfinite_loss": (
        "The loss itself is NaN/Inf, so every gradient is: check the input data and labels for "
        "NaN/Inf, log of non-positive values in the loss, and the learning rate."
    ),
    "loss_scale_overflow": (
        "Expected now and then under mixed precision: the LossScaleOptimizer skipped the step "
        "and lowered its loss scale. Only frequent overflows need attention."
    ),
    "no_learning_signal": (
        "These units get an all-zero gradient although they are not dead ReLUs: check for "
        "outgoing weights that are all zero (a zero-initialised or masked next layer), a "
        "tf.stop_gradient, or a saturated activation after them."
    ),
    "update_ratio_high": (
        "Updates are large relative to the weights (healthy is ~1e-3 per step): lower the "
        "learning rate, add warm-up, or clip gradients (gw.clip.GlobalNorm)."
    ),
    "update_ratio_low": (
        "Updates are tiny relative to the weights (healthy is ~1e-3 per step): raise the "
        "learning rate, check the optimizer is applied to these variables, and check for "
        "vanishing gradients."
    ),
    "update_mismatch": (
        "The variable moved in a direction unrelated to its gradient: check that each gradient is "
        "applied to its own variable (zip(grads, variables) in the same order as "
        "tape.gradient(loss, variables)), and any manual assign_sub updates."
    ),
    "no_gradient": (
        "The variable is disconnected from the loss: check that its layer is used in the forward "
        "pass, that no tf.stop_gradient/argmax/cast blocks the path, or freeze it."
    ),
}


@dataclasses.dataclass
class Alert:
    """One alert row (see ``ALERT_COLUMNS``)."""

    step: int
    layer: str
    variable: str
    kind: str
    severity: str  # info | warning | error
    value: float
    threshold: float
    message: str
    hint: str

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        assert tuple(row) == ALERT_COLUMNS
        return row


def nonfinite_alert(
    window_row: dict[str, Any],
    nonfinite_at_first: np.ndarray,
    topology: Topology,
    loss_scale_optimizer: bool,
) -> Alert | None:
    """The alert for a window with a non-finite gradient, or None.

    ``nonfinite_at_first`` holds, per column (variables then layers), the
    non-finite entries at the window's first non-finite step. When the loss was
    finite there, the layer named is the first one in backprop order (from the
    output back) whose gradient went non-finite; when the loss was non-finite,
    every gradient is, and the cause is the forward pass or the input.
    """
    if not window_row["nonfinite_steps"]:
        return None
    step = int(window_row["first_nonfinite_step"] or window_row["step"])
    num_vars = len(topology.variables)
    layer_counts = nonfinite_at_first[num_vars : num_vars + len(topology.layers)]
    bad_layers = [layer.name for layer, n in zip(topology.layers, layer_counts) if n > 0]
    first_backprop = bad_layers[-1] if bad_layers else ""
    # a variable of that layer (by its layer, not its name: "dense_1/kernel" starts with "dense")
    bad_variables = [
        v.name for v, n in zip(topology.variables, nonfinite_at_first[:num_vars])
        if n > 0 and v.layer == first_backprop
    ]
    variable = bad_variables[-1] if bad_variables else ""
    count = float(sum(n for n in nonfinite_at_first[:num_vars] if math.isfinite(n)))
    steps = int(window_row["nonfinite_steps"])
    loss_state = window_row.get("nonfinite_loss_at_first")
    if loss_state == 1:
        return Alert(
            step, "", "", "nonfinite_gradient", "error", count, 0.0,
            f"Non-finite loss at step {step}: the forward pass produced NaN/Inf (from the input "
            "data, or from weights or activations that already overflowed: look for earlier "
            f"exploding_gradient alerts), so every gradient is non-finite ({int(count)} NaN/Inf entries at "
            f"step {step}; {steps} such step(s) in this window). This is not a gradient problem of one "
            "layer.",
            HINTS["nonfinite_loss"],
        )
    if loss_scale_optimizer and window_row["skipped_steps"] >= steps:
        return Alert(
            step, first_backprop, variable, "nonfinite_gradient", "info", count, 0.0,
            f"Loss-scale overflow at step {step}: the scaled gradient of layer {first_backprop!r} "
            f"overflowed float16 ({int(count)} NaN/Inf entries) and the update was skipped ({steps} step(s) "
            "in this window).",
            HINTS["loss_scale_overflow"],
        )
    where = (
        f"first in layer {first_backprop!r} (variable {variable!r}), counting back from the output"
        if first_backprop
        else "in no watched layer"
    )
    loss_note = " while the loss was finite" if loss_state == 0 else ""
    return Alert(
        step, first_backprop, variable, "nonfinite_gradient", "error", count, 0.0,
        f"Non-finite gradient at step {step}{loss_note}: {int(count)} NaN/Inf entries, {where}; "
        f"layers affected: {', '.join(bad_layers) or 'none'} ({steps} such step(s) in this window).",
        HINTS["nonfinite_gradient"],
    )


def divergence_since(since: int | None, window_row: dict[str, Any]) -> int | None:
    """The first step of the non-finite stretch that runs to the end of this window, or None.

    ``since``: the same for the window before. A window whose non-finite steps are not its
    tail (``nonfinite_steps`` short of the steps from its first non-finite one) ends the stretch.
    """
    bad = int(window_row.get("nonfinite_steps") or 0)
    first = window_row.get("first_nonfinite_step")
    if not bad or first is None or first != first:  # first != first: NaN read from a file
        return None
    first, step = int(first), int(window_row["step"])
    if bad < step - first + 1:
        return None  # recovered inside the window
    steps = int(window_row.get("steps") or 0)
    whole = since is not None and bad >= steps
    return since if whole else first


def diverged_alert(since: int, last_step: int) -> Alert:
    """The row that ends a run whose gradients (or loss) stayed NaN/Inf from ``since`` to its end."""
    return Alert(
        last_step, "", "", "nonfinite_gradient", "error", float(last_step - since + 1), 0.0,
        f"Diverged at step {since}, never recovered: every step from {since} to the end of training "
        f"(step {last_step}), {last_step - since + 1} steps, had a non-finite gradient or loss.",
        "Restart from a checkpoint before the divergence with a lower learning rate or gradient clipping "
        "(gw.clip.GlobalNorm(1.0)), and look at the first alert before it for the cause.",
    )


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"``; the message names the layer and step."""


def nonfinite_action(alerts: list[Alert], mode: str, stop_note: str) -> tuple[str, str] | None:
    """What a front does about a window's non-finite gradient error, if any.

    Returns ``(action, message)`` with action "raise", "stop" or "warn", or None.
    """
    for alert in alerts:
        if alert.kind != "nonfinite_gradient" or alert.severity != "error":
            continue
        if mode == "raise":
            return "raise", f"{alert.message} {alert.hint}"
        if mode == "stop":
            return "stop", f"{alert.message} {stop_note} {alert.hint}"
        suffix = " The update was skipped." if mode == "skip_step" else ""
        return "warn", f"{alert.message}{suffix} {alert.hint}"
    return None
