"""In-graph window accumulators: the steps between two host reads fold into them
(``fold_values``, pure, over one step's values; ``update`` writes the result), and
the engine's host read fetches and resets them (``fetch``) every ``log_every`` steps,
in the same single call as the probes' state.  When and where a step is folded is
the engine's choice.

The accumulators are plain ``tf.Variable``s owned by the window object, never
by the model or its optimizer, so ``model.save`` and checkpoints are unaffected.
The fold is written as a few whole-matrix ops (not one op per statistic): deep
nets are bound by the number of ops per step, not by bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from gradwatch._keras_internals import replica_variable
from gradwatch.schema import GLOBAL_ACCUMULATORS, VAR_ACCUMULATORS

_V = {name: i for i, name in enumerate(VAR_ACCUMULATORS)}
_G = {name: i for i, name in enumerate(GLOBAL_ACCUMULATORS)}
assert VAR_ACCUMULATORS[:6] == (
    "l2_last", "l2_max", "l2_min", "l2_sum", "grad_steps", "nonfinite_sum"
), "fold_values() relies on this layout"

# How each global folds: old + x for these, max/min for those, x for the rest.
_G_SUM = (
    "steps", "global_l2_sum", "nonfinite_steps", "skipped_steps", "loss_sum", "loss_count",
    "clip_fired_steps",
)
_G_MAX = ("global_l2_max", "clip_l2_max")
_G_MIN = ("global_l2_min", "clip_scale_min")


def _mask(names: tuple[str, ...]) -> np.ndarray:
    return np.array([name in names for name in GLOBAL_ACCUMULATORS])


def _var_reset_values(num_columns: int) -> np.ndarray:
    values = np.zeros((len(VAR_ACCUMULATORS), num_columns), np.float64)
    values[_V["l2_max"]] = -np.inf
    values[_V["l2_min"]] = np.inf
    values[_V["clip_scale_min"]] = np.inf
    for name in ("l2_last", "max_abs", "mean_abs", "zero_frac"):
        values[_V[name]] = np.nan
    return values


def _global_reset_values() -> np.ndarray:
    values = np.zeros(len(GLOBAL_ACCUMULATORS), np.float64)
    values[_G["global_l2_max"]] = -np.inf
    values[_G["global_l2_min"]] = np.inf
    values[_G["clip_scale_min"]] = np.inf
    values[_G["clip_l2_max"]] = -np.inf
    values[_G["first_nonfinite_step"]] = -1.0
    values[_G["loss_nonfinite_at_first"]] = -1.0
    for name in (
        "global_l2_last", "learning_rate_last", "loss_scale_last", "clip_l2_last", "clip_threshold_last"
    ):
        values[_G[name]] = np.nan
    return values


class StepValues(NamedTuple):
    """One step's values, per column (variables then layers), float32 [C] each."""

    l2: tf.Tensor
    nonfinite: tf.Tensor
    max_abs: tf.Tensor  # meaningful on sampled steps only
    mean_abs: tf.Tensor
    zero_frac: tf.Tensor
    present: tf.Tensor  # bool [C]: had a gradient this step
    clip_scale: tf.Tensor  # post/pre-clip norm ratio (1 when no clip)
    clip_fired: tf.Tensor  # float 0/1: clipping changed the gradient


class StepGlobals(NamedTuple):
    """One step's scalars."""

    step: tf.Tensor
    global_l2: tf.Tensor
    nonfinite_step: tf.Tensor  # bool
    skipped: tf.Tensor  # bool
    loss: tf.Tensor  # NaN when unknown
    learning_rate: tf.Tensor
    loss_scale: tf.Tensor
    clip_l2: tf.Tensor  # post-clip global norm (NaN: no clip)
    clip_scale: tf.Tensor  # post/pre ratio (NaN: no clip)
    clip_fired: tf.Tensor  # bool
    clip_threshold: tf.Tensor
    loss_state: tf.Tensor  # 1.0 loss non-finite, 0.0 finite, -1.0 unknown


