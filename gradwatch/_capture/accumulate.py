"""Folding steps into the window: a step's buffer row becomes per-variable and
per-layer window statistics (``StepFolder``), on the host read for the rows a
single replica buffered (``StepBuffer``) or in the step under several replicas."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch._capture import keras_internals as internals
from gradwatch._capture import stats as stats_lib
from gradwatch._capture.array_ops import NP, TF, ArrayOps
from gradwatch._capture.array_ops import graph_constant as const
from gradwatch._capture.layouts import LOSS_GIVEN, LOSS_UNKNOWN, RAW_STATS, StepRow
from gradwatch._capture.measure import finish_stats
from gradwatch._capture.window import Rows, StepGlobals, StepValues, Window
from gradwatch._topology import Topology


def loss_pair(loss: tf.Tensor | None, loss_totals: tuple[tf.Tensor, tf.Tensor] | None) -> tf.Tensor:
    """Returns [2] float32, what a step records of its loss: (mean loss, LOSS_GIVEN),
    a loss tracker's (total, count), or (NaN, LOSS_UNKNOWN). Two reads of the tracker
    and no arithmetic: the step's loss is worked out when it is folded."""
    if loss is not None:
        return tf.stack([tf.cast(tf.reduce_mean(loss), tf.float32), tf.constant(LOSS_GIVEN)])
    if loss_totals is not None:
        return tf.stack([tf.cast(value, tf.float32) for value in loss_totals])
    return tf.constant([float("nan"), LOSS_UNKNOWN])


