"""The engine both fronts share: in-graph capture into window accumulators,
host reads every ``log_every`` steps, rows to the sinks.

``GradientMonitor`` (model.fit) and ``Watch`` (custom loops) are thin fronts:
they decide *when* ``observe`` runs in-graph and *when* ``read`` runs on the
host, and hand over what only they know (loss, learning rate, loss scale,
optimizer iterations).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch import _keras_internals as internals
from gradwatch import alerts as alerts_lib
from gradwatch import clip as clip_lib
from gradwatch import detectors as detectors_lib
from gradwatch import probes as probes_lib
from gradwatch import rows as rows_lib
from gradwatch import stats as stats_lib
from gradwatch.options import Options
from gradwatch.sinks.csv_sink import CsvSink
from gradwatch.sinks.tb_sink import TensorBoardSink
from gradwatch.topology import Topology
from gradwatch.window import StepGlobals, StepValues, Window

logger = logging.getLogger("gradwatch")

# Indices into the engine's int64 step state: the last step number, a pending
# resync with the optimizer's iterations, the rows waiting in the step buffer,
# the steps of the current window, and whether one of them was non-finite.
_STEP, _RESYNC, _ITERATIONS_AT_END, _BUFFERED, _WINDOW_STEPS, _NONFINITE = range(6)

# Rows of the per-step value matrix: the raw statistics of ``_raw_stats``, the
# clip scale and whether clipping fired, and whether the gradient was present.
_RAW = 6
_ROWS = _RAW + 3
_SCALARS = 6  # loss (two values, see _loss_pair), learning rate, loss scale, clip threshold, skipped
# The XLA calls standing in for a branch not taken (the full pass, the unit and
# update measures: see _branch) pay off on a net with many variables, where the
# branch has hundreds of nodes. Each costs a compile (~0.3 s) and memory TensorFlow
# keeps for the life of the process (its XLA cache has no eviction), paid again by
# every new model: a net with fewer variables runs those branches as plain graph.
XLA_BRANCH_MIN_VARIABLES = 32
# The second loss value when the first is the step's mean loss, or when there is none;
# otherwise it is the loss tracker's count and the first its total.
_LOSS_GIVEN, _LOSS_UNKNOWN = -1.0, -2.0


class _Writer:
    """Writes the sinks' windows on one background thread, in order.

    A read hands its rows over and training goes on while they are formatted and
    written (the step itself releases the GIL). At most ``MAX_PENDING`` windows wait;
    a write's error is raised by the next ``submit`` or by ``flush``.
    """

    MAX_PENDING = 2

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                           thread_name_prefix="gradwatch-writer")
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, fn, *args) -> None:
        self._settle(keep=self.MAX_PENDING - 1)
        self._pending.append(self._pool.submit(fn, *args))

    def _settle(self, keep: int) -> None:
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            self._pending.pop(0).result()

    def flush(self) -> None:
        """Waits until every window handed over is written (raises a write's error)."""
        self._settle(keep=0)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)


class StepContext:
    """What a front knows about the current step, in-graph (all optional)."""

    def __init__(
        self,
        loss: tf.Tensor | None = None,
        learning_rate: tf.Tensor | None = None,
        loss_scale: tf.Tensor | None = None,
        iterations: tf.Tensor | None = None,
        loss_totals: tuple[tf.Tensor, tf.Tensor] | None = None,
        overflow_skips: bool = False,
    ):
        self.loss = loss
        self.learning_rate = learning_rate
        self.loss_scale = loss_scale
        self.iterations = iterations
        # (total, count) of a running loss tracker; the step's loss is the delta.
        self.loss_totals = loss_totals
        # True when a non-finite gradient makes the optimizer skip the update
        # (a LossScaleOptimizer's overflow handling, or on_nonfinite != "warn").
        self.overflow_skips = overflow_skips


