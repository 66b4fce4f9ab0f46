"""In-graph probes beyond the every-step norms: dead units, update/weight ratio and
direction, and gradient histograms.  Each one owns its own variables, runs inside
the step (``observe``) and hands its state to the recorder's single read (``fetch``, in
the read's ``tf.function``); the host decodes the fetched arrays
(``gradwatch._interpret.probe_layout``), which also defines what each probe tracks.

* :class:`UnitProbe` — per unit, the number of consecutive steps whose gradient was
  exactly zero.  A unit's bias gradient is the sum over the batch of the signal the
  unit passes back; it is exactly zero when the unit passed nothing on that batch
  (its kernel column is then zero too, except for a kernel regulariser's term —
  which is why the bias is read, not the kernel).  Layers without a bias use their
  kernel's columns.  A layer followed by a normalisation layer is left to that
  layer (its bias gradient is ~0 by construction; the normaliser's ``beta`` is read
  instead).  To tell a dead ReLU (activation zero on the whole batch) from a live
  unit that merely gets no signal (its outgoing weights are zero), the next layer's
  kernel-gradient row of the unit is checked on the window's sampled step: a dead
  unit feeds zeros forward, so that row is zero too (through a channels-last
  Flatten, every row of the unit).  When the next layer's kernel is not watched
  (frozen) there is no such evidence and a silent ReLU unit is reported dead.  A
  unit of a layer not followed by a ReLU is silent only if its own kernel column has
  no gradient either: a zero bias gradient alone can hold by construction (a
  WGAN critic's output bias).
* :class:`UpdateProbe` — on the steps of ``probe_layout.snapshot_due`` (dense in the first
  45 steps, then every ``UPDATE_EVERY`` = 50) it copies the weights, then,
  on the first following step that moved any weight (so gradient accumulation, where
  k-1 of k steps do not move the weights, and skipped steps are not "too slow"),
  measures ||w_after - w_before|| / ||w_before|| and the cosine between that weight
  change and minus the gradient that made it.  Under ``model.fit`` the copy is taken
  on the host before the step and the change is measured in-graph right after the
  optimizer's update (memory: one copy of the model).  In custom loops the update
  happens after ``observe``, so the copy and the step's gradient are kept in-graph
  and the change is measured at the next ``observe`` (memory: two copies).  All
  in-graph work is under ``tf.cond``: steps outside the probe's interval run none of it.
  The result holds the window's last measurement and, per variable, the count, sum and
  sum of squares of every cosine measured in the window (the direction test's evidence).
* :class:`HistogramProbe` — on steps that are a multiple of ``histogram_every``,
  per variable counts of log10|g| in fixed buckets (exact zeros and non-finite
  values counted apart), and optionally a signed-value histogram; never on other
  steps.  With ``histogram_every`` < 10 the counts come from a strided sample of at
  most 4096 entries per variable, and at most 65536 in all (each sampled entry
  standing for ``stride`` entries).  Bucket ids come from ``floor`` +
  ``unsorted_segment_sum`` (XLA-safe); variables of equal (sampled) length are
  counted together, one segment sum for all of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import tensorflow as tf

from gradwatch._capture import stats as stats_lib
from gradwatch._capture.array_ops import concat, graph_constant
from gradwatch._capture.keras_internals import HostFunction, cond, in_xla_context, replica_variable
from gradwatch._interpret.probe_layout import (
    EARLY_SNAPSHOTS,
    LOG10_LOW,
    NUM_LOG_BUCKETS,
    NUM_SIGNED_BUCKETS,
    PER_DECADE,
    UPDATE_EVERY,
    UPDATE_ROWS,
    unit_tracks,
    update_slots,
)
from gradwatch._topology import Topology

# Histograms on (nearly) every step use a bounded strided sample per variable.
SAMPLE_ENTRIES = 4096
# ... and at most this many in all per histogram step: a 400-variable net samples
# fewer entries of each (never fewer than MIN_SAMPLE_ENTRIES)
SAMPLE_BUDGET = 65536
MIN_SAMPLE_ENTRIES = 256
FULL_HISTOGRAM_EVERY = 10


class Piece(NamedTuple):
    """Gradients of one length as the rows of a float32 matrix ``[rows, length]``, the
    variable slot of each row, and how many entries each entry stands for (a sample's
    stride; 1.0 when every entry is there)."""

    matrix: tf.Tensor
    slots: tuple[int, ...]
    weight: Any = 1.0


def pieces_of(groups: stats_lib.Groups, grads: Sequence[Any], slots: Sequence[int]) -> tuple[Piece, ...]:
    """The step's stacked groups (``measure.gradient_groups(grads)``) of dense gradients as
    pieces, by variable slot (``slots[k]``: the k-th gradient's). A probe handed these
    takes a few stacked matrices into its conditional instead of every gradient: each
    tensor a conditional takes is a node in each of its branches, and a 400-variable
    net's histogram branch took 812 such nodes. A group holding a sparse gradient (under
    XLA, the dense one it stands for) is left out: probes read those from the gradients."""
    pieces = []
    for group in groups.groups:
        if (group.matrix.shape.is_fully_defined() and int(group.matrix.shape[1]) == group.dense_size
                and not any(isinstance(grads[p], tf.IndexedSlices) for p in group.positions)):
            pieces.append(Piece(group.matrix, tuple(int(slots[p]) for p in group.positions)))
    return tuple(pieces)


class ProbeStep(NamedTuple):
    """What every probe sees of a step, in-graph.

    Attributes:
        grads_by_slot: the present gradients by variable slot (global, loss-scaled).
        step: the step's number.
        sampled: whether it is the window's sampled step; None on the lean step,
            which runs no probe work but the unit counters.
        inv_scale: 1 / the loss scale (1 without one).
        nonfinite: whether a gradient of the step had a NaN/Inf entry (None: not known).
        pieces: the dense gradients of ``grads_by_slot`` stacked by length
            (``pieces_of``); the others are read from ``grads_by_slot``.
    """

    grads_by_slot: dict[int, Any]
    step: tf.Tensor
    sampled: tf.Tensor | None
    inv_scale: tf.Tensor
    nonfinite: tf.Tensor | None = None
    pieces: tuple[Piece, ...] = ()


class Probe(Protocol):
    """What the recorder calls on every probe: its name in a fetched window, a step
    to record, the optimizer's update done, and its state for the host read."""

    name: str

    def record(self, step: ProbeStep) -> None: ...

    def after_update(self) -> None: ...

    def fetch(self) -> Any: ...


