"""In-graph window accumulators: the steps between two host reads fold into them
(``fold_values``, pure, over one step's values; ``update`` writes the result), and
the recorder's host read fetches and resets them (``fetch``) every ``log_every`` steps,
in the same single call as the probes' state.  When and where a step is folded is
the recorder's choice.

The accumulators are plain ``tf.Variable``s owned by the window object, never
by the model or its optimizer, so ``model.save`` and checkpoints are unaffected.
The fold is written as a few whole-matrix ops (not one op per statistic): deep
nets are bound by the number of ops per step, not by bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from gradwatch._capture.keras_internals import replica_variable
from gradwatch._capture.layouts import WINDOW_COLUMNS, WINDOW_GLOBALS

# How each global folds: old + x for these, max/min for those, x for the rest.
_G_SUM = (
    "steps", "global_l2_sum", "nonfinite_steps", "skipped_steps", "loss_sum", "loss_count",
    "clip_fired_steps", "loss_nonfinite_steps",
)
_G_MAX = ("global_l2_max", "clip_l2_max")
_G_MIN = ("global_l2_min", "clip_scale_min")


def _mask(names: tuple[str, ...]) -> np.ndarray:
    return np.array([name in names for name in WINDOW_GLOBALS.names])


def _var_reset_values(num_columns: int) -> np.ndarray:
    values = np.zeros((len(WINDOW_COLUMNS), num_columns), np.float64)
    values[WINDOW_COLUMNS.index("l2_max")] = -np.inf
    values[WINDOW_COLUMNS.index("l2_min")] = np.inf
    values[WINDOW_COLUMNS.index("clip_scale_min")] = np.inf
    for name in ("l2_last", "max_abs", "mean_abs", "zero_frac"):
        values[WINDOW_COLUMNS.index(name)] = np.nan
    return values


def _global_reset_values() -> np.ndarray:
    values = np.zeros(len(WINDOW_GLOBALS), np.float64)
    for name in ("global_l2_max", "clip_l2_max"):
        values[WINDOW_GLOBALS.index(name)] = -np.inf
    for name in ("global_l2_min", "clip_scale_min"):
        values[WINDOW_GLOBALS.index(name)] = np.inf
    for name in ("first_nonfinite_step", "loss_nonfinite_at_first", "nonfinite_counted_step",
                 "skipped_counted_step", "clip_counted_step"):
        values[WINDOW_GLOBALS.index(name)] = -1.0
    for name in (
        "global_l2_last", "learning_rate_last", "loss_scale_last", "clip_l2_last", "clip_threshold_last"
    ):
        values[WINDOW_GLOBALS.index(name)] = np.nan
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
    new_step: tf.Tensor  # bool: the row starts a step (False: a further observation in it)


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
        (pure). The window's first step is its sampled step (max, mean, zero fraction);
        every observation in it (several optimizers, or one applied several times) is."""
        old_globals = WINDOW_GLOBALS.unpack(old)
        first_event = tf.cast(scalars.nonfinite_step, tf.bool) & (old_globals["first_nonfinite_step"] < 0.0)
        steps_now = old_globals["steps"] + tf.cast(scalars.new_step, tf.float64)
        new_var = self._fold_columns(WINDOW_COLUMNS.unpack(acc), values,
                                     tf.equal(steps_now, 1.0), first_event)
        return new_var, self._fold_globals(old, old_globals, scalars, first_event)

    @staticmethod
    def _fold_columns(acc: dict[str, tf.Tensor], values: StepValues, sampled: tf.Tensor,
                      first_event: tf.Tensor) -> tf.Tensor:
        """Returns the per-column accumulators with one step folded in."""
        f64 = tf.float64
        has = values.present
        present = tf.cast(has, f64)
        l2 = tf.cast(values.l2, f64)
        # a NaN norm (no finite entry) is the last value if last, but no max, min or mean
        measured = has & tf.logical_not(tf.math.is_nan(l2))
        sample_now = has & sampled
        clip_scale = tf.cast(values.clip_scale, f64)
        return WINDOW_COLUMNS.pack({
            "l2_last": tf.where(has, l2, acc["l2_last"]),
            "l2_max": tf.where(measured, tf.maximum(acc["l2_max"], l2), acc["l2_max"]),
            "l2_min": tf.where(measured, tf.minimum(acc["l2_min"], l2), acc["l2_min"]),
            "l2_sum": acc["l2_sum"] + tf.where(measured, l2, tf.zeros_like(l2)),
            "l2_steps": acc["l2_steps"] + tf.cast(measured, f64),
            "grad_steps": acc["grad_steps"] + present,
            "nonfinite_sum": acc["nonfinite_sum"] + tf.cast(values.nonfinite, f64) * present,
            # the window's first step is its sampled step
            "max_abs": tf.where(sample_now, tf.cast(values.max_abs, f64), acc["max_abs"]),
            "mean_abs": tf.where(sample_now, tf.cast(values.mean_abs, f64), acc["mean_abs"]),
            "zero_frac": tf.where(sample_now, tf.cast(values.zero_frac, f64), acc["zero_frac"]),
            "clip_scale_min": tf.where(has, tf.minimum(acc["clip_scale_min"], clip_scale),
                                       acc["clip_scale_min"]),
            "clip_fired_sum": acc["clip_fired_sum"] + tf.cast(values.clip_fired, f64) * present,
            "nonfinite_at_first": tf.where(first_event, tf.cast(values.nonfinite, f64),
                                           acc["nonfinite_at_first"]),
        })

    @staticmethod
    def _fold_globals(old: tf.Tensor, old_globals: dict[str, tf.Tensor], scalars: StepGlobals,
                      first_event: tf.Tensor) -> tf.Tensor:
        """Returns the global accumulators with one step folded in."""
        f64 = tf.float64
        no_event_yet = old_globals["first_nonfinite_step"] < 0.0
        step = tf.cast(scalars.step, f64)
        gl2 = tf.cast(scalars.global_l2, f64)
        gl2_nan = tf.math.is_nan(gl2)
        loss = tf.cast(scalars.loss, f64)
        loss_known = tf.math.is_finite(loss)
        clip_l2 = tf.cast(scalars.clip_l2, f64)

        def once_per_step(flag, counted: str) -> tuple[tf.Tensor, tf.Tensor]:
            """(1.0 if ``flag`` and the step is not counted yet, the step last counted)."""
            fresh = tf.cast(flag, tf.bool) & tf.not_equal(old_globals[counted], step)
            return tf.cast(fresh, f64), tf.where(fresh, step, old_globals[counted])

        nonfinite, nonfinite_counted = once_per_step(scalars.nonfinite_step, "nonfinite_counted_step")
        skipped, skipped_counted = once_per_step(scalars.skipped, "skipped_counted_step")
        clip_fired, clip_counted = once_per_step(scalars.clip_fired, "clip_counted_step")
        candidate = WINDOW_GLOBALS.pack({
            "steps": tf.cast(scalars.new_step, f64),
            "last_step": step,
            "global_l2_last": gl2,
            "global_l2_max": tf.where(gl2_nan, tf.constant(-np.inf, f64), gl2),
            "global_l2_min": tf.where(gl2_nan, tf.constant(np.inf, f64), gl2),
            "global_l2_sum": tf.where(gl2_nan, tf.constant(0.0, f64), gl2),
            "nonfinite_steps": nonfinite,
            "first_nonfinite_step": tf.where(no_event_yet & (nonfinite > 0.0), step,
                                             old_globals["first_nonfinite_step"]),
            "skipped_steps": skipped,
            "loss_sum": tf.where(loss_known, loss, tf.constant(0.0, f64)),
            "loss_count": tf.cast(loss_known, f64),
            "learning_rate_last": tf.cast(scalars.learning_rate, f64),
            "loss_scale_last": tf.cast(scalars.loss_scale, f64),
            "clip_l2_last": clip_l2,
            "clip_l2_max": clip_l2,
            "clip_scale_min": tf.cast(scalars.clip_scale, f64),
            "clip_fired_steps": clip_fired,
            "clip_threshold_last": tf.cast(scalars.clip_threshold, f64),
            "loss_nonfinite_steps": tf.cast(tf.equal(tf.cast(scalars.loss_state, f64), 1.0), f64),
            "loss_nonfinite_at_first": tf.where(first_event, tf.cast(scalars.loss_state, f64),
                                                old_globals["loss_nonfinite_at_first"]),
            "nonfinite_counted_step": nonfinite_counted,
            "skipped_counted_step": skipped_counted,
            "clip_counted_step": clip_counted,
        })
        return tf.where(
            _mask(_G_SUM),
            old + candidate,
            tf.where(
                _mask(_G_MAX),
                tf.maximum(old, candidate),
                tf.where(_mask(_G_MIN), tf.minimum(old, candidate), candidate),
            ),
        )

    def fetch(self) -> tuple[tf.Tensor, tf.Tensor]:
        """In-graph, for the recorder's single read: the accumulators ``(var_acc,
        global_acc)``, then reset."""
        fetched = (self.var_acc.read_value(), self.global_acc.read_value())
        with tf.control_dependencies(list(fetched)):
            self.var_acc.assign(self._var_reset)
            self.global_acc.assign(self._global_reset)
        return fetched

    def unpack(self, var_acc: np.ndarray, global_acc: np.ndarray
               ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Returns (per-column accumulators, global accumulators) of ``fetch``'s values."""
        per_column = WINDOW_COLUMNS.unpack_numpy(var_acc.reshape(len(WINDOW_COLUMNS), self.num_columns))
        glob = {name: float(value) for name, value in WINDOW_GLOBALS.unpack_numpy(global_acc).items()}
        return per_column, glob
