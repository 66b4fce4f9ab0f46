"""What a step computes from its gradients' values: the sums of squares every step,
and the full statistics on the steps that need them, as one flat vector."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradwatch._capture import keras_internals as internals
from gradwatch._capture import stats as stats_lib
from gradwatch._capture.array_ops import TF, ArrayOps, concat
from gradwatch._capture.array_ops import graph_constant as const
from gradwatch._capture.layouts import RAW_STATS


class _DensePasses:
    """The passes over a step's dense gradients, in a branch of the step that costs
    nothing when not taken (``internals.cond``): each gradient's largest magnitude
    (which settles an all-zero gradient), then the finite pass (the window's sampled
    step) or the full pass (an inexact sum of squares). Plain graph, not XLA calls (see
    ``rare``)."""

    def __init__(self, dense: list[stats_lib.Group]):
        self.groups = stats_lib.Groups(tuple(dense), None, sum(len(g.positions) for g in dense))
        self.info = tuple((g.dense_size, g.positions) for g in dense)
        self.count = self.groups.count

    def full(self):
        full = tf.stack(list(stats_lib.full_stats(self.groups)))
        return tf.reshape(full, const([-1], tf.int32)), tf.reduce_any(full[4] > const(0.0))

    def finite(self, sums, largest):
        finite = tf.stack(list(stats_lib.finite_stats(self.groups, sums, largest)))
        return tf.reshape(finite, const([-1], tf.int32)), const(False, tf.bool)

    def norms_only(self, sums):
        """A step not sampled keeps the l2 and the non-finite count only."""
        zeros = const(np.zeros(4 * self.count, np.float32))
        return tf.concat([tf.sqrt(sums), zeros], axis=const(0, tf.int32)), const(False, tf.bool)

    def rare(self, squares, sampled: tf.Tensor | None):
        """A step that is sampled or has an inexact norm. An inexact norm is mostly a
        zero one (a dead layer and every layer below it): each gradient's largest
        magnitude tells it from a non-finite entry or an underflow, which need the full
        pass (about fourteen passes over every gradient). The largest magnitudes serve
        the sampled step's finite pass too, so each pass is traced once and the zero
        check is no branch of its own (under XLA, one conditional and its kernels fewer).

        The passes were XLA calls on nets of 32 variables or more, when a branch not
        taken still cost a visit to each of its nodes. As plain graph in a functional
        ``If`` they cost nothing when not taken, the taken ones ran as fast or faster
        (step A/B, full steps: the 100-layer net's sampled step 1.175 against 1.257 of
        plain's, the 24-layer net's 1.192 against 1.213), and the first call no longer
        pays their XLA compiles (the 100-layer net 10.0 s against 14.4 s over plain's,
        the 24-layer net 3.3 s against 4.2 s; benchmarks/README.md, eighth session)."""
        largest = stats_lib.group_max_abs(self.groups)
        settled = stats_lib.settled_by_zeros(squares, largest)

        def exact():
            if sampled is None:  # the lean step
                return self.norms_only(squares)
            return internals.cond(sampled, lambda: self.finite(squares, largest),
                                  lambda: self.norms_only(squares))

        return internals.cond(settled, exact, self.full)


def _measure_dense(dense: list[stats_lib.Group], sampled: tf.Tensor | None, index: np.ndarray
                   ) -> tuple[list[tf.Tensor], tf.Tensor, int]:
    """Measures the dense gradients; fills their columns of ``index``. Returns the
    pieces, whether one was non-finite, and the pieces' length."""
    # one pass per gradient: an L2Loss for a large one, a row reduction per group
    # of stacked small ones
    sum_sq = [stats_lib.group_sum_of_squares(g) for g in dense]
    squares = concat(sum_sq)
    passes = _DensePasses(dense)
    count = passes.count
    # The full pass runs on a step whose cheap norm is not exact and not only zeros;
    # the window's sampled step otherwise runs the finite pass (a third of the work);
    # the other steps keep the sums of squares. The conds are in the graph, not in an
    # XLA cluster: a conditional there would take every gradient on every step.
    inexact = tf.reduce_any(stats_lib.needs_full_stats(squares))
    skipped = lambda: (const(np.zeros(5 * count, np.float32)), const(False, tf.bool))  # noqa: E731
    rare = inexact if sampled is None else sampled | inexact  # the lean step is never sampled
    full, nonfinite = internals.cond(rare, lambda: passes.rare(squares, sampled), skipped)
    columns = [p for _, pos in passes.info for p in pos]
    for j, position in enumerate(columns):
        index[0, position] = j
        index[1:, position] = count + np.arange(5) * count + j
    return [squares, full], nonfinite, len(RAW_STATS) * count