class Engine:
    """Capture, windowing and writing for one run.

    Args:
        options: validated front options.
        run_info: extra entries for ``run.json`` (versions are added here).
        host_update_snapshots: the front takes the update probe's snapshots on the
            host and calls ``after_update`` after the optimizer's update.
    """

    def __init__(self, options: Options, run_info: dict[str, Any] | None = None,
                 host_update_snapshots: bool = False):
        self.options = options
        self.run_info = dict(run_info or {})
        self.clip = clip_lib.as_clip(options.clip)
        self.topology: Topology | None = None
        self.window: Window | None = None
        self._index: dict[int, int] = {}
        self._state: tf.Variable | None = None
        self._loss_prev: tf.Variable | None = None
        self._sink: CsvSink | None = None
        self._tb_sink: TensorBoardSink | None = None
        self._writer: _Writer | None = None
        self.chief = True
        self._sinks_opened = False
        self.steps_seen = 0
        self.last_step: int | None = None  # the last step of the last window read
        self.last_window: dict[str, Any] | None = None
        self.closed = False
        self.last_finite: tf.Tensor | None = None
        self.last_alerts: list[alerts_lib.Alert] = []
        # a front that reacts to a read's alerts itself and needs no row back
        # (GradientMonitor): reads without a non-finite step are interpreted on the
        # writer thread (see read)
        self.defer_reads = False
        self.acted_alerts: list[alerts_lib.Alert] = []
        self.last_read_steps = 0
        self.units = self.updates = self.histograms = None
        self.activations: probes_lib.ActivationProbe | None = None  # set by GradientMonitor
        self.on_alert = None
        self._no_gradient_reported: set[str] = set()
        self._compiled_fns: dict[Any, Any] = {}
        self._detector_state = detectors_lib.DetectorState()
        # True for a front that calls updates.snapshot_now() before a step and
        # after_update() after the optimizer's update (GradientMonitor)
        self.host_update_snapshots = bool(host_update_snapshots)
        self._update_grads: dict[int, Any] = {}
        # XLA for the small-tensor work of each step (see _compiled).
        self._jit = os.environ.get("GRADWATCH_JIT", "1") != "0"
        # Read while a step is traced: True traces the lean step, which a front runs on
        # the steps it knows hold none of the work of a sampled step (see observe_slots).
        self.lean = False

    # ------------------------------------------------------------ binding

    @property
    def bound(self) -> bool:
        return self.window is not None

    def bind(
        self,
        topology: Topology,
        variables: Sequence[Any],
        strategy: tf.distribute.Strategy | None = None,
        start_step: int = 0,
    ) -> None:
        """Creates the accumulators for these variables (host side, or lifted out of a trace)."""
        self.topology = topology
        # Only the chief worker writes; the others compute (their all-reduces are needed) and stay silent.
        self.chief = internals.is_chief(strategy)
        self._index = {internals.variable_key(v): i for i, v in enumerate(variables)}
        self._variables = list(variables)
        if self.clip is not None:
            self.clip.build(strategy)
        layer_of = {layer.name: i for i, layer in enumerate(topology.layers)}
        self._segment_ids = [layer_of[v.layer] for v in topology.variables]
        self._sizes = [float(np.prod(v.shape)) if v.shape else 1.0 for v in topology.variables]
        self._num_layers = len(topology.layers)
        # Columns: the variables, then their layers (aggregated in-graph).
        self.window = Window(len(variables) + self._num_layers, strategy)
        self._state = internals.replica_variable(
            np.array([start_step, 0, -1, 0, 0, 0], np.int64), "gradwatch_step_state", strategy
        )
        # Single replica: each step only writes its values as one row of a small
        # buffer; the window fold (a few hundred small ops, the bulk of the per-step
        # cost on small nets) runs over the buffered rows when the host reads, or
        # in-step when the buffer is full.  Several replicas fold every step (a
        # mirrored write cannot sit in a conditional branch).
        single = strategy is None or strategy.num_replicas_in_sync <= 1
        self._buffered = single
        self._capacity = max(16, 2 * self.options.log_every)
        self._num_vars = len(variables)
        width = _ROWS * self._num_vars + _SCALARS
        self._buffer = self._step_buffer = None
        if self._buffered:
            self._buffer = internals.replica_variable(
                np.zeros((self._capacity, width), np.float32), "gradwatch_step_rows", strategy
            )
            self._step_buffer = internals.replica_variable(
                np.zeros(self._capacity, np.int64), "gradwatch_step_numbers", strategy
            )
        self._read_all_fn = internals.run_function(self._read_all, autograph=False)
        self.units = probes_lib.UnitProbe(topology, strategy)
        # Probes that write under a tf.cond cannot run under several replicas
        # (a mirrored write is a merge_call, which a cond branch cannot hold).
        self.updates = probes_lib.UpdateProbe(
            variables, topology, strategy, host_snapshots=self.host_update_snapshots
        ) if single else None
        self.histograms = (
            probes_lib.HistogramProbe(topology, self.options.histogram_every,
                                      self.options.signed_histograms, strategy)
            if single and self.options.histogram_every > 0 else None
        )
        # The loss tracker's (total, count) at the last folded step: a step's loss is
        # the difference, taken when the step is folded, not in the step itself.
        self._loss_prev = internals.replica_variable(np.zeros(2, np.float64), "gradwatch_loss_prev",
                                                     strategy)

    def request_resync(self, iterations_at_end: int) -> None:
        """Next observed step takes its number from the optimizer's iterations,
        unless they still equal ``iterations_at_end`` (then it continues)."""
        state = self._state.numpy()
        state[_RESYNC] = 1
        state[_ITERATIONS_AT_END] = iterations_at_end
        self._state.assign(state)

    # ------------------------------------------------------------ in-graph

    @tf.autograph.experimental.do_not_convert
    def observe(
        self,
        grads: Sequence[tf.Tensor | tf.IndexedSlices | None],
        variables: Sequence[Any],
        context: StepContext | None = None,
    ) -> list[tf.Tensor | tf.IndexedSlices | None]:
        """Folds one step's gradients into the window. Returns the gradients to apply."""
        return self.observe_slots(grads, self.slots_of(grads, variables), context)

    def slots_of(self, grads: Sequence[Any], variables: Sequence[Any]) -> tuple[int, ...]:
        """The accumulator column of each variable (host side, before any trace)."""
        if len(grads) != len(variables):
            raise ValueError(
                f"observe() got {len(grads)} gradients for {len(variables)} variables; "
                "pass the list returned by tape.gradient(loss, variables) with the same variables."
            )
        slots = []
        for var in variables:
            slot = self._index.get(internals.variable_key(var))
            if slot is None:
                raise ValueError(
                    f"observe() got variable {internals.variable_path(var)!r}, which is not among "
                    f"the {len(self._index)} variables this run watches (fixed at the first "
                    "step). Pass the same variables every step."
                )
            slots.append(slot)
        return tuple(slots)

    @tf.autograph.experimental.do_not_convert
    def observe_slots(
        self,
        grads: Sequence[tf.Tensor | tf.IndexedSlices | None],
        slots: Sequence[int],
        context: StepContext | None = None,
    ) -> list[tf.Tensor | tf.IndexedSlices | None]:
        """``observe`` with the variables already resolved to accumulator columns.

        Traced with ``self.lean`` True this is the lean step: the sums of squares, the
        unit counters and the buffer row only, with the full pass kept for a step
        whose cheap norm is not exact. It holds none of the conditional work the
        other steps need (the window's sampled step, histogram steps, the update
        probe's measure, a full buffer): a conditional costs a step even when not
        taken (an If op waits for every gradient and runs asynchronously at the end
        of the step). A front that traces it runs the full step whenever that work
        may be due, and must read at least every ``capacity`` steps.
        """
        context = context or StepContext()
        lean = self.lean
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        present_grads = [grads[i] for i in present]

        loss_pair = self._loss_pair(context)
        replica_context = internals.replicas_to_reduce()
        if replica_context is not None:
            # Stats are of the global gradient: what the optimizer will apply
            # after its own all-reduce, not this replica's share.
            stat_grads = (replica_context.all_reduce(tf.distribute.ReduceOp.SUM, present_grads)
                          if present_grads else present_grads)
            if context.loss is None and context.loss_totals is not None:
                # each replica's tracker holds its share: the sums are the global totals
                loss_pair = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, loss_pair)
        else:
            stat_grads = present_grads

        # one unpack, not a strided slice per field (each is an op on every step)
        state = tf.unstack(self._state.read_value(), num=6)
        step = self._step_number(state, context.iterations)
        # The window's first step is its sampled step (full statistics, probes).
        sampled = None if lean else tf.equal(state[_WINDOW_STEPS], 0)
        num_present = len(present)
        if num_present:
            inv_scale = (
                1.0 / tf.cast(context.loss_scale, tf.float32) if context.loss_scale is not None
                else tf.constant(1.0)
            )
            flat, index, nonfinite_step = self._stat_pieces(stat_grads, sampled)
            clip_threshold = tf.constant(float("nan"))
            if self.clip is not None:
                raw = tf.reshape(tf.gather(flat, tf.constant(index.reshape(-1), tf.int32)),
                                 [_RAW, num_present])
                finished = self.finish_stats(raw, inv_scale)
                clipped, clip_scale, clip_fired, clip_threshold = self._clip(
                    stat_grads, [slots[i] for i in present], finished[0], finished[1], context,
                    replica_context,
                )
                for k, i in enumerate(present):
                    grads[i] = clipped[k]
                end = int(flat.shape[0])
                flat = tf.concat([flat, clip_scale, clip_fired], axis=0)
                index = np.concatenate([index, end + np.arange(2 * num_present).reshape(2, num_present)])
            by_slot = {slots[i]: stat_grads[k] for k, i in enumerate(present)}
            self._run_probes(by_slot, step, sampled, inv_scale)
        else:
            flat, index = tf.zeros([0], tf.float32), np.zeros([_RAW, 0], np.int64)
            clip_threshold = tf.constant(float("nan"))
            nonfinite_step = tf.constant(False)
        nan = tf.constant(float("nan"))
        skipped = nonfinite_step if context.overflow_skips else tf.constant(False)
        scalars = tf.concat([
            loss_pair,
            tf.stack([
                tf.cast(context.learning_rate, tf.float32) if context.learning_rate is not None else nan,
                tf.cast(context.loss_scale, tf.float32) if context.loss_scale is not None else nan,
                tf.cast(clip_threshold, tf.float32),
                tf.cast(skipped, tf.float32),
            ]),
        ], axis=0)
        row = self._row(flat, index, [slots[i] for i in present], scalars)
        if self._buffered:
            buffered, done = self._buffer_row(row, step, state[_BUFFERED], fold_if_full=not lean)
        else:
            fold = self._compiled(("fold",), self._fold_now)
            buffered, done = state[_BUFFERED], fold(row, step)
        with tf.control_dependencies([done]):
            self._state.assign(tf.stack([
                step, tf.constant(0, tf.int64), state[_ITERATIONS_AT_END], buffered,
                state[_WINDOW_STEPS] + 1,
                tf.maximum(state[_NONFINITE], tf.cast(nonfinite_step, tf.int64)),
            ]))
        self.last_finite = tf.logical_not(nonfinite_step)
        return grads

    def _row(self, flat: tf.Tensor, index: np.ndarray, present_slots: Sequence[int],
             scalars: tf.Tensor) -> tf.Tensor:
        """One step's buffer row, in one concat and one gather with static indices: the
        [_ROWS, V] values (each present gradient's statistics at its variable's column,
        ``index[r, k]`` locating row r of the k-th present gradient in ``flat``; zeros for
        absent variables; the no-clip rows when there is no clipping; the presence row),
        flattened, then the scalars."""
        source = tf.concat([flat, scalars, tf.constant([0.0, 1.0])], axis=0)
        zero = int(flat.shape[0]) + _SCALARS
        one = zero + 1
        layout = np.full((_ROWS, self._num_vars), zero, np.int64)
        for k, slot in enumerate(present_slots):
            layout[: index.shape[0], slot] = index[:, k]
            layout[_ROWS - 1, slot] = one
        if index.shape[0] == _RAW:  # no clipping: scale 1, never fired
            layout[_RAW] = one
        gather = np.concatenate([layout.reshape(-1), np.arange(zero - _SCALARS, zero)])
        return tf.gather(source, tf.constant(gather, tf.int32))

    def _buffer_row(self, row, step, buffered, fold_if_full: bool = True):
        """Writes one step's ``_row`` to the buffer; folds the buffer in-step when
        it is full (the host did not read for ``capacity`` steps; the lean step
        leaves that to the full step). Returns the new number of buffered rows and
        an op to wait for."""
        index = tf.reshape(buffered, [1, 1])
        writes = [
            self._buffer.scatter_nd_update(index, tf.reshape(row, [1, -1])),
            self._step_buffer.scatter_nd_update(index, tf.reshape(step, [1])),
        ]
        if not fold_if_full:
            with tf.control_dependencies(writes):
                return buffered + 1, tf.constant(0, tf.int64)
        full = buffered + 1 >= self._capacity
        with tf.control_dependencies(writes):
            fold = self._compiled(("rows",), self._fold_rows)
            done = internals.cond(full, lambda: fold(tf.constant(self._capacity, tf.int64)),
                                  lambda: tf.constant(0, tf.int64))
        return tf.where(full, tf.constant(0, tf.int64), buffered + 1), done

    def _fold_rows(self, count: tf.Tensor) -> tf.Tensor:
        """Folds the first ``count`` buffered rows into the window, in step order."""
        rows = self._buffer.read_value()
        steps = self._step_buffer.read_value()

        def body(k, var_acc, global_acc, loss_prev):
            return (k + 1, *self._fold_values(var_acc, global_acc, rows[k], steps[k], loss_prev))

        def fold(var_acc, global_acc):
            _, var_acc, global_acc, loss_prev = tf.while_loop(
                lambda k, *_: k < count, body,
                (tf.constant(0, tf.int64), var_acc, global_acc, self._loss_prev.read_value()))
            self._loss_prev.assign(loss_prev)
            return var_acc, global_acc

        self.window.update(fold)
        return count

    def _fold_now(self, row, step) -> tf.Tensor:
        """Folds this step's ``_row`` straight into the window (several replicas)."""
        def fold(var_acc, global_acc):
            var_acc, global_acc, loss_prev = self._fold_values(
                var_acc, global_acc, row, step, self._loss_prev.read_value())
            self._loss_prev.assign(loss_prev)
            return var_acc, global_acc

        self.window.update(fold)
        return tf.constant(0, tf.int64)

    def _flush(self) -> tf.Tensor:
        """Host read, first part: the buffered rows into the window; a new window starts."""
        state = self._state.read_value()
        done = self._compiled(("rows",), self._fold_rows)(state[_BUFFERED]) if self._buffered else 0
        with tf.control_dependencies([done]):
            zero = tf.constant(0, tf.int64)
            return self._state.assign(tf.stack([
                state[_STEP], state[_RESYNC], state[_ITERATIONS_AT_END], zero, zero, zero
            ]))

    @tf.autograph.experimental.do_not_convert
    def after_update(self) -> None:
        """In-graph, after the optimizer applied this step's update (host-snapshot fronts)."""
        if self.updates is not None and self.updates.host_snapshots and self._update_grads:
            self.updates.measure_after_update(self._update_grads, self._branch)
        self._update_grads = {}

    def _read_all(self) -> dict[str, Any]:
        """In-graph host read: ``_flush``, then every accumulator and probe state."""
        with tf.control_dependencies([self._flush()]):
            fetched = {"window": self.window.fetch(), "units": self.units.fetch()}
            if self.updates is not None:
                fetched["updates"] = self.updates.fetch()
            if self.histograms is not None:
                fetched["histograms"] = self.histograms.fetch()
        return fetched

    def next_step(self, iterations: int | None) -> int:
        """Host side: the number the next observed step takes (``_step_number``)."""
        state = tf.unstack(self._state.read_value(), num=6)
        return int(self._step_number(state, None if iterations is None else tf.constant(iterations)))

    @property
    def capacity(self) -> int:
        """Steps the buffer holds between two reads before a step must fold it."""
        return self._capacity

    def has_nonfinite(self) -> bool:
        """Host side: whether a step of the current window was non-finite (one small read)."""
        return bool(self._state.numpy()[_NONFINITE] > 0)

    def _run_probes(self, by_slot: dict[int, Any], step: tf.Tensor, sampled: tf.Tensor | None,
                    inv_scale: tf.Tensor) -> None:
        """Dead units every step; update and histogram probes on their sampled steps
        (none of these on the lean step, whose ``sampled`` is None)."""
        self.units.observe(by_slot, sampled, self._branch)
        if sampled is None:
            self._update_grads = {}
            return
        if self.updates is not None and self.updates.host_snapshots:
            self._update_grads = by_slot  # measured in after_update(), in this same trace
        elif self.updates is not None:
            # a weight snapshot every UPDATE_EVERY steps (steps 1, 51, 101, ...), not every window
            due = tf.equal(tf.math.floormod(step - 1, probes_lib.UPDATE_EVERY), 0)
            self.updates.observe(by_slot, due)
        if self.histograms is not None:
            self.histograms.observe(by_slot, step, inv_scale)

    def _compiled(self, key, fn):
        """``fn`` as one XLA cluster, cached per static key: the window fold (a few
        hundred small ops per folded step, run at the host read), and the branches of
        ``_branch``; plain graph under several replicas or ``GRADWATCH_JIT=0``."""
        if internals.replicas_to_reduce() is not None or not self._jit:
            # Mirrored variables are written through merge_call, which a nested
            # tf.function cannot hold: inline under several replicas.
            return fn
        cached = self._compiled_fns.get(key)
        if cached is None:
            cached = internals.run_function(fn, jit_compile=True, autograph=False)
            self._compiled_fns[key] = cached
        return cached

    def _branch(self, key, fn):
        """``_compiled`` for a branch taken on some steps only (the sampled steps' full
        pass, the unit and update measures): one node in the branch not taken, on a
        net of ``XLA_BRANCH_MIN_VARIABLES`` variables or more; plain graph below."""
        if self._num_vars < XLA_BRANCH_MIN_VARIABLES:
            return fn
        return self._compiled(key, fn)

    def _stat_pieces(self, stat_grads, sampled: tf.Tensor | None
                     ) -> tuple[tf.Tensor, np.ndarray, tf.Tensor]:
        """The raw statistics of the gradients (loss-scaled) as one float32 vector,
        where ``index[r, k]`` (static, [6, n]) locates row r for the k-th gradient: the
        sum of squares, then the full statistics l2, max_abs, mean_abs, zero_frac,
        nonfinite (these only on the steps that compute them, zeros on the others);
        and whether a gradient had a non-finite entry.

        This is all a step does with the gradients' values; turning it into
        statistics (``finish_stats``) waits until the window is folded.
        """
        groups = stats_lib.group_gradients(stat_grads)
        dense = [g for g in groups.groups if g.matrix.shape.is_fully_defined()]
        sparse = [g for g in groups.groups if not g.matrix.shape.is_fully_defined()]
        pieces, flags = [], []
        index = np.zeros((_RAW, groups.count), np.int64)
        offset = 0
        if dense:
            # One pass per gradient: an L2Loss for a large one, a row reduction per
            # group of stacked small ones (stats.group_sum_of_squares).
            sum_sq = [stats_lib.group_sum_of_squares(g) for g in dense]
            squares = tf.concat(sum_sq, axis=0) if len(sum_sq) > 1 else sum_sq[0]
            dense_info = tuple((g.dense_size, g.positions) for g in dense)
            count = sum(len(pos) for _, pos in dense_info)

            def regroup(matrices):
                return stats_lib.Groups(
                    tuple(stats_lib.Group(m, size, pos) for m, (size, pos) in zip(matrices, dense_info)),
                    None, count,
                )

            def full_pass(*matrices):
                full = tf.stack(list(stats_lib.full_stats(regroup(matrices))))
                return tf.reshape(full, [-1]), tf.reduce_any(full[4] > 0.0)

            def finite_pass(sums, *matrices):
                finite = tf.stack(list(stats_lib.finite_stats(regroup(matrices), sums)))
                return tf.reshape(finite, [-1]), tf.constant(False)

            def settled(sums, *matrices):
                return stats_lib.settled_by_zeros(regroup(matrices), sums)

            def norms_only(sums):
                # a step not sampled keeps the l2 and the non-finite count only
                return (tf.concat([tf.sqrt(sums), tf.zeros([4 * count], tf.float32)], axis=0),
                        tf.constant(False))

            full_pass = self._branch(("full", dense_info), full_pass)
            finite_pass = self._branch(("finite", dense_info), finite_pass)
            settled = self._branch(("settled", dense_info), settled)
            matrices = [g.matrix for g in dense]

            def inexact_pass(sampled_step):
                # An inexact norm is mostly a zero one: a dead layer, and every layer
                # below it, have all-zero gradients on every step. Two reductions tell
                # them apart from a non-finite entry or an underflow, which need the
                # full pass (about fourteen passes over every gradient). Measured on
                # the MLP with a dead second layer, step A/B: 1.37x with the full
                # pass on every step.
                def exact():
                    if sampled_step is None:  # the lean step
                        return norms_only(squares)
                    return internals.cond(sampled_step, lambda: finite_pass(squares, *matrices),
                                          lambda: norms_only(squares))

                return internals.cond(settled(squares, *matrices), exact, lambda: full_pass(*matrices))

            # The full pass (max, mean, zeros, exact non-finite count) runs on a step
            # whose cheap norm is not exact (a non-finite entry makes the sum of
            # squares non-finite) and not only zeros. The window's sampled step
            # otherwise runs the finite pass: nothing to mask or rescale, a third of
            # the work; the other steps keep the sums of squares.
            # The conds are in the graph, not inside an XLA cluster: a conditional
            # there would take every gradient as an operand on every step.
            inexact = tf.reduce_any(stats_lib.needs_full_stats(squares))
            skipped = lambda: (tf.zeros([5 * count], tf.float32), tf.constant(False))  # noqa: E731
            if sampled is None:  # the lean step: never sampled
                full, nonfinite = internals.cond(inexact, lambda: inexact_pass(None), skipped)
            else:
                full, nonfinite = internals.cond(
                    sampled | inexact,
                    lambda: internals.cond(inexact, lambda: inexact_pass(sampled),
                                           lambda: finite_pass(squares, *matrices)),
                    skipped,
                )
            pieces += [squares, full]
            flags.append(nonfinite)
            columns = [p for _, pos in dense_info for p in pos]
            for j, position in enumerate(columns):
                index[0, position] = j
                index[1:, position] = count + np.arange(5) * count + j
            offset = 6 * count
        for g in sparse:
            # A sparse gradient's row count is data-dependent: its full statistics are
            # computed every step (it holds only the touched rows); a NaN sum of
            # squares makes the fold take them.
            m = len(g.positions)
            stats = tf.stack(list(stats_lib.full_stats(stats_lib.Groups((g,), None, m))))
            pieces += [tf.constant([float("nan")] * m), tf.reshape(stats, [-1])]
            flags.append(tf.reduce_any(stats[4] > 0.0))
            for t, position in enumerate(g.positions):
                index[:, position] = offset + np.arange(6) * m + t
            offset += 6 * m
        flat = tf.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]
        nonfinite_step = flags[0] if len(flags) == 1 else tf.reduce_any(tf.stack(flags))
        return flat, index, nonfinite_step

    @staticmethod
    def finish_stats(raw: tf.Tensor, inv_scale: tf.Tensor) -> tf.Tensor:
        """[5, n]: l2, nonfinite, max_abs, mean_abs, zero_frac from ``_raw_stats`` rows."""
        squares, full_l2, max_abs, mean_abs, zero_frac, nonfinite = tf.unstack(raw, num=6)
        l2 = tf.where(stats_lib.needs_full_stats(squares), full_l2, tf.sqrt(squares))
        return tf.stack([l2 * inv_scale, nonfinite, max_abs * inv_scale, mean_abs * inv_scale, zero_frac])

    def _fold_values(self, var_acc, global_acc, row, step, loss_prev):
        """The window accumulators and the loss totals with one step folded in (pure):
        the layer aggregation and every window statistic, from the step's ``_row``
        (its [_ROWS, V] values, then its scalars)."""
        width = _ROWS * self._num_vars
        spread, scalars = tf.reshape(row[:width], [_ROWS, self._num_vars]), row[width:]
        loss_a, loss_b, learning_rate, loss_scale, clip_threshold, skipped = tf.unstack(
            scalars, num=_SCALARS)
        step_loss, loss_state, loss_prev = self._step_loss(loss_a, loss_b, loss_prev)
        inv_scale = tf.where(tf.math.is_nan(loss_scale), 1.0, 1.0 / loss_scale)
        var_l2, var_nonfinite, var_max_abs, var_mean_abs, var_zero_frac = tf.unstack(
            self.finish_stats(spread[:_RAW], inv_scale), num=5)
        var_scale, var_fired, presence = tf.unstack(spread[_RAW:], num=3)
        var_present = presence > 0.5
        var_stats = stats_lib.GradStats(var_l2, var_max_abs, var_mean_abs, var_zero_frac, var_nonfinite)
        segment_ids = tf.constant(self._segment_ids, tf.int32)
        layer_stats, layer_present = stats_lib.layer_stats(
            var_stats, var_present, segment_ids, tf.constant(self._sizes, tf.float32), self._num_layers
        )
        columns = stats_lib.GradStats(
            *[tf.concat([var, lay], axis=0) for var, lay in zip(var_stats, layer_stats)]
        )
        global_l2 = stats_lib.global_norm(var_l2)
        nan = tf.constant(float("nan"))
        if self.clip is not None:
            post_l2 = var_l2 * var_scale
            layer_post = stats_lib.segment_norm(post_l2, segment_ids, self._num_layers)
            safe_layer = tf.where(layer_stats.l2 > 0.0, layer_stats.l2, 1.0)
            layer_scale = tf.where(layer_stats.l2 > 0.0, layer_post / safe_layer, 1.0)
            layer_fired = tf.math.unsorted_segment_max(var_fired, segment_ids, self._num_layers)
            clip_global = stats_lib.global_norm(post_l2)
            safe_global = tf.where(global_l2 > 0.0, global_l2, 1.0)
            clip_global_scale = tf.where(global_l2 > 0.0, clip_global / safe_global, 1.0)
            clip_any = tf.reduce_any(var_fired > 0.0)
        else:
            layer_scale = tf.ones([self._num_layers])
            layer_fired = tf.zeros([self._num_layers])
            clip_global, clip_global_scale, clip_any = nan, nan, tf.constant(False)
        nonfinite_step = tf.reduce_any(var_nonfinite > 0.0)
        new_var, new_global = self.window.fold_values(
            var_acc, global_acc,
            StepValues(
                l2=columns.l2,
                nonfinite=columns.nonfinite,
                max_abs=columns.max_abs,
                mean_abs=columns.mean_abs,
                zero_frac=columns.zero_frac,
                present=tf.concat([var_present, layer_present], axis=0),
                clip_scale=tf.concat([var_scale, layer_scale], axis=0),
                clip_fired=tf.concat([var_fired, layer_fired], axis=0),
            ),
            StepGlobals(
                step=step,
                global_l2=global_l2,
                nonfinite_step=nonfinite_step,
                skipped=skipped > 0.5,
                loss=step_loss,
                learning_rate=learning_rate,
                loss_scale=loss_scale,
                clip_l2=clip_global,
                clip_scale=clip_global_scale,
                clip_fired=clip_any,
                clip_threshold=clip_threshold,
                loss_state=loss_state,
            ),
        )
        return new_var, new_global, loss_prev

    def _clip(self, stat_grads, slots, l2, nonfinite, context, replica_context):
        """Clips the (global, unscaled) gradients; returns what the optimizer gets."""
        scale = context.loss_scale
        unscaled = stat_grads if scale is None else [clip_lib._scale(g, 1.0 / scale) for g in stat_grads]
        # The norms were just measured: norm-based transforms need no second pass.
        result = self.clip(
            unscaled, [self._variables[slot] for slot in slots], clip_lib.Norms(l2, nonfinite == 0.0)
        )
        post_l2 = result.post_norms
        if post_l2 is None:
            post_l2 = stats_lib.exact_norms(stats_lib.group_gradients(result.grads))
        ratio = tf.where(l2 > 0.0, post_l2 / tf.where(l2 > 0.0, l2, 1.0), 1.0)
        ratio = tf.where(tf.math.is_finite(ratio), ratio, 1.0)
        fired = tf.cast(ratio < 1.0 - 1e-6, tf.float32)
        # Back to what the optimizer expects, in one multiply: re-scaled by the loss
        # scale, and under several replicas each replica's share of the clipped
        # global gradient (the optimizer sums the replicas' gradients again).
        factor = scale
        if replica_context is not None:
            share = tf.constant(1.0 / replica_context.num_replicas_in_sync)
            factor = share if factor is None else factor * share
        handed = result.grads
        if factor is not None:
            handed = [clip_lib._scale(g, factor) for g in handed]
        return handed, tf.minimum(ratio, 1.0), fired, result.threshold

    @staticmethod
    def _step_number(state: Sequence[tf.Tensor], iterations: tf.Tensor | None) -> tf.Tensor:
        """This step's number: one after the last, or after the optimizer's
        iterations when a resync is pending and they moved since the last fit."""
        current = state[_STEP]
        if iterations is not None:
            iterations = tf.cast(iterations, tf.int64)
            take_iterations = (state[_RESYNC] > 0) & tf.not_equal(iterations, state[_ITERATIONS_AT_END])
            current = tf.where(take_iterations, iterations, current)
        return current + 1

    @staticmethod
    def _loss_pair(context: StepContext) -> tf.Tensor:
        """[2] float32, what a step records of its loss: (mean loss, _LOSS_GIVEN), the
        loss tracker's (total, count), or (NaN, _LOSS_UNKNOWN). Two reads of the
        tracker and no arithmetic: the step's loss is worked out when it is folded."""
        if context.loss is not None:
            return tf.stack([tf.cast(tf.reduce_mean(context.loss), tf.float32),
                             tf.constant(_LOSS_GIVEN)])
        if context.loss_totals is not None:
            return tf.stack([tf.cast(value, tf.float32) for value in context.loss_totals])
        return tf.constant([float("nan"), _LOSS_UNKNOWN])

    @staticmethod
    def _step_loss(loss_a: tf.Tensor, loss_b: tf.Tensor, loss_prev: tf.Tensor
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(loss, state, totals) of a folded step from its ``_loss_pair`` and the totals
        at the step before: the step's mean loss (NaN when unknown), 1.0 when it is
        known and non-finite, 0.0 when finite, -1.0 when unknown, and the new totals."""
        f64 = tf.float64
        a, b = tf.cast(loss_a, f64), tf.cast(loss_b, f64)
        previous_total, previous_count = tf.unstack(loss_prev, num=2)
        tracked = b >= 0.0
        # The tracker is reset at every epoch start and its count grows with every
        # step (by the batch size): a count that did not grow is a fresh start.
        was_reset = b <= previous_count
        delta_total = tf.where(was_reset, a, a - previous_total)
        delta_count = tf.where(was_reset, b, b - previous_count)
        counted = tracked & (delta_count > 0.0)
        nan = tf.constant(float("nan"), f64)
        loss = tf.where(counted, delta_total / tf.where(counted, delta_count, 1.0),
                        tf.where(tf.equal(b, _LOSS_GIVEN), a, nan))
        known = counted | tf.equal(b, _LOSS_GIVEN)
        state = tf.where(known, tf.where(tf.math.is_finite(loss), 0.0, 1.0), -1.0)
        totals = tf.where(tracked, tf.stack([a, b]), loss_prev)
        return loss, tf.cast(state, f64), totals

    # --------------------------------------------------------------- host

    def open_sinks(self) -> None:
        if self._sink is None and self.options.writes and self.chief:
            # A second fit with the same monitor continues the files it wrote.
            append = self.options.append or self._sinks_opened
            self._sink = CsvSink(self.options.log_dir, append=append)
            run_json = self.run_json()
            self._sink.open(run_json)
            # TensorBoard events: a writer is created at the first window (a new
            # events file per session; readers let the later write of a step win).
            self._tb_sink = TensorBoardSink(
                self.options.log_dir, run_json, [layer.name for layer in self.topology.layers]
            )
            self._sinks_opened = True
            self._writer = _Writer()

    def run_json(self) -> dict[str, Any]:
        import keras

        from gradwatch import __version__

        info = {
            "gradwatch_version": __version__,
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "options": self.options.to_json(),
        }
        info.update(self.run_info)
        info.update(self.topology.to_json() if self.topology is not None else {})
        return info

    def read(self, fallback_loss: float | None = None) -> dict[str, Any] | None:
        """Reads and resets the window; writes its rows. Returns the window row, or
        None (no step since the last read, or the window handed to the writer thread).

        With ``defer_reads`` (``GradientMonitor``) and files to write, a window with
        no non-finite step is interpreted (rows, detectors, alerts) on the writer
        thread, in order with the writes: ~2 ms of host work per read on the MLP and
        ~25 ms on the 100-layer net that training no longer waits for. A window with
        a non-finite step is interpreted at once: ``on_nonfinite`` acts on it.
        ``acted_alerts`` holds the alerts of a read interpreted at once."""
        self.acted_alerts = []
        self.last_read_steps = 0
        if self.window is None:
            return None
        # one call, one transfer: the buffered steps folded, the window and every
        # probe's state read, and what a read consumes reset
        fetched = tf.nest.map_structure(lambda t: t.numpy(), self._read_all_fn())
        per_var, glob = self.window.interpret(fetched["window"])
        if glob["steps"] <= 0:
            return None
        # activation-based counts, where a layer has them (its own variables: read now)
        by_activation = (self.activations.read(self.options.thresholds.dead_steps)
                         if self.activations is not None else None)
        self.steps_seen += int(glob["steps"])
        self.last_step = int(glob["last_step"])
        self.last_read_steps = int(glob["steps"])
        if self.defer_reads and self._writer is not None and glob["nonfinite_steps"] == 0:
            self._writer.submit(self._interpret, fetched, per_var, glob, by_activation, fallback_loss, True)
            return None
        if self._writer is not None:
            self._writer.flush()  # the detectors' state follows the windows in order
        return self._interpret(fetched, per_var, glob, by_activation, fallback_loss, False)

    def _interpret(self, fetched, per_var, glob, by_activation, fallback_loss, on_writer: bool
                   ) -> dict[str, Any]:
        """A read's rows, detectors and alerts from its fetched values; its files
        written (directly on the writer thread, else handed to it)."""
        num_vars = len(self.topology.variables)
        dead, no_signal = self.units.interpret(fetched["units"], self.options.thresholds.dead_steps)
        if by_activation is not None:
            dead = np.where(np.isnan(by_activation), dead, by_activation)
        per_var["dead_frac"] = np.concatenate([np.full(num_vars, np.nan), dead])
        per_var["no_signal_frac"] = np.concatenate([np.full(num_vars, np.nan), no_signal])
        if self.updates is not None:
            per_var["update_ratio"], per_var["update_cos"] = self.updates.interpret(fetched["updates"])
        histograms = self.histograms.interpret(fetched["histograms"]) if self.histograms is not None else []
        window_row, stats_rows, layer_rows = rows_lib.build_rows(
            per_var, glob, self.topology, clipping=self.clip is not None
        )
        if not math.isfinite(window_row["loss"]) and fallback_loss is not None:
            window_row["loss"] = float(fallback_loss)
        alerts = detectors_lib.detect(
            layer_rows, self.topology, self._detector_state, self.options.thresholds, stats_rows
        )
        alerts = self._alerts(window_row, per_var, stats_rows) + alerts
        self.last_window = window_row
        self.last_alerts = alerts
        if not on_writer:
            self.acted_alerts = alerts
        if self._sink is not None:
            first_step = int(glob["last_step"]) - int(glob["steps"]) + 1
            # a copy: the caller may change window_row
            args = (dict(window_row), stats_rows, layer_rows, [a.to_row() for a in alerts], first_step,
                    histograms or None)
            if on_writer:
                self._write_window(*args)
            else:
                self._writer.submit(self._write_window, *args)
        for alert in alerts:
            level = {"info": logging.INFO, "warning": logging.WARNING}.get(alert.severity, logging.ERROR)
            logger.log(level, "gradwatch %s at step %d: %s", alert.kind, alert.step, alert.message)
            if self.on_alert is not None:
                self.on_alert(alert.to_row())
        return window_row

    def _write_window(self, window_row, stats_rows, layer_rows, alert_rows, first_step, histograms):
        """On the writer thread: one window to the CSV files and the TensorBoard events."""
        self._sink.write(window_row, stats_rows, layer_rows, first_step)
        self._sink.write_alerts(alert_rows)
        self._tb_sink.write_window(window_row, stats_rows, layer_rows, alert_rows, first_step, histograms)

    def _alerts(self, window_row, per_var, stats_rows) -> list[alerts_lib.Alert]:
        alerts = []
        nonfinite = alerts_lib.nonfinite_alert(
            window_row,
            per_var["nonfinite_at_first"],
            self.topology,
            loss_scale_optimizer=bool(self.run_info.get("optimizer", {}).get("loss_scale_optimizer")),
        )
        if nonfinite is None or nonfinite.severity != "info":
            # error rows follow the alert life cycle (no storm while training stays NaN);
            # loss-scale overflow info rows are reported as they come
            alerts += detectors_lib.track_alert(
                self._detector_state, self.options.thresholds, nonfinite, "nonfinite_gradient"
            )
        else:
            alerts.append(nonfinite)
        for row in stats_rows:
            if row["grad_steps"] == 0 and row["variable"] not in self._no_gradient_reported:
                self._no_gradient_reported.add(row["variable"])
                alerts.append(
                    alerts_lib.Alert(
                        window_row["step"], row["layer"], row["variable"], "no_gradient", "warning",
                        0.0, 0.0,
                        f"Variable {row['variable']!r} got no gradient (None): it is trainable but "
                        "disconnected from the loss.",
                        alerts_lib.HINTS["no_gradient"],
                    )
                )
        return alerts

    def close(self) -> None:
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()  # the windows still queued are written first
        finally:
            self._close_sinks()
        self.closed = True

    def _close_sinks(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._tb_sink is not None:
            self._tb_sink.close()
            self._tb_sink = None