class Window:
    """Accumulators over the steps between two host reads.

    Args:
        num_columns: number of watched variables plus their layers.
        strategy: the ``tf.distribute`` strategy the step runs under, if any;
            the accumulators are then mirrored and written from the first
            replica only (every replica holds the same all-reduced values).
    """

    def __init__(self, num_columns: int, strategy: tf.distribute.Strategy | None = None):
        self.num_columns = num_columns
        self._var_reset = _var_reset_values(num_columns)
        self._global_reset = _global_reset_values()
        self.var_acc = replica_variable(self._var_reset, "gradwatch_var_window", strategy)
        self.global_acc = replica_variable(self._global_reset, "gradwatch_global_window", strategy)

    def update(self, fold) -> None:
        """Writes ``fold(var_acc, global_acc) -> (var_acc, global_acc)`` back (in-graph)."""
        new_var, new_global = fold(self.var_acc.read_value(), self.global_acc.read_value())
        self.var_acc.assign(new_var)
        self.global_acc.assign(new_global)

    def fold_values(self, acc: tf.Tensor, old: tf.Tensor, values: StepValues,
                    scalars: StepGlobals) -> tuple[tf.Tensor, tf.Tensor]:
        """The window accumulators ``(var_acc, global_acc)`` with one more step folded in
        (pure). The window's first step is its sampled step (max, mean, zero fraction)."""
        f64 = tf.float64
        sampled = tf.equal(old[_G["steps"]], 0.0)
        has = values.present
        present = tf.cast(has, f64)
        l2 = tf.cast(values.l2, f64)
        last, high, low = acc[0], acc[1], acc[2]
        new_tracked = tf.stack(
            [
                tf.where(has, l2, last),
                tf.where(has, tf.maximum(high, l2), high),
                tf.where(has, tf.minimum(low, l2), low),
            ]
        )
        new_sums = acc[3:6] + tf.stack([l2 * present, present, tf.cast(values.nonfinite, f64) * present])
        sample_now = has & sampled
        new_sampled = tf.where(
            sample_now[None, :],
            tf.cast(tf.stack([values.max_abs, values.mean_abs, values.zero_frac]), f64),
            acc[6:9],
        )
        clip_scale = tf.cast(values.clip_scale, f64)
        new_clip = tf.stack(
            [
                tf.where(has, tf.minimum(acc[9], clip_scale), acc[9]),
                acc[10] + tf.cast(values.clip_fired, f64) * present,
            ]
        )
        first_event = tf.cast(scalars.nonfinite_step, tf.bool) & (old[_G["first_nonfinite_step"]] < 0.0)
        new_first = tf.where(first_event, tf.cast(values.nonfinite, f64), acc[11])[None, :]
        new_var = tf.concat([new_tracked, new_sums, new_sampled, new_clip, new_first], axis=0)

        step = tf.cast(scalars.step, f64)
        gl2 = tf.cast(scalars.global_l2, f64)
        nonfinite = tf.cast(scalars.nonfinite_step, f64)
        loss = tf.cast(scalars.loss, f64)
        loss_known = tf.math.is_finite(loss)
        zero = tf.constant(0.0, f64)
        candidate = tf.stack(
            [
                tf.constant(1.0, f64),  # steps
                step,  # last_step
                gl2,  # global_l2_last
                gl2,  # global_l2_max
                gl2,  # global_l2_min
                gl2,  # global_l2_sum
                nonfinite,  # nonfinite_steps
                tf.where((old[_G["first_nonfinite_step"]] < 0.0) & (nonfinite > 0.0), step,
                         old[_G["first_nonfinite_step"]]),
                tf.cast(scalars.skipped, f64),
                tf.where(loss_known, loss, zero),
                tf.cast(loss_known, f64),
                tf.cast(scalars.learning_rate, f64),
                tf.cast(scalars.loss_scale, f64),
                tf.cast(scalars.clip_l2, f64),
                tf.cast(scalars.clip_l2, f64),
                tf.cast(scalars.clip_scale, f64),
                tf.cast(scalars.clip_fired, f64),
                tf.cast(scalars.clip_threshold, f64),
                tf.where(first_event, tf.cast(scalars.loss_state, f64),
                         old[_G["loss_nonfinite_at_first"]]),
            ]
        )
        new = tf.where(
            _mask(_G_SUM),
            old + candidate,
            tf.where(
                _mask(_G_MAX),
                tf.maximum(old, candidate),
                tf.where(_mask(_G_MIN), tf.minimum(old, candidate), candidate),
            ),
        )
        return new_var, new

    def fetch(self) -> tf.Tensor:
        """In-graph, for the engine's single read: the flat accumulators, then reset."""
        snapshot = tf.concat(
            [tf.reshape(self.var_acc.read_value(), [-1]), self.global_acc.read_value()], axis=0
        )
        with tf.control_dependencies([snapshot]):
            self.var_acc.assign(self._var_reset)
            self.global_acc.assign(self._global_reset)
        return snapshot

    def interpret(self, flat: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(per-column accumulators, global accumulators) from ``fetch``'s flat values."""
        split = len(VAR_ACCUMULATORS) * self.num_columns
        var_part = flat[:split].reshape(len(VAR_ACCUMULATORS), self.num_columns)
        per_column = {name: var_part[i] for i, name in enumerate(VAR_ACCUMULATORS)}
        glob = {name: float(flat[split + i]) for i, name in enumerate(GLOBAL_ACCUMULATORS)}
        return per_column, glob
