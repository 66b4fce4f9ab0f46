"""The engine both fronts share: in-graph capture into window accumulators,
host reads every ``log_every`` steps, rows to the sinks.

``GradientMonitor`` (model.fit) and ``Watch`` (custom loops) are thin fronts:
they decide *when* ``observe`` runs in-graph and *when* ``read`` runs on the
host, and hand over what only they know (loss, learning rate, loss scale,
optimizer iterations).
"""

from __future__ import annotations

import contextlib
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

# Indices into the engine's int64 step state.
# (index 0 holds the last step number)
_RESYNC, _ITERATIONS_AT_END = 1, 2


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
    """

    def __init__(self, options: Options, run_info: dict[str, Any] | None = None):
        self.options = options
        self.run_info = dict(run_info or {})
        self.clip = clip_lib.as_clip(options.clip)
        self.topology: Topology | None = None
        self.window: Window | None = None
        self._index: dict[int, int] = {}
        self._state: tf.Variable | None = None
        self._loss_state: tf.Variable | None = None
        self._sink: CsvSink | None = None
        self._tb_sink: TensorBoardSink | None = None
        self.chief = True
        self._sinks_opened = False
        self.steps_seen = 0
        self.last_window: dict[str, Any] | None = None
        self.closed = False
        self.last_finite: tf.Tensor | None = None
        self.last_alerts: list[alerts_lib.Alert] = []
        self.units = self.updates = self.histograms = None
        self.activations: probes_lib.ActivationProbe | None = None  # set by GradientMonitor
        self.on_alert = None
        self._no_gradient_reported: set[str] = set()
        self._compiled_fns: dict[Any, Any] = {}
        self._detector_state = detectors_lib.DetectorState()
        # XLA for the small-tensor work of each step (see _compiled).
        self._jit = os.environ.get("GRADWATCH_JIT", "1") != "0"

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
            np.array([start_step, 0, -1], np.int64), "gradwatch_step_state", strategy
        )
        _off = os.environ.get("GRADWATCH_EXPERIMENT_OFF", "")  # TEMP experiment
        self._jit = os.environ.get("GRADWATCH_JIT", "1") != "0"  # TEMP experiment
        self.units = probes_lib.UnitProbe(topology, strategy)
        # Probes that write under a tf.cond cannot run under several replicas
        # (a mirrored write is a merge_call, which a cond branch cannot hold).
        single = strategy is None or strategy.num_replicas_in_sync <= 1
        self.updates = probes_lib.UpdateProbe(variables, topology, strategy) if single and "updates" not in _off else None
        self.histograms = (
            probes_lib.HistogramProbe(topology, self.options.histogram_every,
                                      self.options.signed_histograms, strategy)
            if single and self.options.histogram_every > 0 and "hist" not in _off else None
        )
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with tf.init_scope(), scope:
            # Each replica remembers its own loss-tracker totals (the tracker is
            # per replica), so this one is synchronised on read.
            self._loss_state = tf.Variable(
                np.zeros(2, np.float64),
                name="gradwatch_loss_state",
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )

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
        """``observe`` with the variables already resolved to accumulator columns."""
        context = context or StepContext()
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        present_grads = [grads[i] for i in present]

        loss_delta = self._loss_delta(context)
        replica_context = internals.replicas_to_reduce()
        if replica_context is not None and present_grads:
            # Stats are of the global gradient: what the optimizer will apply
            # after its own all-reduce, not this replica's share.
            stat_grads = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, present_grads)
            if loss_delta is not None:
                loss_delta = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, loss_delta)
        else:
            stat_grads = present_grads

        num_present = len(present)
        if num_present:
            stacked = self._present_stats(stat_grads, context.loss_scale)
            l2 = stacked[0]
            clip_scale, clip_fired = tf.ones_like(l2), tf.zeros_like(l2)
            clip_threshold = tf.constant(float("nan"))
            if self.clip is not None:
                clipped, clip_scale, clip_fired, clip_threshold = self._clip(
                    stat_grads, [slots[i] for i in present], l2, stacked[1], context, replica_context
                )
                for k, i in enumerate(present):
                    grads[i] = clipped[k]
            stacked = tf.concat([stacked, tf.stack([clip_scale, clip_fired])], axis=0)
            by_slot = {slots[i]: stat_grads[k] for k, i in enumerate(present)}
            self._run_probes(by_slot, context)
        else:
            stacked = tf.zeros([7, 0], tf.float32)
            clip_threshold = tf.constant(float("nan"))
        # Spread the present gradients' values over all watched variables.
        perm = [num_present] * len(self._index)
        for k, i in enumerate(present):
            perm[slots[i]] = k
        nan = tf.constant(float("nan"))
        step_loss, loss_state = self._step_loss(context, loss_delta)
        scalars = tf.stack(
            [
                tf.cast(step_loss, tf.float32),
                tf.cast(loss_state, tf.float32),
                tf.cast(context.learning_rate, tf.float32) if context.learning_rate is not None else nan,
                tf.cast(context.loss_scale, tf.float32) if context.loss_scale is not None else nan,
                tf.cast(clip_threshold, tf.float32),
            ]
        )
        # loss is folded in float64 from here on; float32 is exact enough for a mean loss.
        iterations = (
            tf.cast(context.iterations, tf.int64) if context.iterations is not None
            else tf.constant(-1, tf.int64)
        )
        fold = self._compiled(
            ("fold", tuple(perm), context.overflow_skips, context.iterations is not None),
            lambda stacked, scalars, iterations: self._fold_step(
                stacked, scalars, iterations, perm, context.overflow_skips,
                context.iterations is not None,
            ),
        )
        self.last_finite = fold(stacked, scalars, iterations)
        return grads

    def _run_probes(self, by_slot: dict[int, Any], context: StepContext) -> None:
        """Dead units every step; update and histogram probes on their sampled steps."""
        window_start = self.window.is_empty()
        next_step = self._state[0] + 1
        if "units" not in os.environ.get("GRADWATCH_EXPERIMENT_OFF", ""):  # TEMP
            self.units.observe(by_slot, window_start)
        if self.updates is not None:
            # a weight snapshot every UPDATE_EVERY steps (steps 1, 51, 101, ...), not every window
            due = tf.equal(tf.math.floormod(next_step - 1, probes_lib.UPDATE_EVERY), 0)
            self.updates.observe(by_slot, due)
        if self.histograms is not None:
            inv_scale = (
                1.0 / tf.cast(context.loss_scale, tf.float32) if context.loss_scale is not None
                else tf.constant(1.0)
            )
            self.histograms.observe(by_slot, next_step, inv_scale)

    def _compiled(self, key, fn):
        """``fn`` as one XLA cluster (a handful of launches instead of ~200 small
        ops per step), cached per static key; plain graph under several replicas."""
        if internals.replicas_to_reduce() is not None or not self._jit:
            # Mirrored variables are written through merge_call, which a nested
            # tf.function cannot hold: inline under several replicas.
            return fn
        cached = self._compiled_fns.get(key)
        if cached is None:
            cached = tf.function(fn, jit_compile=True, autograph=False)
            self._compiled_fns[key] = cached
        return cached

    def _present_stats(self, stat_grads, loss_scale) -> tf.Tensor:
        """[5, n] float32: l2, nonfinite, max_abs, mean_abs, zero_frac of each gradient."""
        groups = stats_lib.group_gradients(stat_grads)
        dense = [g for g in groups.groups if g.matrix.shape.is_fully_defined()]
        sparse = [g for g in groups.groups if not g.matrix.shape.is_fully_defined()]
        # The sum of squares is one Eigen pass (faster than XLA's CPU reduction).
        sum_sq = tuple(stats_lib.group_sum_of_squares(g) for g in dense)
        # Sparse gradients have a data-dependent row count: their full stats are
        # computed here, every step (they hold only the touched rows).
        sparse_stats = tuple(tf.stack(list(stats_lib.full_stats(stats_lib.Groups(
            (g,), None, len(g.positions))))) for g in sparse)
        dense_info = tuple((g.dense_size, g.positions) for g in dense)
        inverse = groups.inverse  # group_gradients puts dense groups before sparse ones
        inv_scale = (1.0 / loss_scale) if loss_scale is not None else tf.constant(1.0)

        parts = []
        if dense:
            squares = tf.concat(sum_sq, axis=0) if len(sum_sq) > 1 else sum_sq[0]
            inexact = stats_lib.needs_full_stats(squares)
            count = sum(len(pos) for _, pos in dense_info)

            def full_pass(*matrices):
                return tf.stack(list(stats_lib.full_stats(stats_lib.Groups(
                    tuple(stats_lib.Group(m, size, pos) for m, (size, pos) in zip(matrices, dense_info)),
                    None, count,
                ))))

            full_pass = self._compiled(("full", dense_info), full_pass)
            # The full pass (max, mean, zeros, exact non-finite count) runs on the
            # window's sampled step, and on any step whose cheap norm is not exact.
            # The cond is in the graph, not inside an XLA cluster: a conditional there
            # would take every gradient as an operand on every step.
            full = tf.cond(
                self.window.is_empty() | tf.reduce_any(inexact),
                lambda: full_pass(*[g.matrix for g in dense]),
                lambda: tf.zeros([5, count], tf.float32),
            )
            parts.append((squares, inexact, full))

        def finish(dense_parts, sparse_stats, inv_scale):
            joined = []
            for squares, inexact, full in dense_parts:
                l2 = tf.where(inexact, full[0], tf.sqrt(squares))
                joined.append(tf.stack([l2, full[1], full[2], full[3], full[4]]))
            joined.extend(sparse_stats)
            joined = tf.concat(joined, axis=1) if len(joined) > 1 else joined[0]
            if inverse is not None:
                joined = tf.gather(joined, tf.constant(inverse, tf.int32), axis=1)
            l2, max_abs, mean_abs, zero_frac, nonfinite = tf.unstack(joined, num=5)
            return tf.stack(
                [l2 * inv_scale, nonfinite, max_abs * inv_scale, mean_abs * inv_scale, zero_frac]
            )

        key = ("stats", dense_info, tuple(g.positions for g in sparse), inverse)
        return self._compiled(key, finish)(tuple(parts), sparse_stats, tf.cast(inv_scale, tf.float32))

    def _fold_step(self, stacked, scalars, iterations, perm, skips, has_iterations):
        """Everything after the big-tensor passes, on [7, n] per-gradient values."""
        num_present = int(stacked.shape[1])
        padded = tf.concat([stacked, tf.zeros([7, 1], tf.float32)], axis=1)
        (
            var_l2, var_nonfinite, var_max_abs, var_mean_abs, var_zero_frac, var_scale, var_fired
        ) = tf.unstack(tf.gather(padded, tf.constant(perm, tf.int32), axis=1), num=7)
        var_present = tf.constant([p < num_present for p in perm])
        var_stats = stats_lib.GradStats(var_l2, var_max_abs, var_mean_abs, var_zero_frac, var_nonfinite)
        segment_ids = tf.constant(self._segment_ids, tf.int32)
        layer_stats, layer_present = stats_lib.layer_stats(
            var_stats, var_present, segment_ids, tf.constant(self._sizes, tf.float32), self._num_layers
        )
        columns = stats_lib.GradStats(
            *[tf.concat([var, lay], axis=0) for var, lay in zip(var_stats, layer_stats)]
        )
        global_l2 = stats_lib.global_norm(var_l2)
        step_loss, loss_state, learning_rate, loss_scale, clip_threshold = tf.unstack(scalars, num=5)
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
        skipped = nonfinite_step if skips else tf.constant(False)
        self.window.fold(
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
                step=self._next_step(iterations if has_iterations else None),
                global_l2=global_l2,
                nonfinite_step=nonfinite_step,
                skipped=skipped,
                loss=step_loss,
                learning_rate=learning_rate,
                loss_scale=loss_scale,
                clip_l2=clip_global,
                clip_scale=clip_global_scale,
                clip_fired=clip_any,
                clip_threshold=clip_threshold,
                loss_state=loss_state,
            ),
            self.window.is_empty(),
        )
        return tf.logical_not(nonfinite_step)

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

    def _next_step(self, iterations: tf.Tensor | None) -> tf.Tensor:
        state = self._state.read_value()
        current, resync, iterations_at_end = tf.unstack(state, num=3)
        if iterations is not None:
            iterations = tf.cast(iterations, tf.int64)
            take_iterations = (resync > 0) & tf.not_equal(iterations, iterations_at_end)
            base = tf.where(take_iterations, iterations, current)
        else:
            base = current
        step = base + 1
        self._state.assign(tf.stack([step, tf.zeros_like(resync), iterations_at_end]))
        return step

    def _loss_delta(self, context: StepContext) -> tf.Tensor | None:
        """[delta total, delta count] of the loss tracker since the previous step."""
        if context.loss_totals is None:
            return None
        total, count = context.loss_totals
        previous_total, previous_count = tf.unstack(self._loss_state.read_value(), num=2)
        # The tracker is reset at every epoch start: then the delta is the total.
        was_reset = count < previous_count
        delta_total = tf.where(was_reset, total, total - previous_total)
        delta_count = tf.where(was_reset, count, count - previous_count)
        self._loss_state.assign(tf.stack([total, count]))
        return tf.stack([delta_total, delta_count])

    @staticmethod
    def _step_loss(context: StepContext, loss_delta: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """(loss, state): the step's mean loss (NaN when unknown) and 1.0 when it is
        known and non-finite, 0.0 when finite, -1.0 when unknown."""
        nan = tf.constant(float("nan"), tf.float64)
        if context.loss is not None:
            loss = tf.cast(tf.reduce_mean(context.loss), tf.float64)
            known = tf.constant(True)
        elif loss_delta is not None:
            delta_total, delta_count = tf.unstack(loss_delta, num=2)
            known = delta_count > 0
            loss = tf.where(known, delta_total / tf.where(known, delta_count, 1.0), nan)
        else:
            return nan, tf.constant(-1.0, tf.float64)
        state = tf.where(known, tf.where(tf.math.is_finite(loss), 0.0, 1.0), -1.0)
        return loss, tf.cast(state, tf.float64)

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
        """Reads and resets the window; writes its rows. Returns the window row (or None)."""
        if self.window is None:
            return None
        per_var, glob = self.window.read_and_reset()
        if glob["steps"] <= 0:
            return None
        num_vars = len(self.topology.variables)
        dead, no_signal = self.units.read(self.options.thresholds.dead_steps)
        if self.activations is not None:
            # activation-based counts, where a layer has them, take precedence
            by_activation = self.activations.read(self.options.thresholds.dead_steps)
            dead = np.where(np.isnan(by_activation), dead, by_activation)
        per_var["dead_frac"] = np.concatenate([np.full(num_vars, np.nan), dead])
        per_var["no_signal_frac"] = np.concatenate([np.full(num_vars, np.nan), no_signal])
        if self.updates is not None:
            per_var["update_ratio"], per_var["update_cos"] = self.updates.read()
        histograms = self.histograms.read() if self.histograms is not None else []
        window_row, stats_rows, layer_rows = rows_lib.build_rows(
            per_var, glob, self.topology, clipping=self.clip is not None
        )
        if not math.isfinite(window_row["loss"]) and fallback_loss is not None:
            window_row["loss"] = float(fallback_loss)
        self.steps_seen += int(glob["steps"])
        self.last_window = window_row
        alerts = detectors_lib.detect(
            layer_rows, self.topology, self._detector_state, self.options.thresholds, stats_rows
        )
        alerts = self._alerts(window_row, per_var, stats_rows) + alerts
        self.last_alerts = alerts
        if self._sink is not None:
            first_step = int(glob["last_step"]) - int(glob["steps"]) + 1
            alert_rows = [a.to_row() for a in alerts]
            self._sink.write(window_row, stats_rows, layer_rows, first_step)
            self._sink.write_alerts(alert_rows)
            self._tb_sink.write_window(
                window_row, stats_rows, layer_rows, alert_rows, first_step, histograms or None
            )
        for alert in alerts:
            level = {"info": logging.INFO, "warning": logging.WARNING}.get(alert.severity, logging.ERROR)
            logger.log(level, "gradwatch %s at step %d: %s", alert.kind, alert.step, alert.message)
            if self.on_alert is not None:
                self.on_alert(alert.to_row())
        return window_row

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
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._tb_sink is not None:
            self._tb_sink.close()
            self._tb_sink = None
        self.closed = True