def _weights(variable: Any) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(variable), tf.float32)


def _dense(grad: Any) -> tf.Tensor:
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


class UnitProbe:
    """Consecutive zero-gradient steps per unit (see the module docstring)."""

    name = "units"

    def record(self, step: ProbeStep) -> None:
        """Counts on every step, the lean one included."""
        self.observe(step.grads_by_slot, step.sampled)

    def after_update(self) -> None:
        """Nothing to do after the update."""

    def __init__(self, topology: Topology, strategy: Any = None):
        self.topology = topology
        self._replicas = strategy is not None and strategy.num_replicas_in_sync > 1
        self.tracks = unit_tracks(topology)
        total = sum(t.units for t in self.tracks)
        self.total = total
        self.zero_run = replica_variable(np.zeros(max(total, 1), np.int32), "gradwatch_zero_run", strategy)
        # 1: the unit's evidence (next kernel rows, or own kernel columns) was zero at the last sampled step
        self.silent = replica_variable(np.ones(max(total, 1), np.float32), "gradwatch_unit_silent",
                                       strategy)

    def observe(self, grads_by_slot: dict[int, Any], sampled: tf.Tensor | None) -> list[tf.Operation]:
        """Counts this step's zero-gradient units; on sampled steps measures which
        units are silent (``sampled`` None: a step known not to be sampled, which only
        counts)."""
        if not self.tracks:
            return []
        # One op per step for all the bias-mode tracks: their gradients are vectors,
        # concatenated and compared at once (deep nets are bound by op count).
        vectors, present_mask, silent_parts = [], [], []
        for track in self.tracks:
            grad = grads_by_slot.get(track.slot)
            if grad is None or isinstance(grad, tf.IndexedSlices):
                vectors.append(tf.ones([track.units], tf.float32))  # not zero: counts nothing
                present_mask += [False] * track.units
            else:
                grad = tf.cast(grad, tf.float32)
                if track.kernel_mode:
                    grad = tf.reduce_max(tf.abs(grad), axis=list(range(len(grad.shape) - 1)))
                vectors.append(grad)
                present_mask += [True] * track.units
            evidence = grads_by_slot.get(track.evidence) if track.evidence is not None else None
            if evidence is None or isinstance(evidence, tf.IndexedSlices):
                silent_parts.append(None)
            else:
                # the next kernel's rows (a ReLU layer), or the layer's own kernel columns:
                # _silent_measure reduces over the other axes, in the sampled branch only
                # (a transpose here ran on every step of a full trace: ~0.15 ms under oneDNN)
                silent_parts.append(tf.cast(evidence, tf.float32))
        zero = tf.equal(tf.concat(vectors, axis=0), 0.0)
        run = self.zero_run.read_value()
        # a product with the 0/1 mask: a select against a broadcast 0 took twice as long
        # (21 against 12 us a step on the MLP's 1,034 units)
        new_run = (run + 1) * tf.cast(zero, tf.int32)
        if not all(present_mask):
            new_run = tf.where(tf.constant(present_mask), new_run, run)
        ops = [self.zero_run.assign(new_run)]

        present_parts = [nxt for nxt in silent_parts if nxt is not None]
        measure_silent = self._silent_measure(silent_parts)
        if sampled is not None and any(part is not None for part in silent_parts):
            def measured():
                silent = measure_silent(*present_parts)
                if not all(present_mask):
                    # units this observation has no gradient for (another optimizer's, applied in
                    # the same step) keep what their own observation measured
                    silent = tf.where(tf.constant(present_mask), silent, self.silent.read_value())
                return silent

            if self._replicas:
                # the write stays outside the cond: under several replicas a mirrored
                # write is a merge_call, which a cond branch cannot hold
                ops.append(self.silent.assign(cond(sampled, measured, lambda: self.silent.read_value())))
            else:
                # one replica writes in the sampled branch: a step not sampled reads and
                # writes nothing back (two ops fewer on every step)
                def write():
                    with tf.control_dependencies([self.silent.assign(measured())]):
                        return tf.constant(True)

                ops.append(cond(sampled, write, lambda: tf.constant(False)))
        return ops

    def _silent_measure(self, silent_parts: list[Any]) -> Any:
        """Returns the function of the present next-layer kernels that flags, per
        tracked unit, whether its outgoing kernel rows are all zero (1.0: silent)."""
        # Tracks whose next kernels have one shape (and unit count) are measured as
        # stacks (of at most stats.GROUP_LIMIT entries): a deep net's hundred tracks
        # are a few dozen reductions, not a few hundred ops.
        by_shape: dict[tuple, list[int]] = {}
        for k, (track, nxt) in enumerate(zip(self.tracks, silent_parts)):
            if nxt is not None:
                by_shape.setdefault((tuple(nxt.shape), track.units, track.relu), []).append(k)
        groups = [(shape, units, relu, chunk) for (shape, units, relu), members in by_shape.items()
                  for chunk in stats_lib.stack_chunks(members, int(np.prod(shape)))]
        # where each track's units are in [measured groups..., ones]
        source, offset = {}, 0
        for _, units, _, members in groups:
            for k in members:
                source[k] = offset + np.arange(units)
                offset += units
        ones_at = offset
        order = np.concatenate([source.get(k, np.full(t.units, ones_at)) for k, t in enumerate(self.tracks)])
        position = {k: j for j, k in enumerate(k for k, p in enumerate(silent_parts) if p is not None)}

        def measure_silent(*nexts):
            parts = []
            for shape, units, relu, members in groups:
                stacked = tf.stack([nexts[position[k]] for k in members]) if len(members) > 1 else (
                    tf.expand_dims(nexts[position[members[0]]], 0))
                rank = len(shape) + 1
                # max |w| of each input row of a next kernel (its axis rank-2), or of each
                # output column of the layer's own kernel (its last axis), per stacked kernel
                kept = rank - 2 if relu else rank - 1
                rows = tf.reduce_max(tf.abs(stacked), axis=[a for a in range(1, rank) if a != kept])
                rows = tf.reduce_max(tf.reshape(rows, [len(members), -1, units]), axis=1)
                parts.append(tf.reshape(tf.cast(tf.equal(rows, 0.0), tf.float32), [-1]))
            parts.append(tf.ones([1], tf.float32))
            return tf.gather(tf.concat(parts, axis=0), tf.constant(order, tf.int32))

        return measure_silent

    def fetch(self) -> tuple[tf.Tensor, tf.Tensor]:
        """In-graph, for the recorder's single read: the counters (nothing is reset)."""
        return self.zero_run.read_value(), self.silent.read_value()