def _measure_sparse(group: stats_lib.Group, sampled: tf.Tensor | None) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Measures a sparse gradient's touched rows (repeated indices summed; their count
    is data-dependent, so no XLA call): the sum of squares every step, the other
    statistics as a dense gradient's (the finite pass on the window's sampled step,
    the full pass when the sum of squares is not exact). Returns its pieces (sums of
    squares, then the five statistics, zeros where not measured) and whether an entry
    was non-finite. Its full statistics every step cost the transformer benchmark's
    embedding ~0.6 ms a step."""
    m = len(group.positions)
    groups = stats_lib.Groups((group,), None, m)
    squares = tf.reduce_sum(tf.square(group.matrix), axis=const(1, tf.int32))
    inexact = tf.reduce_any(stats_lib.needs_full_stats(squares))

    def full():
        stats = tf.stack(list(stats_lib.full_stats(groups)))
        return tf.reshape(stats, const([-1], tf.int32)), tf.reduce_any(stats[4] > const(0.0))

    def finite():
        finite = tf.stack(list(stats_lib.finite_stats(groups, squares)))
        return tf.reshape(finite, const([-1], tf.int32)), const(False, tf.bool)

    def skipped():
        return const(np.zeros(5 * m, np.float32)), const(False, tf.bool)

    exact = skipped if sampled is None else (lambda: internals.cond(sampled, finite, skipped))
    stats, nonfinite = internals.cond(inexact, full, exact)
    return [squares, stats], nonfinite


#: Under XLA a sparse gradient (an embedding's) is measured as the dense gradient it
#: stands for when that holds at most XLA_DENSE_LIMIT entries (4 MiB of float32), or
#: at most XLA_DENSE_RATIO times its slices' values: XLA's ``unique`` (a sort) and
#: segment sum cost the transformer benchmark's embedding (4,096 slices of a 2,000 x 64
#: table) ~2.2 ms a step on this CPU, a scatter into the dense table and its sum of
#: squares ~0.17 ms. A larger table stays sparse.
XLA_DENSE_LIMIT = 1 << 20
XLA_DENSE_RATIO = 4


def _dense_under_xla(grad):
    """``grad``, or under XLA the dense gradient a small enough ``IndexedSlices`` stands
    for (repeated rows summed, untouched rows zero: the same statistics)."""
    if not isinstance(grad, tf.IndexedSlices) or not internals.in_xla_context():
        return grad
    shape = tf.get_static_value(grad.dense_shape) if grad.dense_shape is not None else None
    if shape is None:
        return grad
    # the slices' count is often unknown when traced (a tf.data batch of unknown size)
    sliced = grad.values.shape.num_elements()
    limit = max(XLA_DENSE_LIMIT, XLA_DENSE_RATIO * sliced) if sliced is not None else XLA_DENSE_LIMIT
    if int(np.prod(shape)) > limit:
        return grad
    return tf.math.unsorted_segment_sum(grad.values, grad.indices, int(shape[0]))


def gradient_groups(stat_grads) -> stats_lib.Groups:
    """The groups ``measure_gradients`` measures ``stat_grads`` by (equal shapes stacked;
    under XLA a small sparse gradient as the dense one it stands for)."""
    return stats_lib.group_gradients([_dense_under_xla(g) for g in stat_grads])


def measure_gradients(stat_grads, sampled: tf.Tensor | None, groups: stats_lib.Groups | None = None
                      ) -> tuple[tf.Tensor, np.ndarray, tf.Tensor]:
    """Measures a step's gradients: all a step does with their values.

    Args:
        stat_grads: the gradients (loss-scaled, global under several replicas).
        sampled: whether this is the window's sampled step; None on the lean step.
        groups: ``gradient_groups(stat_grads)``, when the caller has them already.

    Returns:
        (flat, index, nonfinite): the raw statistics as one float32 vector, where
        ``index[r, k]`` (static, ``RAW_STATS`` x n) locates row r of the k-th gradient
        (the sum of squares, then l2, max_abs, mean_abs, zero_frac, nonfinite, zeros
        on steps that do not compute them); and whether a gradient had a non-finite
        entry. ``finish_stats`` turns the rows into statistics when the step is folded.
    """
    groups = groups if groups is not None else gradient_groups(stat_grads)
    dense = [g for g in groups.groups if g.matrix.shape.is_fully_defined()]
    sparse = [g for g in groups.groups if not g.matrix.shape.is_fully_defined()]
    pieces, flags, offset = [], [], 0
    index = np.zeros((len(RAW_STATS), groups.count), np.int64)
    if dense:
        dense_pieces, nonfinite, offset = _measure_dense(dense, sampled, index)
        pieces += dense_pieces
        flags.append(nonfinite)
    for g in sparse:
        sparse_pieces, nonfinite = _measure_sparse(g, sampled)
        pieces += sparse_pieces
        flags.append(nonfinite)
        m = len(g.positions)
        for t, position in enumerate(g.positions):
            index[:, position] = offset + np.arange(len(RAW_STATS)) * m + t
        offset += len(RAW_STATS) * m
    flat = concat(pieces)
    nonfinite_step = flags[0] if len(flags) == 1 else tf.reduce_any(tf.stack(flags))
    return flat, index, nonfinite_step


def finish_stats(raw: tf.Tensor, inv_scale: tf.Tensor, xp: ArrayOps = TF) -> tf.Tensor:
    """Returns [5, n]: l2, nonfinite, max_abs, mean_abs, zero_frac from ``RAW_STATS`` rows
    (norms divided by the loss scale through ``inv_scale``)."""
    squares, full_l2, max_abs, mean_abs, zero_frac, nonfinite = xp.unstack(raw, num=6)
    l2 = xp.where(stats_lib.needs_full_stats(squares, xp), full_l2, xp.sqrt(squares))
    return xp.stack([l2 * inv_scale, nonfinite, max_abs * inv_scale, mean_abs * inv_scale, zero_frac])