def step_losses(rows: Rows, loss_a: tf.Tensor, loss_b: tf.Tensor, live: tf.Tensor, loss_prev: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Returns (loss, state, totals) of R folded steps ([R] each but the totals) from
    their ``loss_pair``s and the tracker's totals before the first: each step's mean
    loss (NaN when unknown), its state (1.0 known and non-finite, 0.0 finite, -1.0
    unknown), and the totals after the last (the rows where ``live`` is False left out).
    A step's loss is its totals less those of the last tracked step before it."""
    xp = rows.xp
    f64 = xp.float64
    a, b = xp.cast(loss_a, f64), xp.cast(loss_b, f64)
    tracked = live & (b >= 0.0)
    before = rows.last_before(tracked)
    at = xp.maximum(before, 0)
    previous_total = xp.where(before >= 0, xp.gather(a, at), loss_prev[0])
    previous_count = xp.where(before >= 0, xp.gather(b, at), loss_prev[1])
    # The tracker is reset at every epoch start and its count grows with every
    # step (by the batch size): a count that did not grow is a fresh start.
    was_reset = b <= previous_count
    delta_total = xp.where(was_reset, a, a - previous_total)
    delta_count = xp.where(was_reset, b, b - previous_count)
    # a tracker whose total went non-finite stays so until its reset: the later steps'
    # own losses are unknown, not non-finite (a skipped NaN batch is not a divergence)
    stuck = xp.logical_not(was_reset) & xp.logical_not(xp.is_finite(previous_total))
    counted = tracked & (delta_count > 0.0) & xp.logical_not(stuck)
    nan = xp.constant(float("nan"), f64)
    loss = xp.where(counted, delta_total / xp.where(counted, delta_count, 1.0),
                    xp.where(xp.equal(b, LOSS_GIVEN), a, nan))
    known = counted | xp.equal(b, LOSS_GIVEN)
    state = xp.where(known, xp.where(xp.is_finite(loss), 0.0, 1.0), -1.0)
    return loss, xp.cast(state, f64), tracker_totals(rows, a, b, tracked, loss_prev)


def tracker_totals(rows: Rows, loss_a: tf.Tensor, loss_b: tf.Tensor, tracked: tf.Tensor,
                   loss_prev: tf.Tensor) -> tf.Tensor:
    """The loss tracker's (total, count) after R rows: the last ``tracked`` row's
    ``loss_pair``, else ``loss_prev`` (float64 [2])."""
    xp = rows.xp
    last = rows.last(tracked)
    totals = xp.cast(xp.stack([rows.pick(last, loss_a, 0.0), rows.pick(last, loss_b, 0.0)]), xp.float64)
    return xp.where(last >= 0, totals, loss_prev)


class StepFolder:
    """Folds steps' buffer rows into the window accumulators (pure: in-graph, or in
    numpy on the host, ``array_ops``).

    Args:
        topology: the run's topology (variables, then their layers, are the columns).
        window: the window whose fold is applied.
        clipping: whether the rows carry clip values.
    """

    def __init__(self, topology: Topology, window: Window, clipping: bool):
        positions = topology.layer_positions()
        self._segment_ids = [positions[v.layer] for v in topology.variables]
        self._sizes = [float(size) for size in topology.variable_sizes()]
        self._num_layers = len(topology.layers)
        self._row = StepRow(len(topology.variables))
        self._window = window
        self._clipping = clipping

    def fold(self, var_acc, global_acc, rows, steps, count, loss_prev, xp: ArrayOps = TF):
        """Returns the window accumulators and the loss totals with rows ``0..count-1`` of
        ``rows`` ([R, width]; their step numbers ``steps``, [R]) folded in, in order, all
        at once: every statistic is a [columns, R] block. ``xp``: the array operations
        (``array_ops``): in-graph, or numpy on the host."""
        row_index = Rows(xp.length(rows), xp)
        live = row_index.index < xp.cast(count, xp.int64)
        values, scalars = self._row.split_rows(rows, xp)
        loss, loss_state, loss_prev = step_losses(row_index, scalars["loss_a"], scalars["loss_b"], live,
                                                  loss_prev)
        loss_scale = scalars["loss_scale"]
        inv_scale = xp.where(xp.is_nan(loss_scale), 1.0, 1.0 / loss_scale)
        raw = xp.stack([values[name] for name in RAW_STATS.names])
        var_l2, var_nonfinite, var_max_abs, var_mean_abs, var_zero_frac = xp.unstack(
            finish_stats(raw, inv_scale, xp), num=5)
        var_present = values["present"] > 0.5
        var_stats = stats_lib.GradStats(var_l2, var_max_abs, var_mean_abs, var_zero_frac, var_nonfinite)
        segment_ids = xp.constant(self._segment_ids, xp.int32)
        layer_stats, layer_present = stats_lib.layer_stats(
            var_stats, var_present, segment_ids, xp.constant(self._sizes, xp.float32), self._num_layers, xp)
        columns = stats_lib.GradStats(
            *[xp.concat([v, lay], axis=0) for v, lay in zip(var_stats, layer_stats)])
        global_l2 = stats_lib.global_norm(var_l2, var_present, xp)
        clip = self._clip_columns(var_l2, layer_stats.l2, values, global_l2, segment_ids, xp)
        new_var, new_global = self._window.fold_values(
            var_acc, global_acc,
            StepValues(l2=columns.l2, nonfinite=columns.nonfinite, max_abs=columns.max_abs,
                       mean_abs=columns.mean_abs, zero_frac=columns.zero_frac,
                       present=xp.concat([var_present, layer_present], axis=0),
                       clip_scale=clip["scale"], clip_fired=clip["fired"]),
            StepGlobals(step=steps, global_l2=global_l2,
                        nonfinite_step=xp.reduce_any(var_nonfinite > 0.0, axis=0),
                        skipped=scalars["skipped"] > 0.5, loss=loss, learning_rate=scalars["learning_rate"],
                        loss_scale=loss_scale, clip_l2=clip["global_l2"], clip_scale=clip["global_scale"],
                        clip_fired=clip["any"], clip_threshold=scalars["clip_threshold"],
                        loss_state=loss_state, new_step=scalars["new_step"] > 0.5),
            live, xp,
        )
        return new_var, new_global, loss_prev

    def _clip_columns(self, var_l2, layer_l2, values, global_l2, segment_ids, xp: ArrayOps
                      ) -> dict[str, tf.Tensor]:
        """Returns the clip values per column (variables, then layers) and for the step."""
        var_scale, var_fired = values["clip_scale"], values["clip_fired"]
        if not self._clipping:
            nan = xp.full_like(global_l2, float("nan"))
            return {"scale": xp.concat([var_scale, xp.ones_like(layer_l2)], axis=0),
                    "fired": xp.concat([var_fired, xp.zeros_like(layer_l2)], axis=0),
                    "global_l2": nan, "global_scale": nan, "any": xp.zeros_like(global_l2, xp.bool)}
        post_l2 = var_l2 * var_scale
        layer_post = stats_lib.segment_norm(post_l2, segment_ids, self._num_layers, xp=xp)
        safe_layer = xp.where(layer_l2 > 0.0, layer_l2, 1.0)
        layer_scale = xp.where(layer_l2 > 0.0, layer_post / safe_layer, 1.0)
        layer_fired = xp.segment_max(var_fired, segment_ids, self._num_layers)
        clip_global = stats_lib.global_norm(post_l2, xp=xp)
        safe_global = xp.where(global_l2 > 0.0, global_l2, 1.0)
        return {"scale": xp.concat([var_scale, layer_scale], axis=0),
                "fired": xp.concat([var_fired, layer_fired], axis=0),
                "global_l2": clip_global,
                "global_scale": xp.where(global_l2 > 0.0, clip_global / safe_global, 1.0),
                "any": xp.reduce_any(var_fired > 0.0, axis=0)}


#: The most rows a step buffer holds: beyond, a step folds it, so memory does not grow with log_every.
MAX_BUFFER_ROWS = 256


def buffer_capacity(log_every: int) -> int:
    """Returns the rows a buffer holds: room for two windows (a read never finds it
    full), up to ``MAX_BUFFER_ROWS``."""
    return min(MAX_BUFFER_ROWS, max(16, 2 * log_every))


class StepBuffer:
    """Steps' rows waiting for the host read (one replica), or folded at once (several).

    A single replica only writes each step's row into a small buffer: the fold (a
    few hundred small ops) runs over the buffered rows at the host read, or in the
    step when the buffer is full. Several replicas fold every step (a mirrored
    write cannot sit in a conditional branch).

    Args:
        folder: the fold of one row.
        window: the window the rows fold into.
        num_vars: the number of watched variables.
        capacity: the rows the buffer holds.
        strategy: the ``tf.distribute`` strategy, if any.
    """

    def __init__(self, folder: StepFolder, window: Window, num_vars: int, capacity: int,
                 strategy: Any = None):
        self._folder, self._window = folder, window
        self.buffered = strategy is None or strategy.num_replicas_in_sync <= 1
        self.capacity = capacity
        layout = StepRow(num_vars)
        width = layout.width
        # where a row holds its loss_pair (set_loss writes it, the read settles the totals)
        self._loss_columns = [layout.scalar_column(name) for name in ("loss_a", "loss_b")]
        self._rows = self._steps = None
        if self.buffered:
            self._rows = internals.replica_variable(np.zeros((capacity, width), np.float32),
                                                    "gradwatch_step_rows", strategy)
            self._steps = internals.replica_variable(np.zeros(capacity, np.int64),
                                                     "gradwatch_step_numbers", strategy)
        # the loss tracker's (total, count) at the last folded step
        self._loss_prev = internals.replica_variable(np.zeros(2, np.float64), "gradwatch_loss_prev", strategy)

    def add(self, row: tf.Tensor, step: tf.Tensor, buffered: tf.Tensor, fold_if_full: bool
            ) -> tuple[tf.Tensor, tf.Tensor]:
        """Adds one step's row. Returns the new number of buffered rows and an op to wait for.

        ``fold_if_full`` False (the lean step, or a front that reads in time) leaves a
        full buffer to the next full step, or to the read.
        """
        if not self.buffered:
            return buffered, self._fold_now(row, step)
        index = tf.reshape(buffered, const([1, 1], tf.int32))
        writes = [self._rows.scatter_nd_update(index, tf.reshape(row, const([1, -1], tf.int32))),
                  self._steps.scatter_nd_update(index, tf.reshape(step, const([1], tf.int32)))]
        if not fold_if_full:
            with tf.control_dependencies(writes):
                return buffered + const(1, tf.int64), const(0, tf.int64)
        full = buffered + 1 >= self.capacity
        with tf.control_dependencies(writes):
            done = internals.cond(full, lambda: self.fold_rows(tf.constant(self.capacity, tf.int64)),
                                  lambda: tf.constant(0, tf.int64))
        return tf.where(full, tf.constant(0, tf.int64), buffered + 1), done

    def set_loss(self, row: tf.Tensor, pair: tf.Tensor) -> tf.Tensor:
        """Writes a step's ``loss_pair`` into buffered row ``row`` (nothing when ``row`` < 0,
        or when nothing is buffered); returns an op to wait for."""
        if not self.buffered:
            return tf.constant(0, tf.int64)
        at = tf.maximum(row, 0)
        index = tf.stack([tf.stack([at, tf.constant(column, tf.int64)]) for column in self._loss_columns])
        # a gather of the row, then of its entries: XLA has no ResourceGatherNd
        old = tf.gather(self._rows.sparse_read(tf.reshape(at, [1]))[0], self._loss_columns)
        value = tf.where(row >= 0, tf.cast(pair, tf.float32), old)
        with tf.control_dependencies([self._rows.scatter_nd_update(index, value)]):
            return tf.constant(0, tf.int64)

    def fold_rows(self, count: tf.Tensor) -> tf.Tensor:
        """In-graph: folds the first ``count`` buffered rows into the window, in step order."""
        self._fold_in_step(self._rows.read_value(), self._steps.read_value(), count)
        return count

    def fetch(self, count: tf.Tensor) -> dict[str, tf.Tensor]:
        """In-graph, for the recorder's single read: the buffered rows, their step numbers
        and the loss totals they follow (``fold_fetched`` folds them on the host side,
        at any later time: the totals that follow the rows are written here, at the read)."""
        if not self.buffered:
            return {}
        fetched = {"rows": self._rows.read_value(), "steps": self._steps.read_value(),
                   "loss_prev": self._loss_prev.read_value()}
        with tf.control_dependencies(list(fetched.values())):
            self._loss_prev.assign(self._totals_after(fetched["rows"], count, fetched["loss_prev"]))
        return fetched

    def _totals_after(self, rows: tf.Tensor, count: tf.Tensor, loss_prev: tf.Tensor) -> tf.Tensor:
        """The loss tracker's totals after the first ``count`` rows, as their fold leaves
        them (``step_losses``)."""
        index = Rows(self.capacity)
        loss_a, loss_b = rows[:, self._loss_columns[0]], rows[:, self._loss_columns[1]]
        return tracker_totals(index, loss_a, loss_b, (index.index < count) & (loss_b >= 0.0), loss_prev)

    def fold_fetched(self, var_acc: np.ndarray, global_acc: np.ndarray, fetched: dict[str, np.ndarray],
                     count: int) -> tuple[np.ndarray, np.ndarray]:
        """Host side, any time after a read (on the writer thread, while training goes
        on): the fetched window accumulators (numpy values) with the ``count`` fetched
        rows folded in.

        The fold runs in numpy: the same fold as a step's (``StepFolder.fold``), with no
        graph to trace. As a graph function its first call cost 0.29 s (0.43 s in a fit,
        most of the MLP's one-off after its first step), then 1.08 ms a call; as an
        XLA call ~1.5 s of compile and 85 MiB for good (benchmarks/README.md)."""
        if not self.buffered:
            return var_acc, global_acc
        with NP.errors_ignored():
            var_acc, global_acc, _ = self._folder.fold(var_acc, global_acc, fetched["rows"], fetched["steps"],
                                                       count, fetched["loss_prev"], NP)
        return var_acc, global_acc

    def _fold_now(self, row: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        self._fold_in_step(row[None], tf.reshape(step, [1]), tf.constant(1, tf.int64))
        return tf.constant(0, tf.int64)

    def _fold_in_step(self, rows: tf.Tensor, steps: tf.Tensor, count: tf.Tensor) -> None:
        """In-graph: folds ``count`` of ``rows`` into the window and moves the loss totals on."""
        def fold(var_acc, global_acc):
            var_acc, global_acc, loss_prev = self._folder.fold(var_acc, global_acc, rows, steps, count,
                                                               self._loss_prev.read_value())
            self._loss_prev.assign(loss_prev)
            return var_acc, global_acc

        self._window.update(fold)


