"""In-graph window accumulators: every step folds into them, the host reads and
resets them every ``log_every`` steps in one device-to-host transfer.

The accumulators are plain ``tf.Variable``s owned by the window object, never
by the model or its optimizer, so ``model.save`` and checkpoints are unaffected.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tensorflow as tf

from gradwatch.schema import GLOBAL_ACCUMULATORS, VAR_ACCUMULATORS
from gradwatch.stats import GradStats

_V = {name: i for i, name in enumerate(VAR_ACCUMULATORS)}
_G = {name: i for i, name in enumerate(GLOBAL_ACCUMULATORS)}


def _var_reset_values(num_vars: int) -> np.ndarray:
    values = np.zeros((len(VAR_ACCUMULATORS), num_vars), np.float64)
    values[_V["l2_max"]] = -np.inf
    values[_V["l2_min"]] = np.inf
    values[_V["max_abs_max"]] = -np.inf
    values[_V["l2_last"]] = np.nan
    return values


def _global_reset_values() -> np.ndarray:
    values = np.zeros(len(GLOBAL_ACCUMULATORS), np.float64)
    values[_G["global_l2_max"]] = -np.inf
    values[_G["global_l2_min"]] = np.inf
    values[_G["first_nonfinite_step"]] = -1.0
    values[_G["global_l2_last"]] = np.nan
    values[_G["learning_rate_last"]] = np.nan
    values[_G["loss_scale_last"]] = np.nan
    return values


class StepInputs:
    """What one step hands to the window besides the gradient statistics."""

    def __init__(
        self,
        step: tf.Tensor,
        present: tf.Tensor,
        global_l2: tf.Tensor,
        nonfinite_step: tf.Tensor,
        skipped: tf.Tensor,
        loss: tf.Tensor,
        learning_rate: tf.Tensor,
        loss_scale: tf.Tensor,
    ):
        self.step = step
        self.present = present
        self.global_l2 = global_l2
        self.nonfinite_step = nonfinite_step
        self.skipped = skipped
        self.loss = loss
        self.learning_rate = learning_rate
        self.loss_scale = loss_scale


class Window:
    """Accumulators over the steps between two host reads.

    Args:
        num_vars: number of watched variables.
        strategy: the ``tf.distribute`` strategy the step runs under, if any;
            the accumulators are then mirrored and written from the first
            replica only (every replica holds the same all-reduced values).
    """

    def __init__(self, num_vars: int, strategy: tf.distribute.Strategy | None = None):
        self.num_vars = num_vars
        self._var_reset = _var_reset_values(num_vars)
        self._global_reset = _global_reset_values()
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with tf.init_scope(), scope:
            kwargs = dict(
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_WRITE,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.var_acc = tf.Variable(self._var_reset, name="gradwatch_var_window", **kwargs)
            self.global_acc = tf.Variable(
                self._global_reset, name="gradwatch_global_window", **kwargs
            )
        self._read_fn = tf.function(self._read_and_reset)

    def fold(self, stats: GradStats, inputs: StepInputs) -> list[tf.Operation]:
        """Folds one step into the window (in-graph). Returns the assign ops."""
        f64 = tf.float64
        present = tf.cast(inputs.present, f64)
        has = inputs.present
        l2 = tf.cast(stats.l2, f64)
        acc = self.var_acc
        rows = tf.unstack(acc.read_value(), num=len(VAR_ACCUMULATORS))
        new_rows = list(rows)
        new_rows[_V["l2_last"]] = tf.where(has, l2, rows[_V["l2_last"]])
        new_rows[_V["l2_max"]] = tf.where(has, tf.maximum(rows[_V["l2_max"]], l2), rows[_V["l2_max"]])
        new_rows[_V["l2_min"]] = tf.where(has, tf.minimum(rows[_V["l2_min"]], l2), rows[_V["l2_min"]])
        new_rows[_V["l2_sum"]] = rows[_V["l2_sum"]] + l2 * present
        new_rows[_V["max_abs_max"]] = tf.where(
            has,
            tf.maximum(rows[_V["max_abs_max"]], tf.cast(stats.max_abs, f64)),
            rows[_V["max_abs_max"]],
        )
        new_rows[_V["mean_abs_sum"]] = rows[_V["mean_abs_sum"]] + tf.cast(stats.mean_abs, f64) * present
        new_rows[_V["zero_frac_sum"]] = rows[_V["zero_frac_sum"]] + tf.cast(stats.zero_frac, f64) * present
        new_rows[_V["nonfinite_sum"]] = rows[_V["nonfinite_sum"]] + tf.cast(stats.nonfinite, f64) * present
        new_rows[_V["grad_steps"]] = rows[_V["grad_steps"]] + present
        var_update = acc.assign(tf.stack(new_rows))

        g = self.global_acc
        old = tf.unstack(g.read_value(), num=len(GLOBAL_ACCUMULATORS))
        new = list(old)
        step = tf.cast(inputs.step, f64)
        gl2 = tf.cast(inputs.global_l2, f64)
        nonfinite = tf.cast(inputs.nonfinite_step, f64)
        loss = tf.cast(inputs.loss, f64)
        loss_known = tf.math.is_finite(loss)
        new[_G["steps"]] = old[_G["steps"]] + 1.0
        new[_G["last_step"]] = step
        new[_G["global_l2_last"]] = gl2
        new[_G["global_l2_max"]] = tf.maximum(old[_G["global_l2_max"]], gl2)
        new[_G["global_l2_min"]] = tf.minimum(old[_G["global_l2_min"]], gl2)
        new[_G["global_l2_sum"]] = old[_G["global_l2_sum"]] + gl2
        new[_G["nonfinite_steps"]] = old[_G["nonfinite_steps"]] + nonfinite
        new[_G["first_nonfinite_step"]] = tf.where(
            (old[_G["first_nonfinite_step"]] < 0.0) & (nonfinite > 0.0),
            step,
            old[_G["first_nonfinite_step"]],
        )
        new[_G["skipped_steps"]] = old[_G["skipped_steps"]] + tf.cast(inputs.skipped, f64)
        new[_G["loss_sum"]] = old[_G["loss_sum"]] + tf.where(loss_known, loss, 0.0)
        new[_G["loss_count"]] = old[_G["loss_count"]] + tf.cast(loss_known, f64)
        new[_G["learning_rate_last"]] = tf.cast(inputs.learning_rate, f64)
        new[_G["loss_scale_last"]] = tf.cast(inputs.loss_scale, f64)
        global_update = g.assign(tf.stack(new))
        return [var_update, global_update]

    def _read_and_reset(self):
        snapshot = tf.concat(
            [tf.reshape(self.var_acc.read_value(), [-1]), self.global_acc.read_value()], axis=0
        )
        with tf.control_dependencies([snapshot]):
            self.var_acc.assign(self._var_reset)
            self.global_acc.assign(self._global_reset)
        return snapshot

    def read_and_reset(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Reads the window in one device-to-host transfer and resets it (host side)."""
        flat = self._read_fn().numpy()
        split = len(VAR_ACCUMULATORS) * self.num_vars
        var_part = flat[:split].reshape(len(VAR_ACCUMULATORS), self.num_vars)
        per_var = {name: var_part[i] for i, name in enumerate(VAR_ACCUMULATORS)}
        glob = {name: float(flat[split + i]) for i, name in enumerate(GLOBAL_ACCUMULATORS)}
        return per_var, glob


def finite_or_nan(value: float) -> float:
    """Maps the accumulators' +/-inf sentinels of an empty window to NaN."""
    return value if math.isfinite(value) else float("nan")
