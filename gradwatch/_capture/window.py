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

from gradwatch._capture.array_ops import TF, ArrayOps
from gradwatch._capture.keras_internals import replica_variable
from gradwatch._capture.layouts import WINDOW_COLUMNS, WINDOW_GLOBALS

# the globals that hold the step last counted in a count of steps (once per step)
_COUNTED = ("nonfinite_counted_step", "skipped_counted_step", "clip_counted_step")


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
    """R steps' values per column (variables then layers): float32 [C, R] each."""

    l2: tf.Tensor
    nonfinite: tf.Tensor
    max_abs: tf.Tensor  # meaningful on sampled steps only
    mean_abs: tf.Tensor
    zero_frac: tf.Tensor
    present: tf.Tensor  # bool: had a gradient in that step
    clip_scale: tf.Tensor  # post/pre-clip norm ratio (1 when no clip)
    clip_fired: tf.Tensor  # float 0/1: clipping changed the gradient


class StepGlobals(NamedTuple):
    """R steps' scalars: [R] each."""

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


class Rows:
    """Index arithmetic over R rows folded at once (R static), along the last axis:
    the last row where a mask holds, the last one before each row, a row's value."""

    def __init__(self, count: int, xp: ArrayOps = TF):
        self.count, self.xp = count, xp
        self.index = xp.arange(count, xp.int64)
        self._earlier = np.arange(count)[None, :] < np.arange(count)[:, None]  # [k, j]: j < k
        self._none = xp.constant(-1, xp.int64)

    def last(self, mask: tf.Tensor) -> tf.Tensor:
        """The last row where ``mask`` ([..., R]) holds; -1 for none."""
        return self.xp.reduce_max(self.xp.where(mask, self.index, self._none), axis=-1)

    def first(self, mask: tf.Tensor) -> tf.Tensor:
        """The first row where ``mask`` ([R]) holds; -1 for none."""
        xp = self.xp
        first = xp.reduce_min(xp.where(mask, self.index, xp.constant(self.count, xp.int64)))
        return xp.where(first < self.count, first, self._none)

    def last_before(self, mask: tf.Tensor) -> tf.Tensor:
        """[..., R]: for each row, the last earlier row where ``mask`` ([..., R]) holds; -1 for none."""
        earlier = self._earlier & self.xp.expand_dims(mask, -2)
        return self.xp.reduce_max(self.xp.where(earlier, self.index, self._none), axis=-1)

    def pick(self, row: tf.Tensor, values: tf.Tensor, fallback: tf.Tensor) -> tf.Tensor:
        """``values[..., row]``: ``row`` [] or one per entry of ``values``' trailing
        leading axes; ``fallback`` (shaped as the result) where ``row`` is -1."""
        xp = self.xp
        hit = xp.equal(self.index, xp.expand_dims(row, -1))
        picked = xp.reduce_sum(xp.where(hit, values, xp.zeros_like(values)), axis=-1)
        return xp.where(row >= 0, picked, fallback)

    def masked(self, reduce, masks: list[tf.Tensor], values: list[tf.Tensor], empty: float) -> tf.Tensor:
        """``reduce`` along the rows of each value where its mask holds (``empty`` elsewhere):
        one stacked reduction, [len(values), ...]."""
        xp = self.xp
        stacked = xp.stack([xp.cast(value, xp.float64) for value in values])
        return reduce(xp.where(xp.stack(masks), stacked, xp.constant(empty, xp.float64)), axis=-1)


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

    def fold_values(self, acc: tf.Tensor, old: tf.Tensor, values: StepValues, scalars: StepGlobals,
                    live: tf.Tensor, xp: ArrayOps = TF) -> tuple[tf.Tensor, tf.Tensor]:
        """The window accumulators ``(var_acc, global_acc)`` with R steps' rows folded in
        at once, in row order, the rows where ``live`` ([R] bool) is False left out (pure,
        a fixed number of ops whatever R). The window's first step is its sampled step
        (max, mean, zero fraction); every observation in it (several optimizers, or one
        applied several times) is (``xp``: the array operations, ``array_ops``)."""
        rows = Rows(xp.length(live), xp)
        old_globals = WINDOW_GLOBALS.unpack(old, xp=xp)
        f64 = xp.float64
        new_step = xp.cast(scalars.new_step, xp.bool) & live
        # the row is in the window's first step: the steps counted up to it make 1
        sampled = xp.equal(old_globals["steps"] + xp.cumsum(xp.cast(new_step, f64)), 1.0)
        step = xp.cast(scalars.step, f64)
        # a step observed several times counts once: after a flagged row its step is the one counted
        flags = xp.stack([xp.cast(flag, xp.bool) for flag in (scalars.nonfinite_step, scalars.skipped,
                                                               scalars.clip_fired)]) & live
        counted = xp.stack([old_globals[name] for name in _COUNTED])
        before = rows.last_before(flags)
        counted_before = xp.where(before >= 0, xp.gather(step, xp.maximum(before, 0)), counted[:, None])
        fresh = flags & xp.not_equal(counted_before, step)
        fresh_nonfinite = fresh[0]
        # the window's first non-finite step: rows of a non-finite step before any counted one
        no_event_yet = old_globals["first_nonfinite_step"] < 0.0
        event = rows.last(flags[0] & no_event_yet & (rows.last_before(fresh_nonfinite) < 0))
        first = rows.first(fresh_nonfinite)
        new_var = self._fold_columns(rows, WINDOW_COLUMNS.unpack(acc, xp=xp), values, live, sampled, event)
        firsts = {
            "first_nonfinite_step": xp.where(
                no_event_yet, rows.pick(first, step, old_globals["first_nonfinite_step"]),
                old_globals["first_nonfinite_step"]),
            "loss_nonfinite_at_first": rows.pick(event, xp.cast(scalars.loss_state, f64),
                                                 old_globals["loss_nonfinite_at_first"]),
        }
        now_counted = rows.pick(rows.last(flags), step, counted)
        return new_var, self._fold_globals(rows, old_globals, scalars, live, {
            **firsts, **dict(zip(_COUNTED, xp.unstack(now_counted, num=len(_COUNTED)))),
        }, [new_step, *xp.unstack(fresh, num=len(_COUNTED))])

    @staticmethod
    def _fold_columns(rows: Rows, acc: dict[str, tf.Tensor], values: StepValues, live: tf.Tensor,
                      sampled: tf.Tensor, event: tf.Tensor) -> tf.Tensor:
        """Returns the per-column accumulators with the rows folded in."""
        xp = rows.xp
        f64 = xp.float64
        has = xp.cast(values.present, xp.bool) & live[None, :]
        l2 = xp.cast(values.l2, f64)
        # a NaN norm (no finite entry) is the last value if last, but no max, min or mean
        measured = has & xp.logical_not(xp.is_nan(l2))
        ones = xp.ones_like(l2)
        summed = dict(zip(("l2_sum", "l2_steps", "grad_steps", "nonfinite_sum", "clip_fired_sum"), xp.unstack(
            rows.masked(xp.reduce_sum, [measured, measured, has, has, has],
                        [l2, ones, ones, values.nonfinite, values.clip_fired], 0.0))))
        sampled_names = ("max_abs", "mean_abs", "zero_frac")
        # the window's first step is its sampled step
        sample = rows.pick(rows.last(has & sampled[None, :]),
                           xp.cast(xp.stack([values.max_abs, values.mean_abs, values.zero_frac]), f64),
                           xp.stack([acc[name] for name in sampled_names]))
        largest = rows.masked(xp.reduce_max, [measured], [l2], -np.inf)[0]
        least = rows.masked(xp.reduce_min, [measured, has], [l2, values.clip_scale], np.inf)
        return WINDOW_COLUMNS.pack(xp=xp, values={
            **{name: acc[name] + total for name, total in summed.items()},
            **dict(zip(sampled_names, xp.unstack(sample, num=3))),
            "l2_last": rows.pick(rows.last(has), l2, acc["l2_last"]),
            "l2_max": xp.maximum(acc["l2_max"], largest),
            "l2_min": xp.minimum(acc["l2_min"], least[0]),
            "clip_scale_min": xp.minimum(acc["clip_scale_min"], least[1]),
            "nonfinite_at_first": rows.pick(event, xp.cast(values.nonfinite, f64), acc["nonfinite_at_first"]),
        })

    @staticmethod
    def _fold_globals(rows: Rows, old: dict[str, tf.Tensor], scalars: StepGlobals, live: tf.Tensor,
                      settled: dict[str, tf.Tensor], counts: list[tf.Tensor]) -> tf.Tensor:
        """Returns the global accumulators with the rows folded in (``settled``: those
        worked out by the caller; ``counts``: [R] bool masks of the rows that count a
        new step, a non-finite, a skipped and a clipped one)."""
        xp = rows.xp
        f64 = xp.float64
        gl2 = xp.cast(scalars.global_l2, f64)
        measured = live & xp.logical_not(xp.is_nan(gl2))
        loss = xp.cast(scalars.loss, f64)
        loss_known = live & xp.is_finite(loss)
        ones = xp.ones_like(gl2)
        loss_nonfinite = live & xp.equal(xp.cast(scalars.loss_state, f64), 1.0)
        summed = ("global_l2_sum", "loss_sum", "loss_count", "loss_nonfinite_steps", "steps",
                  "nonfinite_steps", "skipped_steps", "clip_fired_steps")
        totals = rows.masked(xp.reduce_sum, [measured, loss_known, loss_known, loss_nonfinite, *counts],
                             [gl2, loss, ones, ones, *[ones] * len(counts)], 0.0)
        lasts = ("last_step", "global_l2_last", "learning_rate_last", "loss_scale_last", "clip_l2_last",
                 "clip_threshold_last")
        last_values = (scalars.step, gl2, scalars.learning_rate, scalars.loss_scale, scalars.clip_l2,
                       scalars.clip_threshold)
        at_last = rows.pick(rows.last(live), xp.stack([xp.cast(value, f64) for value in last_values]),
                            xp.stack([old[name] for name in lasts]))
        # a NaN (no clip) is no maximum or minimum: the reset value stays, and is read as none
        clip_l2, clip_scale = xp.cast(scalars.clip_l2, f64), xp.cast(scalars.clip_scale, f64)
        largest = rows.masked(xp.reduce_max, [measured, live & xp.logical_not(xp.is_nan(clip_l2))],
                              [gl2, clip_l2], -np.inf)
        least = rows.masked(xp.reduce_min, [measured, live & xp.logical_not(xp.is_nan(clip_scale))],
                            [gl2, clip_scale], np.inf)
        return WINDOW_GLOBALS.pack(xp=xp, values={
            **settled,
            **{name: old[name] + total for name, total in zip(summed, xp.unstack(totals, num=len(summed)))},
            **dict(zip(lasts, xp.unstack(at_last, num=len(lasts)))),
            "global_l2_max": xp.maximum(old["global_l2_max"], largest[0]),
            "clip_l2_max": xp.maximum(old["clip_l2_max"], largest[1]),
            "global_l2_min": xp.minimum(old["global_l2_min"], least[0]),
            "clip_scale_min": xp.minimum(old["clip_scale_min"], least[1]),
        })

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