def _four_sums(delta: tf.Tensor, grad: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """[4]: the sums of delta**2, delta * grad, grad**2 and start**2 of one variable.

    Under XLA the four terms stacked, summed as ``stats.row_sums`` (a product with a
    vector of ones over pieces of each row): XLA's CPU backend made each long reduction a
    chain of reduce-windows, a generated kernel per link (~20 ms of compile each), and
    four reductions four chains. Elsewhere ``L2Loss`` (half a sum of squares, one pass, no squared
    copy) and a dot product."""
    if in_xla_context():
        terms = [tf.square(delta), delta * grad, tf.square(grad), tf.square(start)]
        return stats_lib.row_sums(tf.stack(terms))
    return graph_constant([2.0, 1.0, 2.0, 2.0]) * tf.stack(
        [tf.nn.l2_loss(delta), tf.reduce_sum(delta * grad), tf.nn.l2_loss(grad), tf.nn.l2_loss(start)])


class UpdateProbe:
    """Update/weight ratio and update direction, on sampled intervals (see the module docstring).

    The snapshot and the copied gradient are one flat variable each (not one per
    model variable): every variable a step function captures costs a few
    microseconds on every call, used or not, which on a 400-variable net is
    more than the probe's own work.
    """

    name = "updates"

    def record(self, step: ProbeStep) -> None:
        """On sampled steps: the in-graph snapshot and measure, or (host snapshots) the
        gradient kept for ``after_update`` in this same trace."""
        self._after_update_grads, self._after_update_pieces = {}, ()
        if step.sampled is None:
            return
        if self.host_snapshots:
            self._after_update_grads, self._after_update_pieces = step.grads_by_slot, step.pieces
        else:
            # a weight snapshot on the steps of probe_layout.snapshot_due (1, 3, 5, ..., 45, 51, 101, ...)
            number = tf.cast(step.step, tf.int64)
            early = tf.reduce_any(tf.equal(number, tf.constant(EARLY_SNAPSHOTS, tf.int64)))
            self.observe(step.grads_by_slot, early | tf.equal(tf.math.floormod(number - 1, UPDATE_EVERY), 0),
                         step.pieces)

    def after_update(self) -> None:
        """Host snapshots: measures the change the update just made."""
        if self.host_snapshots and self._after_update_grads:
            self.measure_after_update(self._after_update_grads, self._after_update_pieces)
        self._after_update_grads, self._after_update_pieces = {}, ()

    def __init__(self, variables: Sequence[Any], topology: Topology, strategy: Any = None,
                 host_snapshots: bool = False):
        self.variables = list(variables)
        # True: snapshots are taken on the host (snapshot_now) and measured after the
        # update (measure_after_update); no gradient copy is kept. False: observe().
        self.host_snapshots = bool(host_snapshots)
        self._after_update_grads: dict[int, Any] = {}
        self._after_update_pieces: tuple[Piece, ...] = ()
        self.slots = update_slots(topology)
        sizes = topology.variable_sizes()
        self.sizes = [sizes[i] for i in self.slots]
        # The flat snapshot (and gradient copy) holds the measured variables ordered
        # by size, so each size's block reshapes to [count, size] and a sum per
        # variable is one row reduction per size, not one per variable (whose count,
        # and XLA compile time, grows with a deep net's variables); within a size by
        # shape, so a size's block stacks each shape's weights at once.
        shapes = [tuple(topology.variables[i].shape) for i in self.slots]
        self._order = sorted(range(len(self.slots)), key=lambda k: (self.sizes[k], shapes[k], k))
        # (size, count) in the flat layout
        self._blocks = [(size, len(list(run)))
                        for size, run in itertools.groupby(self.sizes[k] for k in self._order)]
        # The variables of up to STACK_LIMIT entries lead the layout (it is ordered by
        # size): their sums are block rows; a larger one is measured on its own part of the
        # snapshot, and no measure copies every weight and gradient into one vector.
        # Per block of small variables: its measured variables (flat layout order), in
        # runs of one shape; _small counts them.
        self._small_blocks: list[list[list[int]]] = []
        self._small = 0
        for size, count in self._blocks:
            if size > stats_lib.STACK_LIMIT:
                break
            members = self._order[self._small:self._small + count]
            runs = itertools.groupby(members, key=lambda k: shapes[k])
            self._small_blocks.append([list(run) for _, run in runs])
            self._small += count
        # position of measured variable k (slot order) in the flat layout's order
        self._unorder = np.argsort(np.asarray(self._order, np.int64)).astype(np.int32)
        self._offsets = np.concatenate([[0], np.cumsum([self.sizes[k] for k in self._order])]).astype(int)
        total = max(sum(self.sizes), 1)
        self.snap = replica_variable(np.zeros(total, np.float32), "gradwatch_update_snapshot", strategy)
        self.gsum = None if self.host_snapshots else replica_variable(
            np.zeros(total, np.float32), "gradwatch_update_gradient", strategy)
        # steps since the snapshot; pending: 1 until the change is measured
        self.state = replica_variable(np.zeros(2, np.int64), "gradwatch_update_state", strategy)
        self.result = replica_variable(self._reset(), "gradwatch_update_result", strategy)
        self._snapshot_fn = None

    def _flat_weights(self) -> tf.Tensor:
        """The measured variables' weights as one vector in the flat layout."""
        large = [self._weight_vector(k) for k in self._order[self._small:]]
        return self._joined(self._weight_blocks() + large)

    def _weight_vector(self, k: int) -> tf.Tensor:
        """Measured variable k's weights as a float32 vector."""
        return tf.reshape(_weights(self.variables[self.slots[k]]), graph_constant([-1], tf.int32))

    @staticmethod
    def _joined(blocks: list[tf.Tensor]) -> tf.Tensor:
        """``[count, size]`` blocks as one vector, row after row, block after block."""
        vectors = [tf.reshape(block, graph_constant([-1], tf.int32)) for block in blocks]
        return concat(vectors)

    def _weight_blocks(self) -> list[tf.Tensor]:
        """Per block of small variables, their weights as the rows of a ``[count, size]``
        matrix: each shape's variables stacked at once (a reshape per variable was a node
        each in every trace that reads them: ~400 of a 100-layer net's)."""
        blocks = []
        for (size, _), runs in zip(self._blocks, self._small_blocks):
            shape = graph_constant([-1, size], tf.int32)
            stacks = [tf.reshape(tf.stack([_weights(self.variables[self.slots[k]]) for k in run]), shape)
                      for run in runs]
            blocks.append(concat(stacks))
        return blocks

    def _flat_grads(self, grads: Sequence[Any], pieces: Sequence[Piece]) -> tf.Tensor:
        """``grads`` (slot order) as one vector in the flat layout."""
        return self._joined(self._grad_blocks(grads, pieces) +
                            [self._grad_vector(grads, k) for k in self._order[self._small:]])

    def _grad_vector(self, grads: Sequence[Any], k: int) -> tf.Tensor:
        """Measured variable k's gradient as a float32 vector (zeros for none)."""
        g = grads[k]
        if g is None:
            return tf.zeros([self.sizes[k]], tf.float32)
        if isinstance(g, tf.IndexedSlices):
            g = tf.convert_to_tensor(g)  # dense only on the few steps that use it
        return tf.reshape(tf.cast(g, tf.float32), graph_constant([-1], tf.int32))

    def _grad_blocks(self, grads: Sequence[Any], pieces: Sequence[Piece]) -> list[tf.Tensor]:
        """Per block of small variables, their gradients (``grads``, slot order) as the rows
        of a ``[count, size]`` matrix: the rows of the step's ``pieces`` of that length
        (``pieces_of``), gathered into the block's order; a variable in none (a sparse
        gradient, or none: zeros) adds its own row."""
        position = {slot: k for k, slot in enumerate(self.slots)}
        blocks = []
        for (size, _), runs in zip(self._blocks, self._small_blocks):
            members = [k for run in runs for k in run]
            wanted = set(members)
            matrices, row_of, rows_taken = [], {}, 0
            for piece in pieces:
                mine = [position.get(slot) for slot in piece.slots]
                if piece.matrix.shape[1] != size or not wanted.intersection(mine):
                    continue
                row_of.update({k: rows_taken + r for r, k in enumerate(mine) if k is not None})
                matrices.append(piece.matrix)
                rows_taken += len(mine)
            for k in members:
                if k not in row_of:
                    row_of[k] = rows_taken
                    rows_taken += 1
                    one_row = graph_constant([1, size], tf.int32)
                    matrices.append(tf.reshape(self._grad_vector(grads, k), one_row))
            rows = concat(matrices)
            order = [row_of[k] for k in members]
            if order != list(range(int(rows.shape[0]))):
                rows = tf.gather(rows, graph_constant(order, tf.int32), axis=graph_constant(0, tf.int32))
            blocks.append(rows)
        return blocks

    def _reset(self) -> np.ndarray:
        return np.full((len(UPDATE_ROWS), max(len(self.slots), 1)), np.nan, np.float32)

    def _change_sums(self, snap: tf.Tensor, grads: tf.Tensor | Sequence[Any], pieces: Sequence[Piece] = ()
                     ) -> tf.Tensor:
        """[4, measured variables] (slot order): per variable the sums of d**2, d * g, g**2
        and w0**2, where w0 is its part of ``snap``, d its weights now less w0 and g its
        part of ``grads`` (a vector in the flat layout, or gradients in slot order with the
        step's ``pieces``).

        The small variables' vectors are joined (their weights stacked per shape, their
        gradients the step's stacked pieces: no op per variable but its read) and summed as
        block rows, a few ops per size; each large one is summed on its own part of the
        snapshot. A model-size vector of the weights and one of the gradients cost the
        MLP's measure 2.7 ms (3.2 ms under XLA) against 1.0 (1.3) without
        (benchmarks/README.md)."""
        flat = isinstance(grads, tf.Tensor)
        parts = []
        small_total = int(self._offsets[self._small])
        entry_axis = graph_constant(1, tf.int32)
        if self._small:
            weights = self._joined(self._weight_blocks())
            grad = grads[:small_total] if flat else self._joined(self._grad_blocks(grads, pieces))
            start = snap[:small_total]
            delta = weights - start
            stacked = tf.stack([tf.square(delta), delta * grad, tf.square(grad), tf.square(start)])
            # one split into the sizes' blocks, each summed as [4, count, size] rows
            blocks = self._blocks[:len(self._small_blocks)]
            lengths = graph_constant([size * count for size, count in blocks], tf.int32)
            pieces_of_blocks = tf.split(stacked, lengths, axis=entry_axis) if len(blocks) > 1 else [stacked]
            last = graph_constant(2, tf.int32)
            for (size, count), piece in zip(blocks, pieces_of_blocks):
                if in_xla_context():  # the pieces' product with ones (``stats.row_sums``)
                    rows = stats_lib.row_sums(tf.reshape(piece, graph_constant([4 * count, size], tf.int32)))
                    parts.append(tf.reshape(rows, graph_constant([4, count], tf.int32)))
                else:
                    parts.append(tf.reduce_sum(tf.reshape(piece, graph_constant([4, count, size], tf.int32)),
                                               axis=last))
        large = list(range(self._small, len(self._order)))
        if large:
            # one split of the snapshot (and of a flat gradient), then per variable a few
            # ops (``_four_sums``). Its slices
            # and four stacked sums were ~75 ops a variable, 1,842 of the 24-layer net's
            # trace (eighth session)
            sizes = graph_constant([int(self._offsets[p + 1] - self._offsets[p]) for p in large], tf.int32)
            def split(vector):
                return tf.split(vector, sizes, num=len(large)) if len(large) > 1 else [vector]

            starts = split(snap[small_total:])
            flat_grads = split(grads[small_total:]) if flat else None
            sums = []
            for j, position in enumerate(large):
                k = self._order[position]
                grad = flat_grads[j] if flat else self._grad_vector(grads, k)
                sums.append(_four_sums(self._weight_vector(k) - starts[j], grad, starts[j]))
            parts.append(tf.stack(sums, axis=1))
        joined = concat(parts, axis=1)
        return tf.gather(joined, graph_constant(self._unorder, tf.int32), axis=entry_axis)

    def observe(self, grads_by_slot: dict[int, Any], due: tf.Tensor,
                pieces: Sequence[Piece] = ()) -> tf.Tensor:
        """In-graph snapshots (custom loops): on ``due`` steps copies the weights and the
        step's gradient; on the first later step that moved a weight, measures the change.
        ``pieces``: gradients of ``grads_by_slot`` already stacked (``pieces_of``)."""
        if not self.slots:
            return tf.constant(0)
        state = self.state.read_value()
        pending = state[1]
        grads = [grads_by_slot.get(i) for i in self.slots]

        # Three independent conditionals, each writing a flat variable it does not
        # read (a snapshot, the snapshot step's gradient) or only small results: under
        # XLA a conditional that reads and writes a large variable, or reads it in one
        # branch and writes it in another, copies the whole variable on every step.
        # The weights' part reads no gradient, so it runs as soon as the step starts:
        # the optimizer's writes are ordered after every read of the weights, and a
        # part that also waited for the last gradient would hold back the update of
        # every layer until backprop is complete.
        measuring = (pending > 0) & tf.logical_not(due)

        def snapshot_weights():
            with tf.control_dependencies([self.snap.assign(self._flat_weights())]):
                return tf.constant(True)

        def snapshot_gradient():
            with tf.control_dependencies([self.gsum.assign(self._flat_grads(grads, pieces))]):
                return tf.constant(True)

        def measure():
            return self._measure(self.snap.read_value(), self.gsum.read_value(), state)

        no = lambda: tf.constant(False)  # noqa: E731
        cond(due, snapshot_weights, no)
        measured = cond(measuring, measure, lambda: state)
        stored = cond(due, snapshot_gradient, no)
        new_state = tf.where(due, tf.constant([1, 1], tf.int64), measured)
        with tf.control_dependencies([stored]):
            return self.state.assign(new_state)

    def _measure(self, snap: tf.Tensor, grads: tf.Tensor | Sequence[Any], state: tf.Tensor,
                 applied: Sequence[bool] | None = None, pieces: Sequence[Piece] = ()) -> tf.Tensor:
        """A measuring step: writes the result rows of the change since ``snap`` with
        minus ``grads`` (see ``_change_sums``) if a weight moved; returns the probe's next state (idle once
        written, else one more step since the snapshot). ``applied`` (per measured
        variable): only these were updated (one optimizer of several); the others'
        rows stay unmeasured."""
        since, pending = tf.unstack(state, num=2)
        du, dot, g2, w2 = tf.unstack(self._change_sums(snap, grads, pieces), num=4)
        dot = -dot
        rows = self.result.read_value()
        # the window's direction measurements (count, sum of cosines, of squares) add up
        zero, one = graph_constant(0.0), graph_constant(1.0)
        valid = (du > zero) & (g2 > zero)
        norms = tf.sqrt(tf.where(valid, du, one)) * tf.sqrt(tf.where(valid, g2, one))
        cos = tf.where(valid, dot / norms, zero)
        count, total, squares = tf.unstack(tf.where(tf.math.is_nan(rows[5:]), zero, rows[5:]), num=3)
        # the rows the stats show are the window's first measurement's
        head = tf.stack([du, w2, du, dot, g2])
        new_rows = tf.concat([
            tf.where(tf.math.is_nan(rows[:5]), head, rows[:5]),
            tf.stack([count + tf.cast(valid, tf.float32), total + cos, squares + tf.square(cos)]),
        ], axis=0)
        # measured on the first step that moved a weight; if none moved for
        # UPDATE_EVERY steps the update ratio is 0 (frozen, or a zero learning rate)
        took = (tf.reduce_sum(du) > zero) | (since >= graph_constant(UPDATE_EVERY - 1, tf.int64))
        write = took if applied is None or all(applied) else took & tf.constant([list(applied)])
        with tf.control_dependencies([self.result.assign(tf.where(write, new_rows, rows))]):
            idle = graph_constant([0, 0], tf.int64)
            return tf.where(took, idle, tf.stack([since + graph_constant(1, tf.int64), pending]))

    # ------------------------------------------------ host snapshots (model.fit)

    def snapshot_now(self) -> None:
        """Host side, before a step: copies the weights; the first following step
        that moves them is measured right after its update (``measure_after_update``).

        ``GradientMonitor`` uses this instead of the in-graph snapshot: the copy runs
        once per ``UPDATE_EVERY`` steps outside the compiled step, so the step holds
        no conditional write of a model-size variable (under XLA such a write costs a
        full copy on every step) and no copy of the gradient is kept.
        """
        if not self.slots:
            return
        if self._snapshot_fn is None:
            def snapshot():
                self.snap.assign(self._flat_weights())
                self.state.assign(tf.constant([0, 1], tf.int64))

            self._snapshot_fn = HostFunction(snapshot)
        self._snapshot_fn()

    def pending(self) -> bool:
        """Host side: whether a snapshot still waits for a step that moves the weights."""
        return bool(self.slots) and bool(self.state.numpy()[1] > 0)

    def measure_after_update(self, grads_by_slot: dict[int, Any], pieces: Sequence[Piece] = ()) -> tf.Tensor:
        """In-graph, after the optimizer's update: while a host snapshot is pending,
        the change since it and its cosine with minus this step's gradient (``pieces``:
        gradients of ``grads_by_slot`` already stacked, ``pieces_of``)."""
        if not self.slots:
            return tf.constant(0)
        state = self.state.read_value()
        grads = [grads_by_slot.get(i) for i in self.slots]
        applied = [g is not None for g in grads]

        def measure():  # the state is written in the branch: a step with nothing pending writes nothing
            next_state = self._measure(self.snap.read_value(), grads, state, applied, pieces)
            with tf.control_dependencies([self.state.assign(next_state)]):
                return tf.constant(True)

        return cond(state[1] > 0, measure, lambda: tf.constant(False))

    def fetch(self) -> tf.Tensor:
        """In-graph, for the recorder's single read: the measurements, then reset."""
        measured = self.result.read_value()
        with tf.control_dependencies([measured]):
            self.result.assign(tf.constant(self._reset()))
        return measured

class HistogramProbe:
    """log10|g| (and optionally signed) bucket counts per variable on histogram steps.

    A histogram step is every ``every``-th step, the run's first step, its first
    non-finite step (decided in-graph, the lean step included) and the next full step
    after the host asked for one (:meth:`request`: after a new warning or error; the
    next step when the fit runs no lean step, else the next window's first step at the
    latest), so a short run has histograms too.
    """

    name = "histograms"

    def record(self, step: ProbeStep) -> None:
        """On histogram steps: the bucket counts."""
        self.observe(step.grads_by_slot, step.step, step.inv_scale, step.sampled, step.nonfinite, step.pieces)

    def request(self) -> None:
        """Host side: a histogram on the next step (a new warning or error was raised)."""
        self.requested.assign(True)

    def after_update(self) -> None:
        """Nothing to do after the update."""

    def __init__(self, topology: Topology, every: int, signed: bool, strategy: Any = None):
        self.topology = topology
        self.every = int(every)
        self.signed = bool(signed)
        # Histograms on (nearly) every step use a bounded strided sample per variable
        # instead of a full pass; rarer ones count every entry.
        num = len(topology.variables)
        per_variable = min(SAMPLE_ENTRIES, max(MIN_SAMPLE_ENTRIES, SAMPLE_BUDGET // max(num, 1)))
        self.sample = per_variable if 0 < self.every < FULL_HISTOGRAM_EVERY else None
        # per variable: log buckets, zeros, non-finite
        self.counts = replica_variable(np.zeros((num, NUM_LOG_BUCKETS + 2), np.float32),
                                       "gradwatch_hist_counts", strategy)
        self.signed_counts = replica_variable(np.zeros((num, NUM_SIGNED_BUCKETS), np.float32),
                                              "gradwatch_hist_signed", strategy)
        self.bounds = replica_variable(np.zeros(len(topology.layers), np.float32),
                                       "gradwatch_hist_bounds", strategy)
        # [the last histogram's step (-1: none since the read), the step from which the
        # next one is due (0: the run's first step), 1 once the first non-finite step's
        # is taken]: one read a step decides (``_due``); the host's request apart
        self.state = replica_variable(np.array([-1, 0, 0], np.int64), "gradwatch_hist_state", strategy)
        self.requested = replica_variable(np.array(False), "gradwatch_hist_requested", strategy)
        positions = topology.layer_positions()
        self.layer_ids = [positions[v.layer] for v in topology.variables]

    def observe(self, grads_by_slot: dict[int, Any], step: tf.Tensor, inv_scale: tf.Tensor,
                sampled: tf.Tensor | None = None, nonfinite: tf.Tensor | None = None,
                pieces: Sequence[Piece] = ()) -> tf.Tensor:
        """Counts the buckets on a histogram step (class docstring); ``sampled`` None: the
        lean step. ``pieces``: gradients of ``grads_by_slot`` already stacked (``pieces_of``)."""
        if self.every <= 0:
            return tf.constant(0)
        due, after = self._due(step, sampled, nonfinite)
        if due is None:
            return tf.constant(0)

        def measure():
            num = len(self.topology.variables)
            measured_pieces = [self._sampled(piece) for piece in pieces]
            stacked = {slot for piece in pieces for slot in piece.slots}
            for slot in range(num):
                g = grads_by_slot.get(slot)
                if g is not None and slot not in stacked:
                    flat = tf.reshape(tf.cast(_dense(g), tf.float32), graph_constant([1, -1], tf.int32))
                    measured_pieces.append(self._sampled(Piece(flat, (slot,))))
            present = {slot for piece in measured_pieces for slot in piece.slots}
            keep = self._keep_other(step, present)
            measured = [[s in present] for s in range(num)]
            counts = keep(self._log_counts(measured_pieces, num, inv_scale), self.counts, measured)
            ops = [self.counts.assign(counts), self.state.assign(after()), self.requested.assign(False)]
            if self.signed:
                ops += self._signed_ops(measured_pieces, inv_scale, keep, measured)
            with tf.control_dependencies(ops):
                return tf.constant(0)

        if due is True:  # every step is a histogram step: no conditional
            return measure()
        return cond(due, measure, lambda: tf.constant(0))

    def _sampled(self, piece: Piece) -> Piece:
        """``piece``, or (histograms on nearly every step) a strided sample of its rows' entries
        whose entries each stand for ``stride`` entries."""
        size = piece.matrix.shape[1]
        if self.sample is None or (size is not None and size <= self.sample):
            return piece
        if size is None:
            n = tf.shape(piece.matrix)[1]
            stride = tf.maximum(1, -(-n // self.sample))
            weight = tf.cast(stride, tf.float32)
        else:
            stride = -(-size // self.sample)
            weight = float(stride)
        return Piece(piece.matrix[:, ::stride], piece.slots, weight)

    def _signed_ops(self, pieces: list[Piece], inv_scale: tf.Tensor,
                    keep: Callable[..., tf.Tensor], measured: list) -> list[Any]:
        """The signed-value histogram's assignments: per layer, buckets over [-peak, peak]
        (opt-in: each variable's row is taken out of its piece)."""
        num = len(self.topology.variables)
        flats, weights = {}, {}
        for piece in pieces:
            for row, slot in enumerate(piece.slots):
                flats[slot] = piece.matrix[row] * inv_scale
                weights[slot] = piece.weight
        signed_rows, bounds = [], []
        for layer in range(len(self.topology.layers)):
            members = [s for s in flats if self.layer_ids[s] == layer]
            peaks = [tf.reduce_max(tf.where(tf.math.is_finite(flats[s]), tf.abs(flats[s]), 0.0))
                     for s in members]
            bounds.append(tf.reduce_max(tf.stack(peaks)) if peaks else tf.constant(0.0))
        bounds = tf.stack(bounds)
        for slot in range(num):
            flat = flats.get(slot)
            if flat is None:
                signed_rows.append(tf.zeros([NUM_SIGNED_BUCKETS]))
                continue
            bound = tf.maximum(bounds[self.layer_ids[slot]], 1e-30)
            finite = tf.math.is_finite(flat)
            position = (tf.where(finite, flat, 0.0) + bound) / (2.0 * bound) * NUM_SIGNED_BUCKETS
            bucket = tf.clip_by_value(
                tf.cast(tf.floor(position), tf.int32), 0, NUM_SIGNED_BUCKETS - 1)
            ids = tf.where(finite, bucket, NUM_SIGNED_BUCKETS)
            signed_rows.append(tf.math.unsorted_segment_sum(
                tf.ones_like(flat) * weights[slot], ids, NUM_SIGNED_BUCKETS + 1)[:NUM_SIGNED_BUCKETS])
        layers = [any(self.layer_ids[s] == layer for s in flats)
                  for layer in range(len(self.topology.layers))]
        return [self.signed_counts.assign(keep(tf.stack(signed_rows), self.signed_counts, measured)),
                self.bounds.assign(keep(bounds, self.bounds, layers))]

    def _due(self, step: tf.Tensor, sampled: tf.Tensor | None, nonfinite: tf.Tensor | None
             ) -> tuple[tf.Tensor | bool | None, Callable[[], tf.Tensor]]:
        """(whether this step is a histogram step, the function of the state after it, for the
        histogram's branch); None: never (a lean step of a run that cannot tell a non-finite
        one); True: always (every step a histogram step, known at trace time).

        Due: from the step the last one set (a multiple of ``every``; the run's first step),
        on the host's request, on a further observation of a step whose histogram was taken
        (another optimizer's variables), and on the first non-finite step."""
        last, next_due, nonfinite_taken = tf.unstack(self.state.read_value(), num=3)
        number = tf.cast(step, tf.int64)
        first_nonfinite = (tf.logical_and(tf.convert_to_tensor(nonfinite), tf.equal(nonfinite_taken, 0))
                           if nonfinite is not None else tf.constant(False))

        def after() -> tf.Tensor:
            following = (number // self.every + 1) * self.every
            taken = tf.maximum(nonfinite_taken, tf.cast(first_nonfinite, tf.int64))
            return tf.stack([number, following, taken])

        if sampled is None and self.every == 1:
            return True, after  # histograms on every step: the lean step takes them too
        if sampled is None:  # the lean step: the first non-finite step only (a request waits for a full one)
            return (first_nonfinite if nonfinite is not None else None), after
        due = (tf.greater_equal(number, next_due) | self.requested.read_value() | tf.equal(last, number)
               | first_nonfinite)
        return due, after

    def _keep_other(self, step: tf.Tensor, present: set[int]) -> Callable[..., tf.Tensor]:
        """Returns ``keep(new, variable, measured)``: ``new`` where ``measured``, else,
        when this step was already measured (a step observed several times: several
        optimizers), the variable's value for the entries another observation measured."""
        same_step = tf.equal(self.state.read_value()[0], tf.cast(step, tf.int64))

        def keep(new: tf.Tensor, variable: Any, measured: list) -> tf.Tensor:
            return tf.where(tf.constant(measured) | tf.logical_not(same_step), new, variable.read_value())

        return keep

    @staticmethod
    def _log_counts(pieces: Sequence[Piece], num: int, inv_scale: Any = 1.0) -> tf.Tensor:
        """[num, NUM_LOG_BUCKETS + 2] log10|g| bucket counts (then zeros, non-finite) of
        the rows of ``pieces`` times ``inv_scale``, by slot (zeros for a slot in none).

        Every row is counted at once: the pieces' entries joined into one vector, each
        entry's bucket offset by its row, then one segment sum. A histogram is ~30 ops and
        a few per piece, whatever the variables; counted per vector length it was ~45 ops
        a length, ~0.8 ms of trace an op here (the MLP's histogram 368 ops, the
        transformer's 523). The rows' offsets are a running sum of each row's step over
        the one before, placed at its first entry, when every length is known when traced
        (5 ops for any number of rows), else filled per piece (a search of the rows' ends
        took ~1.5 ms more on the MLP's 670k entries).
        """
        width = NUM_LOG_BUCKETS + 2
        pieces = list(pieces)
        order = [slot for piece in pieces for slot in piece.slots]
        if not order:
            return tf.zeros([num, width])
        lengths = [piece.matrix.shape[1] for piece in pieces for _ in piece.slots]
        static = all(length is not None for length in lengths)
        axis = graph_constant(0, tf.int32)
        flat_shape = graph_constant([-1], tf.int32)

        def per_entry(values: list[Any], dtype: tf.DType) -> tf.Tensor:
            """Each row's value (``values`` in row order) repeated over its entries, joined."""
            if static and all(isinstance(v, (int, float)) for v in values):
                # the value's change at each row's first entry, summed along the entries
                starts = np.cumsum([0] + [int(n) for n in lengths])
                keep = [k for k in range(len(order)) if lengths[k] > 0]
                steps = np.diff([0] + [values[k] for k in keep])
                marks = tf.scatter_nd(graph_constant(starts[keep][:, None], tf.int32),
                                      graph_constant(steps, dtype), graph_constant([starts[-1]], tf.int32))
                return tf.cumsum(marks, axis=axis)
            filled, first = [], 0
            for piece in pieces:
                rows = len(piece.slots)
                mine = values[first:first + rows]
                first += rows
                if all(isinstance(v, (int, float)) for v in mine):
                    column = graph_constant(np.asarray(mine, dtype.as_numpy_dtype)[:, None], dtype)
                else:
                    column = tf.reshape(tf.cast(tf.stack(mine), dtype), graph_constant([-1, 1], tf.int32))
                filled.append(tf.reshape(column * tf.ones_like(piece.matrix, dtype), flat_shape))
            return concat(filled)

        vectors = [tf.reshape(piece.matrix, flat_shape) for piece in pieces]
        joined = concat(vectors)
        magnitude = tf.abs(joined) * inv_scale
        finite = tf.math.is_finite(magnitude)
        nonzero = finite & (magnitude > graph_constant(0.0))
        log = tf.math.log(tf.where(nonzero, magnitude, graph_constant(1.0))) / np.log(10.0)
        bucket = tf.clip_by_value(
            tf.cast(tf.floor((log - LOG10_LOW) * PER_DECADE), tf.int32), 0, NUM_LOG_BUCKETS - 1)
        ids = tf.where(nonzero, bucket, tf.where(finite, NUM_LOG_BUCKETS, NUM_LOG_BUCKETS + 1))
        # the k-th row's buckets are segments k * width ... k * width + width - 1
        if len(order) > 1:
            ids += per_entry([k * width for k in range(len(order))], tf.int32)
        row_weights = [piece.weight for piece in pieces for _ in piece.slots]
        if all(isinstance(w, float) and w == 1.0 for w in row_weights):
            weight = tf.ones_like(joined)
        else:  # each sampled entry stands for its row's stride
            weight = per_entry(row_weights, tf.float32)
        counted = tf.math.unsorted_segment_sum(weight, ids, len(order) * width)
        row_of = {slot: k for k, slot in enumerate(order)}
        index = [row_of.get(slot, len(order)) for slot in range(num)]
        # the last row: a variable without a gradient
        rows = tf.concat([tf.reshape(counted, [len(order), width]), tf.zeros([1, width])], axis=axis)
        return tf.gather(rows, graph_constant(index, tf.int32), axis=axis)

    def fetch(self) -> tuple[tf.Tensor, ...]:
        """In-graph, for the recorder's single read: (step, counts, signed counts,
        bounds) of the last histogram step; the step is reset to -1 (none)."""
        state = self.state.read_value()
        fetched = (state[0], self.counts.read_value(), self.signed_counts.read_value(),
                   self.bounds.read_value())
        with tf.control_dependencies(list(fetched)):
            self.state.assign(tf.concat([tf.constant([-1], tf.int64), state[1:]], axis=0))
        return fetched

class ActivationProbe:
    """Activation-based dead units (opt-in, ``GradientMonitor(activation_probe=True)``).

    Wraps the ``call`` of every ReLU-family layer of the model (a Dense/Conv with
    ``activation="relu"``, a ``ReLU`` or ``Activation("relu")`` layer) for the
    duration of ``fit`` and counts, per unit (last axis), the consecutive training
    steps on which the unit's output was zero on every sample of the batch.  Each
    wrapped layer is reported on the topology layer that owns it (itself, or the
    nearest variable-owning layer before it: the Dense before a ``ReLU`` layer).
    The counting pauses while ``fit`` validates (``training`` flag).
    """

    def __init__(self, topology: Topology, layers: Sequence[tuple[Any, str]], strategy: Any = None):
        self.topology = topology
        index = topology.layer_positions()
        self.layers = [(layer, index[owner]) for layer, owner in layers if owner in index]
        self.training = replica_variable(np.array(True), "gradwatch_act_training", strategy)
        self.runs: list[Any] = []
        self._originals: list[tuple[Any, Any]] = []
        self._strategy = strategy

    def install(self) -> None:
        """Wraps each layer's ``call`` (an instance attribute; :meth:`remove` restores it)."""
        self.remove()
        if not self.runs:
            self.runs = [None] * len(self.layers)
        for k, (layer, _) in enumerate(self.layers):
            original = layer.call

            def call(*args, __original=original, __k=k, **kwargs):
                out = __original(*args, **kwargs)
                self._record(__k, out)
                return out

            self._originals.append((layer, original))
            layer.__dict__["call"] = call

    def remove(self) -> None:
        for layer, _ in self._originals:
            layer.__dict__.pop("call", None)
        self._originals = []

    def _record(self, k: int, out: Any) -> None:
        out = tf.convert_to_tensor(out)
        units = out.shape[-1]
        if units is None:
            return
        if self.runs[k] is None:
            self.runs[k] = replica_variable(np.zeros(int(units), np.int32), f"gradwatch_act_run_{k}",
                                            self._strategy)
        axes = list(range(len(out.shape) - 1))
        silent = tf.reduce_all(tf.equal(out, 0), axis=axes)
        run = self.runs[k].read_value()
        new = tf.where(silent, run + 1, 0)
        self.runs[k].assign(tf.where(self.training.read_value(), new, run))

    def read(self, dead_steps: int) -> np.ndarray:
        """Per topology layer: the fraction of its units silent for ``dead_steps`` steps (NaN if none)."""
        dead = np.full(len(self.topology.layers), np.nan)
        for (_, layer_index), run in zip(self.layers, self.runs):
            if run is None:
                continue
            fraction = float(np.mean(run.numpy() >= dead_steps))
            dead[layer_index] = fraction if np.isnan(dead[layer_index]) else max(dead[layer_index], fraction)
        return dead
