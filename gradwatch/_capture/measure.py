"""What a step computes from its gradients' values: the sums of squares every step,
and the full statistics on the steps that need them, as one flat vector."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradwatch._capture import keras_internals as internals
from gradwatch._capture import stats as stats_lib
from gradwatch._capture.compiled import Compiler
from gradwatch._capture.layouts import RAW_STATS


def measure_gradients(stat_grads, sampled: tf.Tensor | None, compiler: Compiler
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
    index = np.zeros((len(RAW_STATS), groups.count), np.int64)
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

        full_pass = compiler.branch(("full", dense_info), full_pass)
        finite_pass = compiler.branch(("finite", dense_info), finite_pass)
        settled = compiler.branch(("settled", dense_info), settled)
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

def finish_stats(raw: tf.Tensor, inv_scale: tf.Tensor) -> tf.Tensor:
    """Returns [5, n]: l2, nonfinite, max_abs, mean_abs, zero_frac from ``RAW_STATS`` rows
    (norms divided by the loss scale through ``inv_scale``)."""
    squares, full_l2, max_abs, mean_abs, zero_frac, nonfinite = tf.unstack(raw, num=6)
    l2 = tf.where(stats_lib.needs_full_stats(squares), full_l2, tf.sqrt(squares))
    return tf.stack([l2 * inv_scale, nonfinite, max_abs * inv_scale, mean_abs * inv_scale, zero_frac])
