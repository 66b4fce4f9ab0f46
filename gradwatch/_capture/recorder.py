"""The recorder: every step's gradients measured in-graph into the window, and one
host read per window (a ``PendingRead``, folded into a ``FetchedWindow`` of numpy values)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from gradwatch._capture import keras_internals as internals
from gradwatch._capture import probes as probes_lib
from gradwatch._capture.accumulate import StepBuffer, StepFolder, buffer_capacity, loss_pair
from gradwatch._capture.array_ops import graph_constant as const
from gradwatch._capture.clipping import clip_measured
from gradwatch._capture.layouts import RAW_STATS, STEP_STATE, StepRow
from gradwatch._capture.measure import finish_stats, gradient_groups, measure_gradients
from gradwatch._capture.window import Window
from gradwatch._interpret.results import FetchedWindow
from gradwatch._options import Options
from gradwatch._topology import Topology


class StepContext(NamedTuple):
    """What a front knows about the current step, in-graph (all optional).

    Attributes:
        loss: the step's loss.
        learning_rate: the optimizer's learning rate.
        loss_scale: a ``LossScaleOptimizer``'s scale (gradients arrive scaled by it).
        loss_totals: (total, count) of a running loss tracker; the step's loss is the delta.
        overflow_skips: True when a non-finite gradient makes the optimizer skip the update.
    """

    loss: tf.Tensor | None = None
    learning_rate: tf.Tensor | None = None
    loss_scale: tf.Tensor | None = None
    loss_totals: tuple[tf.Tensor, tf.Tensor] | None = None
    overflow_skips: bool = False


class StepResult(NamedTuple):
    """What ``Recorder.observe`` returns: the gradients to apply and whether they were finite."""

    grads: list[Any]
    finite: tf.Tensor


class Recorder:
    """In-graph capture for one run: binds to the variables, observes every step, reads windows.

    Args:
        options: the front's validated options.
        host_update_snapshots: the front takes the update probe's weight snapshots on
            the host (``snapshot_weights``) and calls ``after_update`` after the update.
        front_ends_steps: the front calls ``end_step`` after each step (one replica): every
            ``observe`` until then is the same step (several optimizers, or one applied several
            times), with ``end_step``'s loss. False: each ``observe`` is a step (Keras's own).
    """

    def __init__(self, options: Options, host_update_snapshots: bool = False, front_ends_steps: bool = False):
        self._options = options
        self._ends_steps = bool(front_ends_steps)
        self._clip = options.clip  # already a Clip (Options validated it)
        self._host_snapshots = bool(host_update_snapshots)
        self.topology: Topology | None = None
        self.chief = True
        self._activations: probes_lib.ActivationProbe | None = None

    @property
    def bound(self) -> bool:
        """Returns whether ``bind`` ran."""
        return self.topology is not None

    @property
    def clipping(self) -> bool:
        """Returns whether the recorder clips the gradients it hands back."""
        return self._clip is not None

    def bind(self, topology: Topology, variables: Sequence[Any], strategy: Any = None,
             start_step: int = 0, activation_layers: Sequence[tuple[Any, str]] | None = None) -> None:
        """Creates the recorder's variables for these model variables (host side).

        Args:
            topology: the run's topology, one variable info per variable.
            variables: the watched variables, in the order of ``topology.variables``.
            strategy: the ``tf.distribute`` strategy the steps run under, if any.
            start_step: the step before the first observed step.
            activation_layers: (layer, reporting layer) pairs to count dead units from
                activations (``GradientMonitor(activation_probe=True)``).
        """
        self.topology = topology
        self.chief = internals.is_chief(strategy)  # only the chief writes
        self._slot_of = {internals.variable_key(v): i for i, v in enumerate(variables)}
        self._variables = list(variables)
        if self._clip is not None:
            self._clip.build(strategy)
        num_vars = len(variables)
        self._row = StepRow(num_vars)
        self.window = Window(num_vars + len(topology.layers), strategy)
        initial = {name: 0 for name in STEP_STATE.names}
        initial.update(step=start_step, step_row=-1)
        self._state = internals.replica_variable(
            np.array([initial[name] for name in STEP_STATE.names], np.int64), "gradwatch_step_state",
            strategy)
        folder = StepFolder(topology, self.window, clipping=self._clip is not None)
        self.buffer = StepBuffer(folder, self.window, num_vars, buffer_capacity(self._options.log_every),
                                 strategy)
        self._read_fn = internals.HostFunction(self._read_all)
        self._probes: list[probes_lib.Probe] = [probes_lib.UnitProbe(topology, strategy)]
        self._updates = None
        # probes that write under a tf.cond cannot run under several replicas
        if self.buffer.buffered:
            self._updates = probes_lib.UpdateProbe(variables, topology, strategy, self._host_snapshots)
            self._probes.append(self._updates)
            if self._options.histogram_every > 0:
                self._probes.append(probes_lib.HistogramProbe(
                    topology, self._options.histogram_every, self._options.signed_histograms, strategy))
        if activation_layers is not None:
            self._activations = probes_lib.ActivationProbe(topology, activation_layers, strategy)

    def slots_of(self, grads: Sequence[Any], variables: Sequence[Any]) -> tuple[int, ...]:
        """Returns the accumulator column of each variable (host side, before any trace).

        Raises:
            ValueError: the lengths differ, or a variable is not watched.
        """
        if len(grads) != len(variables):
            raise ValueError(
                f"observe() got {len(grads)} gradients for {len(variables)} variables; "
                "pass the list returned by tape.gradient(loss, variables) with the same variables.")
        slots = []
        for var in variables:
            slot = self._slot_of.get(internals.variable_key(var))
            if slot is None:
                raise ValueError(
                    f"observe() got variable {internals.variable_path(var)!r}, which is not among "
                    f"the {len(self._slot_of)} variables this run watches (fixed at the first "
                    "step). Pass the same variables every step.")
            slots.append(slot)
        return tuple(slots)

    def watches(self, variable: Any) -> bool:
        """Returns whether ``variable`` is watched."""
        return internals.variable_key(variable) in self._slot_of

    @tf.autograph.experimental.do_not_convert
    def observe(self, grads: Sequence[Any], slots: Sequence[int], context: StepContext | None = None,
                lean: bool = False, fold_when_full: bool = True) -> StepResult:
        """Records one step's gradients, in-graph; returns the gradients to apply.

        Args:
            grads: the gradients (``None`` for a variable without one).
            slots: ``slots_of(grads, variables)``.
            context: what the front knows about the step.
            lean: trace the lean step, which holds none of the conditional work of a
                sampled step (the window's first step, histogram steps, the update
                measure, a full buffer); a front runs it only on steps it knows hold
                none of that, and reads at least every ``capacity`` steps.
            fold_when_full: False: the front reads before the buffer fills (no fold traced).

        Its ops are named under ``gradwatch/`` (a profile or an XLA dump tells them from
        the model's), each probe's under ``gradwatch/<probe>/``.
        """
        with tf.name_scope("gradwatch"):
            return self._observe(grads, slots, context, lean, fold_when_full)

    def _observe(self, grads: Sequence[Any], slots: Sequence[int], context: StepContext | None = None,
                lean: bool = False, fold_when_full: bool = True) -> StepResult:
        context = context or StepContext()
        grads = [_with_static_shape(g, self._variables[slot]) for g, slot in zip(grads, slots)]
        present = [i for i, g in enumerate(grads) if g is not None]
        # where the front ends its steps, their loss comes with end_step
        pair = loss_pair(context.loss, None if self._ends_steps else context.loss_totals)
        replica_context = internals.replicas_to_reduce()
        stat_grads = [grads[i] for i in present]
        if replica_context is not None:
            # stats of the global gradient: what the optimizer applies after its all-reduce
            if stat_grads:
                stat_grads = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, stat_grads)
            if context.loss is None and context.loss_totals is not None:
                pair = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, pair)
        state = STEP_STATE.unpack(self._state.read_value())
        # a further observation in a step the front has not ended keeps its number
        new_step = (tf.equal(state["in_step"], const(0, tf.int64)) if self._ends_steps
                    else const(True, tf.bool))
        step = tf.where(new_step, state["step"] + const(1, tf.int64), state["step"])
        window_steps = state["window_steps"] + tf.cast(new_step, tf.int64)
        sampled = None if lean else tf.equal(window_steps, 1)
        measured = self._measure(grads, stat_grads, [slots[i] for i in present], present, step, sampled,
                                 context, replica_context)
        flat, index, nonfinite_step, clip_threshold = measured
        skipped = nonfinite_step if context.overflow_skips else const(False, tf.bool)
        nan = const(float("nan"))
        scalars = {"loss_a": pair[0], "loss_b": pair[1],
                   "learning_rate": nan if context.learning_rate is None
                   else tf.cast(context.learning_rate, tf.float32),
                   "loss_scale": nan if context.loss_scale is None
                   else tf.cast(context.loss_scale, tf.float32),
                   "clip_threshold": tf.cast(clip_threshold, tf.float32),
                   "skipped": tf.cast(skipped, tf.float32), "new_step": tf.cast(new_step, tf.float32)}
        row = self._row.build(flat, index, [slots[i] for i in present], scalars)
        buffered, done = self.buffer.add(row, step, state["buffered"],
                                         fold_if_full=fold_when_full and not lean)
        step_row = state["step_row"]
        if self._ends_steps:  # the buffer row that takes the step's loss at end_step (-1: folded)
            step_row = tf.where(tf.equal(buffered, const(0, tf.int64)), const(-1, tf.int64),
                                tf.where(new_step, state["buffered"], step_row))
        with tf.control_dependencies([done]):
            self._state.assign(STEP_STATE.pack({
                "step": step, "buffered": buffered,
                "window_steps": window_steps,
                "nonfinite": tf.maximum(state["nonfinite"], tf.cast(nonfinite_step, tf.int64)),
                "in_step": const(int(self._ends_steps), tf.int64), "step_row": step_row}))
        return StepResult(grads, tf.logical_not(nonfinite_step))

    @tf.autograph.experimental.do_not_convert
    def end_step(self, loss_totals: tuple[tf.Tensor, tf.Tensor] | None) -> None:
        """In-graph, after a step (``front_ends_steps``): the next ``observe`` starts
        a new step, and this step's row takes the loss tracker's totals, read now that
        the step has updated them.

        Args:
            loss_totals: (total, count) of the model's loss tracker, if it has one.
        """
        if not self._ends_steps:  # each observe is a step, with its context's loss
            return
        state = STEP_STATE.unpack(self._state.read_value())
        written = tf.constant(0, tf.int64)
        if loss_totals is not None:
            written = self.buffer.set_loss(state["step_row"], loss_pair(None, loss_totals))
        with tf.control_dependencies([written]):
            self._state.assign(STEP_STATE.pack({**state, "in_step": tf.constant(0, tf.int64),
                                                "step_row": tf.constant(-1, tf.int64)}))

    def _measure(self, grads, stat_grads, present_slots, present, step, sampled, context, replica_context):
        """Measures the present gradients (and clips ``grads`` in place); returns the
        measured values, their index, whether the step was non-finite, and the clip bound."""
        clip_threshold = const(float("nan"))
        if not present:
            return tf.zeros([0], tf.float32), np.zeros([len(RAW_STATS), 0], np.int64), \
                tf.constant(False), clip_threshold
        inv_scale = (1.0 / tf.cast(context.loss_scale, tf.float32) if context.loss_scale is not None
                     else const(1.0))
        with tf.name_scope("measure"):
            groups = gradient_groups(stat_grads)
            flat, index, nonfinite_step = measure_gradients(stat_grads, sampled, groups)
        if self._clip is not None:
            raw = tf.reshape(tf.gather(flat, tf.constant(index.reshape(-1), tf.int32)),
                             [len(RAW_STATS), len(present)])
            finished = finish_stats(raw, inv_scale)
            clipped, clip_scale, clip_fired, clip_threshold = clip_measured(
                self._clip, stat_grads, [self._variables[s] for s in present_slots], finished[0],
                finished[1], context.loss_scale, replica_context)
            for k, i in enumerate(present):
                grads[i] = clipped[k]
            end = int(flat.shape[0])
            flat = tf.concat([flat, clip_scale, clip_fired], axis=0)
            index = np.concatenate([index, end + np.arange(2 * len(present)).reshape(2, len(present))])
        pieces = probes_lib.pieces_of(groups, stat_grads, present_slots)
        probe_step = probes_lib.ProbeStep(dict(zip(present_slots, stat_grads)), step, sampled, inv_scale,
                                          nonfinite_step, pieces)
        for probe in self._probes:
            with tf.name_scope(probe.name):
                probe.record(probe_step)
        return flat, index, nonfinite_step, clip_threshold

    @tf.autograph.experimental.do_not_convert
    def after_update(self) -> None:
        """In-graph, after the optimizer applied this step's update (host-snapshot fronts)."""
        for probe in self._probes:
            with tf.name_scope(f"gradwatch/{probe.name}"):
                probe.after_update()

    def _read_all(self) -> dict[str, Any]:
        """In-graph host read: state, buffered rows, accumulators, probes; each reset after."""
        state_vector = self._state.read_value()
        state = STEP_STATE.unpack(state_vector)
        fetched = {"state": state_vector, "buffer": self.buffer.fetch(state["buffered"])}
        with tf.control_dependencies(tf.nest.flatten(fetched)):
            zero = tf.constant(0, tf.int64)
            reset = self._state.assign(STEP_STATE.pack({**state, "buffered": zero, "window_steps": zero,
                                                        "nonfinite": zero}))
        with tf.control_dependencies([reset]):
            fetched["window"] = self.window.fetch()
            fetched.update({probe.name: probe.fetch() for probe in self._probes})
        return fetched

    def read_pending(self) -> PendingRead | None:
        """Host side: reads and resets the window in one call (``PendingRead.finish`` folds
        it, later, on any thread). Returns None if the window holds no step."""
        fetched = self._read_fn()
        state = STEP_STATE.unpack_numpy(fetched.pop("state").numpy())
        if state["window_steps"] <= 0:
            return None
        dead = (self._activations.read(self._options.thresholds.dead_steps)
                if self._activations is not None else None)
        return PendingRead(self, fetched, dead, rows=int(state["buffered"]), steps=int(state["window_steps"]),
                           last_step=int(state["step"]), nonfinite=bool(state["nonfinite"] > 0))

    # ------------------------------------------------------------------ host queries

    def start_at(self, step: int) -> None:
        """The next observed step is ``step + 1`` (host side, before a fit's first step; also
        from inside a trace, as ``Watch`` binds in its first ``observe``)."""
        with tf.init_scope():
            state = STEP_STATE.unpack_numpy(self._state.numpy())
            state.update(step=int(step), in_step=0, step_row=-1)
            self._state.assign(np.array([state[name] for name in STEP_STATE.names], np.int64))

    def next_step(self) -> int:
        """Returns the number the next observed step takes (``start_at`` places a fit's first)."""
        return int(self._state.numpy()[STEP_STATE.index("step")]) + 1

    @property
    def capacity(self) -> int:
        """Returns the steps the buffer holds between two reads before a step folds it."""
        return self.buffer.capacity

    def observed_steps(self) -> int:
        """Returns the steps observed since the last read (one small read)."""
        return int(self._state.numpy()[STEP_STATE.index("window_steps")])

    def has_nonfinite(self) -> bool:
        """Returns whether a step of the current window was non-finite (one small read)."""
        return bool(self._state.numpy()[STEP_STATE.index("nonfinite")] > 0)

    def snapshot_weights(self) -> bool:
        """Host side, before a step: copies the weights for the update probe. Returns
        whether a snapshot was taken (no probe under several replicas)."""
        if self._updates is None:
            return False
        self._updates.snapshot_now()
        return True

    def request_histogram(self) -> None:
        """Host side: a gradient histogram on the next step (after a new warning or error)."""
        for probe in self._probes:
            if isinstance(probe, probes_lib.HistogramProbe):
                probe.request()

    def update_pending(self) -> bool:
        """Returns whether a weight snapshot still waits for a step that moves the weights."""
        return self._updates is not None and self._updates.pending()

    def count_activations(self, on: bool) -> None:
        """Installs (True) or removes (False) the activation probe's wrappers, if any."""
        if self._activations is not None:
            self._activations.install() if on else self._activations.remove()

    def pause_activations(self, paused: bool) -> None:
        """Pauses the activation probe's counting (validation batches inside ``fit``)."""
        if self._activations is not None:
            self._activations.training.assign(not paused)


class PendingRead:
    """A read's values before its rows are folded: what the front needs at once
    (its steps, last step, whether one was non-finite), and ``finish``.

    Args:
        recorder: the recorder that read.
        fetched: the read's tensors (immutable: later steps do not change them).
        dead_by_activation: the activation probe's result, read with the rest.
        rows: the buffered rows the read fetched.
        steps: the window's steps.
        last_step: its last step.
        nonfinite: whether a step of the window had a non-finite gradient.
    """

    def __init__(self, recorder: Recorder, fetched: dict[str, Any], dead_by_activation: Any, rows: int,
                 steps: int, last_step: int, nonfinite: bool):
        self._recorder, self._fetched, self._dead, self._rows = recorder, fetched, dead_by_activation, rows
        self.steps, self.last_step, self.nonfinite = steps, last_step, nonfinite

    def finish(self) -> FetchedWindow:
        """Folds the fetched rows into the window (in numpy) and returns it as numpy
        values; reads no variable, so it may run while training goes on."""
        fetched = _numpy_of(self._fetched)
        buffer = fetched.pop("buffer")
        var_acc, global_acc = self._recorder.buffer.fold_fetched(*fetched.pop("window"), buffer, self._rows)
        columns, glob = self._recorder.window.unpack(var_acc, global_acc)
        return FetchedWindow(columns=columns, globals=glob, units=tuple(fetched["units"]),
                             updates=fetched.get("updates"), histograms=fetched.get("histograms"),
                             dead_by_activation=self._dead)


def _numpy_of(value: Any) -> Any:
    """A read's nested dicts, lists and tuples of tensors, with numpy values for the tensors
    (``tf.nest.map_structure``'s result, at a quarter of its cost: 24 against 91 us on the MLP)."""
    if isinstance(value, dict):
        return {key: _numpy_of(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_numpy_of(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value.numpy() if hasattr(value, "numpy") else value


def _with_static_shape(grad: Any, variable: Any) -> Any:
    """A gradient takes its variable's static shape where tracing lost it: a sparse one
    whose dense shape is a tensor (an ``IndexedSlices`` passed into a ``tf.function``),
    or a dense one of partly unknown shape (a Dense layer's kernel on a sequence whose
    batch size is unknown, as a ``tf.data`` pipeline's is: static shape (None, units))."""
    if grad is None:
        return None
    if not isinstance(grad, tf.IndexedSlices):
        if grad.shape.is_fully_defined() or not variable.shape.is_fully_defined():
            return grad
        return tf.ensure_shape(grad, variable.shape)
    if grad.dense_shape is not None and tf.get_static_value(grad.dense_shape) is not None:
        return grad
    shape = variable.shape
    if not shape.is_fully_defined():
        return grad
    dtype = grad.dense_shape.dtype if grad.dense_shape is not None else tf.int64
    return tf.IndexedSlices(grad.values, grad.indices, tf.constant(shape.as_list(), dtype))
