"""Per-variable gradient statistics as pure, XLA-safe TensorFlow functions.

The statistics of a list of gradients are computed in as few ops as possible:
gradients with the same number of elements are stacked into one ``[n, size]``
matrix and reduced along axis 1, so a 100-layer net of equal-width layers costs
a handful of ops rather than a handful per variable.  Everything is computed in
float32 over the *finite* entries only (under XLA ``reduce_max`` silently drops
NaN, so NaN/Inf are masked and counted separately).  Squares are taken of the
raw magnitudes only while that is safe; when the largest magnitude is tiny or
huge the norm is recomputed on magnitudes scaled by their maximum, so float16,
bfloat16 and 1e30-sized float32 gradients neither overflow nor underflow.
The cheap every-step statistic is the plain sum of squares; ``full_stats``
(scaled, masked, exact for any input) runs on sampled steps and whenever the
cheap one cannot be trusted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from gradwatch._capture.array_ops import TF, ArrayOps, concat, graph_constant
from gradwatch._capture.keras_internals import cond, in_xla_context

# Above this sum of squares (max |g| > ~1e-12) no square that matters has
# underflowed; an overflowing sum shows as Inf. Outside, the full path rescales.
SAFE_MIN = 1e-12


class GradStats(NamedTuple):
    """Statistics of a list of gradients, each a float32 vector of length n."""

    l2: tf.Tensor  # L2 norm of the finite entries (NaN when every entry is NaN/Inf)
    max_abs: tf.Tensor  # max |g| of the finite entries (NaN when none)
    mean_abs: tf.Tensor  # sum |g| of finite entries / number of entries (NaN when none)
    zero_frac: tf.Tensor  # fraction of entries exactly 0
    nonfinite: tf.Tensor  # number of NaN/Inf entries


def summed_rows(grad: tf.IndexedSlices) -> tf.Tensor:
    """Returns the rows of a sparse gradient with repeated indices summed, as the
    dense gradient holds them (one row per touched index)."""
    unique_rows, positions = tf.unique(grad.indices)
    return tf.math.unsorted_segment_sum(grad.values, positions, tf.shape(unique_rows)[0])


def safe_norm(values: tf.Tensor, axis: int | None = None, xp: ArrayOps = TF) -> tf.Tensor:
    """Returns the L2 norm of ``values`` (any shape; along ``axis`` only if given),
    scaled by the largest entry so that squaring neither overflows nor underflows float32."""
    largest = xp.reduce_max(xp.abs(values), axis=axis, keepdims=axis is not None)
    scale = xp.where(largest > 0.0, largest, 1.0)
    norm = scale * xp.sqrt(xp.reduce_sum(xp.square(values / scale), axis=axis, keepdims=axis is not None))
    return norm if axis is None else xp.squeeze(norm, axis)


def dense_values(grad: tf.Tensor | tf.IndexedSlices) -> tuple[tf.Tensor, int]:
    """Returns a float32 vector of the gradient's non-implicit entries and its dense size.

    For ``IndexedSlices`` (e.g. from an ``Embedding``) repeated row indices are
    summed first, exactly as the dense gradient would hold them; rows that are
    not touched are implicit zeros and only counted through the dense size.
    """
    if isinstance(grad, tf.IndexedSlices):
        dense_shape = grad.dense_shape
        static = tf.get_static_value(dense_shape) if dense_shape is not None else None
        if static is None:
            static = grad.values.shape.as_list()
            static[0] = None
            raise ValueError(
                "gradwatch needs the static shape of a sparse gradient's variable; "
                f"got IndexedSlices with dense shape {static}, and its variable's shape is not "
                "fully defined. Give the variable a static shape."
            )
        size = math.prod(int(dim) for dim in static)
        return tf.reshape(tf.cast(summed_rows(grad), tf.float32), [-1]), size
    values, size = _unflattened(grad)
    return tf.reshape(values, [-1]), size


SAFE_MIN_SQ = SAFE_MIN * SAFE_MIN

# Gradients of equal size are stacked into one matrix only up to this many entries
# each: small variables are bound by the number of ops (stacking them saves ops),
# large ones by memory bandwidth (a stack would copy every entry once more).
STACK_LIMIT = 16384
# ... and a stacked matrix holds at most this many entries (more gradients of that
# size make several groups, each a buffer below the allocator's large-block
# threshold): a large fresh stack costs more to fill and square than the ops it
# saves (see benchmarks/README.md).
GROUP_LIMIT = 16384


class Group(NamedTuple):
    """Gradients of equal dense size stacked as rows of one matrix."""

    matrix: tf.Tensor  # [n, k] float32 (k < dense_size for sparse gradients)
    dense_size: int
    positions: tuple[int, ...]  # positions of the rows in the original list


class Groups(NamedTuple):
    groups: tuple[Group, ...]
    inverse: tuple[int, ...] | None  # gather indices back to list order (None: identity)
    count: int


def _unflattened(grad: tf.Tensor) -> tuple[tf.Tensor, int]:
    """A dense gradient as float32 in its own shape, and its size (``dense_values``
    before the reshape: a group reshapes once, not once per gradient)."""
    grad = tf.convert_to_tensor(grad)
    size = grad.shape.num_elements()
    if size is None:
        raise ValueError(f"gradwatch needs gradients of static shape; got shape {grad.shape}.")
    return tf.cast(grad, tf.float32), int(size)


def stack_chunks(positions: list[int], size: int) -> list[list[int]]:
    """``positions`` of tensors of ``size`` entries each, cut into stacks of at most
    ``GROUP_LIMIT`` entries (a tensor larger than that stays alone)."""
    per_group = max(1, GROUP_LIMIT // max(size, 1))
    return [positions[i:i + per_group] for i in range(0, len(positions), per_group)]


def group_gradients(grads: list[tf.Tensor | tf.IndexedSlices]) -> Groups:
    """Stacks gradients of equal shape so each statistic is one op per group."""
    flat = [dense_values(g) if isinstance(g, tf.IndexedSlices) else _unflattened(g) for g in grads]
    keys: dict[object, list[int]] = {}
    for position, (grad, (values, size)) in enumerate(zip(grads, flat)):
        if isinstance(grad, tf.IndexedSlices):
            key = ("sparse", position)
        elif size > STACK_LIMIT:
            key = ("dense", position)
        else:
            key = ("shape", tuple(values.shape))
        keys.setdefault(key, []).append(position)
    groups = []
    order: list[int] = []
    # Dense groups first, then sparse ones (whose row count is data-dependent).
    ordered_keys = sorted(keys, key=lambda key: isinstance(key, tuple) and key[0] == "sparse")
    chunks = []
    for key in ordered_keys:
        positions = keys[key]
        chunks += stack_chunks(positions, flat[positions[0]][1])
    for positions in chunks:
        shape = graph_constant([len(positions), -1], tf.int32)
        if len(positions) == 1:
            matrix = tf.reshape(flat[positions[0]][0], shape)
        else:
            matrix = tf.reshape(tf.stack([flat[p][0] for p in positions]), shape)
        groups.append(Group(matrix, flat[positions[0]][1], tuple(positions)))
        order.extend(positions)
    inverse = [0] * len(order)
    for slot, position in enumerate(order):
        inverse[position] = slot
    identity = inverse == list(range(len(order)))
    return Groups(tuple(groups), None if identity else tuple(inverse), len(order))


def _in_list_order(groups: Groups, parts: list[tf.Tensor]) -> tf.Tensor:
    joined = concat(parts)
    if groups.inverse is None:
        return joined
    return tf.gather(joined, graph_constant(groups.inverse, tf.int32), axis=graph_constant(0, tf.int32))


#: Under XLA a row's sums are taken over pieces of this many entries at most, and of
#: at least XLA_PIECE_MIN where the row is longer (``xla_piece``, ``row_sums``).
XLA_PIECE_MAX = 1024
XLA_PIECE_MIN = 128


def xla_piece(size: int) -> int | None:
    """The length of the pieces a row of ``size`` entries is cut into for its sums under
    XLA (``row_sums``): ``size`` itself up to ``XLA_PIECE_MAX``, else its largest divisor
    from ``XLA_PIECE_MIN`` to ``XLA_PIECE_MAX``; None when it has none."""
    if size <= XLA_PIECE_MAX:
        return size
    for width in range(XLA_PIECE_MAX, XLA_PIECE_MIN - 1, -1):
        if size % width == 0:
            return width
    return None


def _pieces_apply() -> bool:
    """Whether ``row_sums`` takes pieces under XLA: only when no GPU is visible (the
    step then runs on the CPU, where it was measured). A GPU may run a matrix product in
    TensorFloat-32 (Ampere and later, TensorFlow's default), whose inputs keep 10 bits
    of mantissa: a sum of squares there would be off by up to ~5e-4, and the norms are
    promised exact."""
    return not tf.config.list_logical_devices("GPU")


def row_sums(values: tf.Tensor, dense: bool = True) -> tf.Tensor:
    """Returns [rows]: the sums of each row of ``values`` ([rows, size]).

    Under XLA, for a ``dense`` matrix (a sparse gradient's rows are data-dependent, and
    its static shape may be a constant folding's, not XLA's), each row is cut into
    pieces of at most ``XLA_PIECE_MAX`` entries summed as a product with a vector of
    ones, then the pieces' sums alike: XLA's CPU backend fuses the elementwise work
    that makes ``values`` (a square, an ``abs``) into that matrix-vector product, one
    loop over the entries, where a long ``reduce_sum`` became a kernel that writes
    ``values`` out and a chain of reduce-windows over it (the MLP's 784 x 512 and
    512 x 512 sums of squares: ~0.02 ms against ~0.25 ms a step, benchmarks/README.md,
    fifteenth session). Only where no GPU is visible (``_pieces_apply``). Elsewhere one
    ``reduce_sum``."""
    axis = graph_constant(1, tf.int32)
    rows, size = values.shape
    known = dense and rows is not None and size is not None
    width = xla_piece(size) if known and in_xla_context() and _pieces_apply() else None
    if width is None:
        return tf.reduce_sum(values, axis=axis)
    sums = tf.linalg.matvec(tf.reshape(values, graph_constant([rows * (size // width), width], tf.int32)),
                            graph_constant(np.ones(width, np.float32)))
    if width == size:
        return sums
    per_row = tf.reshape(sums, graph_constant([rows, size // width], tf.int32))
    if size // width > XLA_PIECE_MAX:
        return tf.reduce_sum(per_row, axis=axis)
    return tf.linalg.matvec(per_row, graph_constant(np.ones(size // width, np.float32)))


def _is_dense(group: Group) -> bool:
    """Whether the group's matrix holds its gradients' every entry (a static width equal to
    the dense size): not a sparse gradient's touched rows, whose width is data-dependent."""
    return group.matrix.shape[1] is not None and int(group.matrix.shape[1]) == group.dense_size


def group_sum_of_squares(group: Group) -> tf.Tensor:
    """Returns [n]: the sum of g**2 of each row of a group, in one pass over the entries.

    A single row (every large gradient) is one ``L2Loss``: one threaded pass with no
    squared copy, the cheapest of the three ways measured (benchmarks/README.md).
    Under XLA a product with a vector of ones over pieces of the rows (``row_sums``).
    """
    matrix = group.matrix
    if matrix.shape[0] == 1 and not in_xla_context():
        return tf.reshape(graph_constant(2.0) * tf.nn.l2_loss(matrix), graph_constant([1], tf.int32))
    return row_sums(tf.square(matrix), _is_dense(group))


def sum_of_squares(groups: Groups) -> tf.Tensor:
    """The cheap every-step statistic: sum of g**2 per gradient (one pass).

    It is NaN/Inf when the gradient has a non-finite entry or overflows, and
    below ``SAFE_MIN_SQ`` when it may have underflowed: ``full_stats`` is then
    needed for an exact answer.
    """
    if not groups.count:
        return tf.zeros([0], tf.float32)
    return _in_list_order(groups, [group_sum_of_squares(g) for g in groups.groups])


def needs_full_stats(sum_sq: tf.Tensor, xp: ArrayOps = TF) -> tf.Tensor:
    """Per gradient: True where ``sqrt(sum_sq)`` is not the exact norm."""
    return xp.logical_not(xp.is_finite(sum_sq)) | (sum_sq < SAFE_MIN_SQ)


def _width_blocks(groups: Groups) -> tuple[list[tuple[tf.Tensor, list[Group]]], list[int] | None]:
    """The groups' rows merged by width for the careful pass outside XLA: the dense
    groups of one width as one matrix (a deep net's equal kernels are one reduction each,
    not one per kernel: the pass is traced with a few ops per width; under XLA
    ``row_layout`` takes every width at once), a
    sparse group (its width is data-dependent) alone. Returns the blocks and, per
    gradient in list order, its row among the blocks' rows (None: already in order)."""
    by_width: dict[object, list[int]] = {}
    for k, group in enumerate(groups.groups):
        by_width.setdefault(int(group.matrix.shape[1]) if _is_dense(group) else ("alone", k), []).append(k)
    starts = np.cumsum([0] + [len(g.positions) for g in groups.groups])
    blocks, merged = [], []  # merged: the joined row (groups in order) of each merged row
    for members in by_width.values():
        matrices = [groups.groups[k].matrix for k in members]
        blocks.append((concat(matrices),
                       [groups.groups[k] for k in members]))
        merged += [j for k in members for j in range(starts[k], starts[k + 1])]
    row_of = np.argsort(merged)  # the merged row of each joined row
    if groups.inverse is not None:
        row_of = row_of[list(groups.inverse)]
    return blocks, None if list(row_of) == list(range(groups.count)) else [int(r) for r in row_of]


#: Under XLA the rare passes read the gradients of up to XLA_ROW_MAX entries as rows of
#: XLA_ROW_WIDTH entries of one matrix (``xla_split``); a larger one stays a block of its own.
XLA_ROW_WIDTH = 256
XLA_ROW_MAX = 65536
#: ... when those smaller gradients have at least this many distinct widths: the rows
#: take a fixed ~10 kernels, a width block a few. The MLP's three small widths stay
#: blocks (rows gave it 3 kernels more and a sampled step ~0.5 ms slower under XLA).
XLA_ROWS_MIN_WIDTHS = 4


class RowLayout(NamedTuple):
    """Dense gradients as rows of one matrix (``xla_split``)."""

    rows: tf.Tensor  # [R, XLA_ROW_WIDTH] float32: each gradient's entries, then zeros to a whole row
    segments: tf.Tensor  # [R] int32: the joined position (groups in order) of each row's gradient
    padding: tf.Tensor  # [n] float32: the zeros each gradient's rows add
    count: int


class XlaSplit(NamedTuple):
    """A step's dense groups under XLA: the smaller gradients as rows, the larger as blocks."""

    rows: Groups  # in joined order (no inverse)
    layout: RowLayout
    blocks: Groups | None  # in joined order (no inverse)
    order: tf.Tensor | None  # gathers [rows' gradients, blocks' gradients] into the groups' joined order


def _row_layout(groups: Groups) -> RowLayout:
    width = XLA_ROW_WIDTH
    pieces, segments, padding = [], [], []
    for group in groups.groups:
        size = group.dense_size
        padded = -(-size // width) * width
        matrix = group.matrix
        if padded != size:
            matrix = tf.pad(matrix, graph_constant([[0, 0], [0, padded - size]], tf.int32))
        pieces.append(tf.reshape(matrix, graph_constant([-1, width], tf.int32)))
        for _ in group.positions:
            segments += [len(padding)] * (padded // width)
            padding.append(float(padded - size))
    rows = concat(pieces)
    return RowLayout(rows, graph_constant(np.asarray(segments, np.int32), tf.int32),
                     graph_constant(np.asarray(padding, np.float32)), len(padding))


def xla_split(groups: Groups) -> XlaSplit | None:
    """Under XLA, the dense groups' gradients of up to ``XLA_ROW_MAX`` entries as rows of
    one ``[R, XLA_ROW_WIDTH]`` matrix, each padded with zeros to whole rows, and the larger
    ones as blocks of their own; None elsewhere, with a sparse group, or with fewer than
    ``XLA_ROWS_MIN_WIDTHS`` distinct widths among the smaller ones.

    XLA generates machine code for each reduction it keeps (~22 ms a kernel at the first
    call here, ``benchmarks/xla_compile.py``), and a pass over width blocks takes a few
    reductions per distinct width: the transformer's careful pass was 68 kernels. Over
    one matrix each statistic is one row reduction and one small segment reduction of the
    rows, whatever the widths. The padding is below one row a gradient; it adds zeros,
    which the counts take back. A large gradient stays a block: XLA reduces one long
    array in parallel, and a reduction over joined, padded pieces does not (the MLP's
    finite pass took 2.9 ms over rows against 1.6 ms over blocks; the transformer's,
    whose gradients are small, 1.1 ms against 1.3 ms)."""
    if not groups.count or not in_xla_context():
        return None
    small, large = [], []
    for k, group in enumerate(groups.groups):
        if not _is_dense(group) or group.matrix.shape[0] is None:
            return None  # a sparse gradient's row count is data-dependent
        (small if group.dense_size <= XLA_ROW_MAX else large).append(k)
    if len({groups.groups[k].dense_size for k in small}) < XLA_ROWS_MIN_WIDTHS:
        return None

    def subset(members):
        chosen = tuple(groups.groups[k] for k in members)
        return Groups(chosen, None, sum(len(g.positions) for g in chosen))

    starts = np.cumsum([0] + [len(g.positions) for g in groups.groups])
    joined = [j for k in small + large for j in range(starts[k], starts[k + 1])]
    order = (None if joined == list(range(groups.count))
             else graph_constant(np.argsort(joined).astype(np.int32), tf.int32))
    rows = subset(small)
    return XlaSplit(rows, _row_layout(rows), subset(large) if large else None, order)


def _joined(groups: Groups, split: XlaSplit, from_rows: tf.Tensor, from_blocks: tf.Tensor | None
            ) -> tf.Tensor:
    """One statistic of the split's two parts (each in its joined order), in the groups' list order."""
    parts = [from_rows] if from_blocks is None else [from_rows, from_blocks]
    joined = concat(parts)
    if split.order is not None:
        joined = tf.gather(joined, split.order)
    return _in_list_order(groups, [joined])


def _segment_sums(layout: RowLayout, row_values: list[tf.Tensor]) -> list[tf.Tensor]:
    """Per gradient (joined order), the sums of each [R] vector of row values: in float64,
    so that adding up a large gradient's rows loses nothing a single reduction would not."""
    stacked = tf.cast(tf.stack(row_values, axis=1), tf.float64)
    sums = tf.math.unsorted_segment_sum(stacked, layout.segments, layout.count)
    return tf.unstack(tf.cast(sums, tf.float32), num=len(row_values), axis=1)


def _segment_max(layout: RowLayout, row_values: tf.Tensor) -> tf.Tensor:
    """Per gradient (joined order), the largest of its rows' values (0 for one of no entry)."""
    largest = tf.math.unsorted_segment_max(row_values, layout.segments, layout.count)
    return tf.maximum(largest, graph_constant(0.0))


def _joined_sizes(groups: Groups) -> np.ndarray:
    return np.array([float(g.dense_size) for g in groups.groups for _ in g.positions], np.float32)


def _scaled_row_sums(matrix: tf.Tensor, finite: tf.Tensor, magnitudes: tf.Tensor, row_scale: tf.Tensor,
                     dense: bool = True) -> list[tf.Tensor]:
    """The careful pass's four sums of each row of ``matrix``: squares and sum of its finite
    magnitudes divided by the row's scale, its finite entries, its entries not zero."""
    axis, zero = graph_constant(1, tf.int32), graph_constant(0.0)
    scaled = magnitudes / tf.expand_dims(row_scale, axis)
    return [row_sums(tf.square(scaled), dense), row_sums(scaled, dense),
            row_sums(tf.cast(finite, tf.float32), dense),
            row_sums(tf.cast(tf.not_equal(matrix, zero), tf.float32), dense)]


def _careful_stats(largest, scale, squares, sums, finite_count, nonzero, size, entries) -> GradStats:
    """The careful pass's statistics from its per-gradient figures (``size``: dense entries,
    ``entries``: the entries stored, fewer for a sparse gradient)."""
    # a norm over no finite entry is NaN, never 0: an all-NaN gradient is not a tiny one
    none_finite = tf.equal(finite_count, graph_constant(0.0)) & (entries > graph_constant(0.0))
    nan = graph_constant(float("nan"))
    return GradStats(
        l2=tf.where(none_finite, nan, scale * tf.sqrt(squares)),
        max_abs=tf.where(none_finite, nan, largest),
        # divided before scaled: 64 entries of 1e37 sum past float32's range
        mean_abs=tf.where(none_finite, nan, scale * (sums / size)),
        # the stored entries not zero are all that is not zero: a sparse gradient's
        # untouched rows are zeros its matrix does not hold
        zero_frac=(size - nonzero) / size,
        nonfinite=entries - finite_count,
    )


def _full_stats_by_rows(groups: Groups, layout: RowLayout) -> GradStats:
    """``full_stats`` over a row layout (joined order): the same statistics and the same
    scaling by each gradient's largest finite magnitude, in a fixed few reductions."""
    axis, zero, one = graph_constant(1, tf.int32), graph_constant(0.0), graph_constant(1.0)
    finite = tf.math.is_finite(layout.rows)
    magnitudes = tf.where(finite, tf.abs(layout.rows), zero)
    largest = _segment_max(layout, tf.reduce_max(magnitudes, axis=axis))
    scale = tf.where(largest > zero, largest, one)
    squares, sums, finite_count, nonzero = _segment_sums(layout, _scaled_row_sums(
        layout.rows, finite, magnitudes, tf.gather(scale, layout.segments)))
    finite_count -= layout.padding  # the padding's zeros are finite entries
    size = tf.constant(_joined_sizes(groups))
    return _careful_stats(largest, scale, squares, sums, finite_count, nonzero, size, size)


def full_stats(groups: Groups) -> GradStats:
    """Every statistic, exact for any input (NaN/Inf masked, no over/underflow).

    Sums of magnitudes scaled by their maximum neither overflow (a row of 1e37s) nor
    underflow (squares of 1e-25s); this runs on steps whose cheap norm is inexact. Under
    XLA the smaller gradients are read as rows (``xla_split``), the rest by width blocks."""
    if not groups.count:
        empty = tf.zeros([0], tf.float32)
        return GradStats(empty, empty, empty, empty, empty)
    split = xla_split(groups)
    if split is None:
        return _full_stats_by_blocks(groups)
    from_rows = _full_stats_by_rows(split.rows, split.layout)
    from_blocks = _full_stats_by_blocks(split.blocks) if split.blocks is not None else None
    return GradStats(*(_joined(groups, split, part, None if from_blocks is None else from_blocks[i])
                       for i, part in enumerate(from_rows)))


def _full_stats_by_blocks(groups: Groups) -> GradStats:
    blocks, row_of = _width_blocks(groups)
    axis, zero, one = graph_constant(1, tf.int32), graph_constant(0.0), graph_constant(1.0)
    reduced, sizes, stored = [], [], []
    for matrix, members in blocks:
        finite = tf.math.is_finite(matrix)
        magnitudes = tf.where(finite, tf.abs(matrix), zero)
        largest = tf.reduce_max(magnitudes, axis=axis)
        scale = tf.where(largest > zero, largest, one)
        dense = all(_is_dense(g) for g in members)
        sums = _scaled_row_sums(matrix, finite, magnitudes, scale, dense)
        reduced.append(tf.stack([largest, scale] + sums))
        sizes += [float(g.dense_size) for g in members for _ in g.positions]
        rows = sum(len(g.positions) for g in members)
        width = matrix.shape[1]
        # the entries each row stores: static but for a sparse gradient's
        stored.append([float(width)] * rows if width is not None
                      else tf.fill([rows], tf.cast(tf.shape(matrix)[1], tf.float32)))
    joined = concat(reduced, axis=1)
    if all(isinstance(part, list) for part in stored):
        entries = np.concatenate(stored).astype(np.float32)
        if row_of is not None:
            entries = entries[row_of]
        entries = tf.constant(entries)
    else:
        entries = tf.concat([tf.constant(part, tf.float32) if isinstance(part, list) else part
                             for part in stored], axis=0) if len(stored) > 1 else stored[0]
        if row_of is not None:
            entries = tf.gather(entries, graph_constant(row_of, tf.int32))
    if row_of is not None:
        joined = tf.gather(joined, graph_constant(row_of, tf.int32), axis=axis)
        sizes = [sizes[r] for r in row_of]
    largest, scale, squares, sums, finite_count, nonzero = tf.unstack(joined, num=6)
    size = tf.constant(sizes, tf.float32)
    return _careful_stats(largest, scale, squares, sums, finite_count, nonzero, size, entries)


def group_max_abs(groups: Groups) -> tf.Tensor:
    """Returns [n] in list order: each dense gradient's largest magnitude, what the
    careful pass's zero check and the finite pass share. Under XLA one reduction of
    ``abs`` per group or over the rows of ``xla_split`` (fused: one pass); else the
    larger of the row's max and minus its min, two reductions with no temporary (``abs``
    would write one). A NaN entry makes it NaN or a number; either way its sum of
    squares is NaN, which settles nothing."""
    if not groups.count:
        return tf.zeros([0], tf.float32)
    split = xla_split(groups)
    if split is None:
        return _max_abs_by_blocks(groups)
    axis = graph_constant(1, tf.int32)
    from_rows = _segment_max(split.layout, tf.reduce_max(tf.abs(split.layout.rows), axis=axis))
    return _joined(groups, split, from_rows,
                   _max_abs_by_blocks(split.blocks) if split.blocks is not None else None)


def _max_abs_by_blocks(groups: Groups) -> tf.Tensor:
    axis = graph_constant(1, tf.int32)
    if in_xla_context():
        largest = [tf.reduce_max(tf.abs(g.matrix), axis=axis) for g in groups.groups]
    else:
        largest = [tf.maximum(tf.reduce_max(g.matrix, axis=axis), -tf.reduce_min(g.matrix, axis=axis))
                   for g in groups.groups]
    return _in_list_order(groups, largest)


def finite_stats(groups: Groups, sum_sq: tf.Tensor, max_abs: tf.Tensor | None = None) -> GradStats:
    """``full_stats`` of dense gradients whose every sum of squares (``sum_sq``, in
    list order) is exact, as ``needs_full_stats`` says: every entry is then finite
    (one NaN or Inf makes its sum non-finite) and no square underflowed, so there is
    nothing to mask or rescale. The l2 is ``sqrt(sum_sq)`` and the rest takes one
    ``abs`` and three reductions per group (two with ``max_abs``, ``group_max_abs``
    in list order, given), against about fourteen passes over the entries in
    ``full_stats`` (the window's sampled step runs this one). The divisions by each
    gradient's size are one, after the groups are joined. Under XLA the smaller
    gradients are read as rows (``xla_split``)."""
    if not groups.count:
        empty = tf.zeros([0], tf.float32)
        return GradStats(empty, empty, empty, empty, empty)
    split = xla_split(groups)
    if split is None:
        largest, mean_abs, zero_frac = _finite_by_blocks(groups, max_abs is None)
    else:
        from_rows = _finite_by_rows(split.layout, _joined_sizes(split.rows), max_abs is None)
        from_blocks = (_finite_by_blocks(split.blocks, max_abs is None) if split.blocks is not None
                       else (None, None, None))
        largest, mean_abs, zero_frac = (
            None if rows is None else _joined(groups, split, rows, blocks)
            for rows, blocks in zip(from_rows, from_blocks))
    return GradStats(l2=tf.sqrt(sum_sq), max_abs=largest if max_abs is None else max_abs,
                     mean_abs=mean_abs, zero_frac=zero_frac, nonfinite=tf.zeros_like(sum_sq))


def _finite_by_rows(layout: RowLayout, sizes: np.ndarray, want_max: bool
                    ) -> tuple[tf.Tensor | None, tf.Tensor, tf.Tensor]:
    """(max_abs if wanted, mean_abs, zero_frac) in joined order, over a row layout."""
    axis, zero = graph_constant(1, tf.int32), graph_constant(0.0)
    magnitudes = tf.abs(layout.rows)
    sum_abs, zeros = _segment_sums(layout, [
        row_sums(magnitudes), row_sums(tf.cast(tf.equal(layout.rows, zero), tf.float32))])
    size = tf.constant(sizes)
    largest = _segment_max(layout, tf.reduce_max(magnitudes, axis=axis)) if want_max else None
    # the padding's zeros are not the gradient's
    return largest, sum_abs / size, (zeros - layout.padding) / size


def _finite_by_blocks(groups: Groups, want_max: bool) -> tuple[tf.Tensor | None, tf.Tensor, tf.Tensor]:
    """(max_abs if wanted, mean_abs, zero_frac) in list order, one reduction of each per group."""
    axis, zero = graph_constant(1, tf.int32), graph_constant(0.0)
    largest, sum_abs, zeros = [], [], []
    for group in groups.groups:
        magnitudes = tf.abs(group.matrix)
        if want_max:
            largest.append(tf.reduce_max(magnitudes, axis=axis))
        dense = _is_dense(group)
        sum_abs.append(row_sums(magnitudes, dense))
        counted = row_sums(tf.cast(tf.equal(group.matrix, zero), tf.float32), dense)
        if not dense:
            # a sparse gradient's untouched rows are zeros its matrix does not hold
            counted += float(group.dense_size) - tf.cast(tf.shape(group.matrix)[1], tf.float32)
        zeros.append(counted)
    size = _joined_sizes(groups)
    size = tf.constant(size if groups.inverse is None else size[list(groups.inverse)])
    return (_in_list_order(groups, largest) if want_max else None,
            _in_list_order(groups, sum_abs) / size, _in_list_order(groups, zeros) / size)


def settled_by_zeros(sum_sq: tf.Tensor, max_abs: tf.Tensor) -> tf.Tensor:
    """Whether ``sqrt(sum_sq)`` is every gradient's exact norm once the all-zero
    gradients are told apart (both in list order; ``max_abs`` from ``group_max_abs``):
    a sum of squares of 0 is exact when the largest magnitude is 0 too (a dead layer,
    and every layer below it), not when tiny entries underflowed. ``finite_stats`` is
    then exact too. False: ``full_stats`` is needed (a non-finite entry, or an underflow)."""
    zero = graph_constant(0.0)
    # a NaN has a NaN sum of squares, so an all-zero row here is one of zeros only
    zeros = tf.equal(sum_sq, zero) & tf.equal(max_abs, zero)
    return tf.reduce_all(zeros | tf.logical_not(needs_full_stats(sum_sq)))


def exact_norms(groups: Groups) -> tf.Tensor:
    """L2 norms, one cheap pass unless a norm needs the careful path."""
    if not groups.count:
        return tf.zeros([0], tf.float32)
    sum_sq = sum_of_squares(groups)
    inexact = needs_full_stats(sum_sq)
    careful = cond(
        tf.reduce_any(inexact), lambda: full_stats(groups).l2, lambda: tf.zeros_like(sum_sq)
    )
    return tf.where(inexact, careful, tf.sqrt(sum_sq))


def segment_norm(l2: tf.Tensor, segment_ids: tf.Tensor, num_segments: int,
                 present: tf.Tensor | None = None, xp: ArrayOps = TF) -> tf.Tensor:
    """Norm of each segment's concatenated parts, from the parts' norms (overflow-safe;
    along the first axis: a [V, R] block gives [num_segments, R]).

    NaN parts (no finite entry) are left out; a segment whose present parts are all NaN
    is NaN, one with an infinite part is Inf (a part overflowed float32)."""
    present = xp.ones_like(l2, xp.bool) if present is None else present
    values = xp.where(xp.is_finite(l2) & present, l2, 0.0)
    largest = xp.segment_max(values, segment_ids, num_segments)
    largest = xp.where(largest > 0.0, largest, 1.0)
    scaled = values / xp.gather(largest, segment_ids)
    norm = largest * xp.sqrt(xp.segment_sum(xp.square(scaled), segment_ids, num_segments))
    # per segment, in one reduction: has an Inf part, a NaN part, a part with a number
    nan = xp.is_nan(l2)
    flags = xp.cast(xp.stack([xp.is_inf(l2), nan, xp.logical_not(nan)], axis=1)
                    & present[:, None], xp.float32)
    has = xp.segment_max(flags, segment_ids, num_segments) > 0.0
    norm = xp.where(has[:, 0], float("inf"), norm)
    return xp.where(has[:, 1] & xp.logical_not(has[:, 2]), float("nan"), norm)


def gradient_stats(grads: list[tf.Tensor | tf.IndexedSlices]) -> GradStats:
    """Per-gradient statistics of a list of (non-None) gradients, in list order."""
    return full_stats(group_gradients(grads))


def global_norm(l2: tf.Tensor, present: tf.Tensor | None = None, xp: ArrayOps = TF) -> tf.Tensor:
    """Returns the global norm of per-variable norms [V] (overflow-safe; 0 for none; NaN
    when every present norm is NaN; Inf when one is); of each column of a [V, R] block."""
    if l2.shape[0] == 0:
        return xp.zeros(l2.shape[1:], xp.float32)
    present = xp.ones_like(l2, xp.bool) if present is None else present
    norm = safe_norm(xp.where(xp.is_finite(l2) & present, l2, 0.0), axis=0, xp=xp)
    nan = xp.is_nan(l2)
    norm = xp.where(xp.reduce_any(xp.is_inf(l2) & present, axis=0), float("inf"), norm)
    nan_only = (xp.reduce_any(nan & present, axis=0)
                & xp.logical_not(xp.reduce_any(xp.logical_not(nan) & present, axis=0)))
    return xp.where(nan_only, float("nan"), norm)


def layer_stats(
    var_stats: GradStats,
    present: tf.Tensor,
    segment_ids: tf.Tensor,
    sizes: tf.Tensor,
    num_layers: int,
    xp: ArrayOps = TF,
) -> tuple[GradStats, tf.Tensor]:
    """Aggregates per-variable statistics into per-layer ones (in-graph, few ops).

    Args:
        var_stats: statistics of every watched variable (absent ones are zeros): [V],
            or [V, R] for R steps at once.
        present: bool, shaped as the statistics: which variables had a gradient.
        segment_ids: int32 [V], the layer of each variable.
        sizes: float32 [V], number of entries of each variable.
        num_layers: number of layers.
        xp: the array operations (``array_ops``: in-graph, or numpy on the host).

    Returns:
        The layer statistics ([L] or [L, R]) and a bool of layers with any gradient.
    """
    sizes = xp.reshape(sizes, [-1] + [1] * (xp.rank(present) - 1))
    weight = sizes * xp.cast(present, xp.float32)
    layer_size = xp.segment_sum(weight, segment_ids, num_layers)
    safe_size = xp.where(layer_size > 0.0, layer_size, 1.0)
    # each variable's share of its layer's entries: a layer's mean is the sum of its
    # variables' means by share, which cannot overflow where the means do not
    share = weight / xp.gather(safe_size, segment_ids)
    l2 = segment_norm(var_stats.l2, segment_ids, num_layers, present, xp=xp)
    # a layer with no finite entry (every present norm NaN) has NaN statistics too
    none_finite = xp.is_nan(l2)
    max_abs = xp.maximum(xp.segment_max(
        xp.where(xp.is_nan(var_stats.max_abs), 0.0, var_stats.max_abs), segment_ids, num_layers), 0.0)
    max_abs = xp.where(none_finite, float("nan"), max_abs)
    var_mean_abs = xp.where(xp.is_nan(var_stats.mean_abs), 0.0, var_stats.mean_abs)
    mean_abs = xp.where(none_finite, float("nan"),
                        xp.segment_sum(var_mean_abs * share, segment_ids, num_layers))
    zero_frac = xp.segment_sum(var_stats.zero_frac * share, segment_ids, num_layers)
    nonfinite = xp.segment_sum(var_stats.nonfinite, segment_ids, num_layers)
    return GradStats(l2, max_abs, mean_abs, zero_frac, nonfinite), layer_size > 0.0
