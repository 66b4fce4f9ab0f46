"""The array operations the window's fold is written against, for two libraries:
``TF`` (in-graph: a step that folds its own rows) and ``NP`` (numpy, on the host:
the rows a read fetched, folded on the writer thread with no graph to trace).

The fold is one implementation: its functions take one of these namespaces and call
only what it names. ``NP`` mirrors TensorFlow's semantics where numpy's differ
(a reduction over nothing, a segment with no entry, a division by zero is no error),
so that both give the same values (``tests/test_fold_rows.py`` checks it: numpy
against the graph).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

#: Up to this many values, a step block's transpose is a gather (``TensorOps.rows_to_columns``).
SMALL_TRANSPOSE = 16384


_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> {key: tensor name}


def graph_constant(value: Any, dtype: Any = tf.float32) -> tf.Tensor:
    """A constant of the graph being traced, made once per graph (and per cond branch,
    which is a graph of its own): pass it where TensorFlow would otherwise add a
    ``Const`` node for a Python number or list at each use (a reduction's axis, the 0 of
    a ``where``, a gather's indices).

    A graph's every node costs its first call here ~0.3-0.5 ms of trace and of
    optimization; about 40% of the nodes gradwatch added to a train step were such
    constants, one per use (``benchmarks/first_call_parts.py``). Made outside every
    control dependency, so that a constant first made under one does not carry it
    to its other uses. Eager: a plain constant."""
    if tf.executing_eagerly():
        return tf.constant(value, dtype)
    graph = tf.compat.v1.get_default_graph()
    cache = _CONSTANTS.setdefault(graph, {})
    dtype = tf.as_dtype(dtype)
    array = np.asarray(value, dtype.as_numpy_dtype)
    key = (array.tobytes(), array.shape, dtype.name)  # 0 and 0.0 alike, NaN found
    name = cache.get(key)
    if name is not None:
        return graph.get_tensor_by_name(name)
    with graph.control_dependencies(None):
        found = tf.constant(array, dtype)
    cache[key] = found.name  # a name, not the tensor: the tensor would keep its graph alive
    return found


def concat(values: Sequence[Any], axis: int = 0) -> tf.Tensor:
    """``values`` joined along ``axis`` (a ``graph_constant``), or the only one as it is
    (no node for a concatenation of one)."""
    return tf.concat(list(values), axis=graph_constant(axis, tf.int32)) if len(values) > 1 else values[0]


class TensorOps:
    """TensorFlow's operations, as the fold calls them (in-graph, or eager)."""

    float32, float64, int32, int64, bool = tf.float32, tf.float64, tf.int32, tf.int64, tf.bool
    abs = staticmethod(tf.abs)
    concat = staticmethod(tf.concat)
    cumsum = staticmethod(tf.cumsum)
    equal = staticmethod(tf.equal)
    expand_dims = staticmethod(tf.expand_dims)
    gather = staticmethod(tf.gather)
    is_finite = staticmethod(tf.math.is_finite)
    is_inf = staticmethod(tf.math.is_inf)
    is_nan = staticmethod(tf.math.is_nan)
    logical_not = staticmethod(tf.logical_not)
    maximum = staticmethod(tf.maximum)
    minimum = staticmethod(tf.minimum)
    not_equal = staticmethod(tf.not_equal)
    reduce_any = staticmethod(tf.reduce_any)
    reduce_max = staticmethod(tf.reduce_max)
    reduce_min = staticmethod(tf.reduce_min)
    reduce_sum = staticmethod(tf.reduce_sum)
    reshape = staticmethod(tf.reshape)
    sqrt = staticmethod(tf.sqrt)
    square = staticmethod(tf.square)
    squeeze = staticmethod(tf.squeeze)
    stack = staticmethod(tf.stack)
    where = staticmethod(tf.where)

    @staticmethod
    def constant(value: Any, dtype: Any = None) -> tf.Tensor:
        return tf.constant(value, dtype)

    @staticmethod
    def cast(value: Any, dtype: Any) -> tf.Tensor:
        return tf.cast(value, dtype)

    @staticmethod
    def arange(count: int, dtype: Any) -> tf.Tensor:
        return tf.range(count, dtype=dtype)

    @staticmethod
    def unstack(value: tf.Tensor, num: int | None = None, axis: int = 0) -> list[tf.Tensor]:
        return tf.unstack(value, num=num, axis=axis)

    @staticmethod
    def zeros(shape: Any, dtype: Any) -> tf.Tensor:
        return tf.zeros(shape, dtype)

    @staticmethod
    def zeros_like(value: Any, dtype: Any = None) -> tf.Tensor:
        return tf.zeros_like(value, dtype)

    @staticmethod
    def ones_like(value: Any, dtype: Any = None) -> tf.Tensor:
        return tf.ones_like(value, dtype)

    @staticmethod
    def full_like(value: Any, fill: float) -> tf.Tensor:
        return tf.fill(tf.shape(value), tf.constant(fill, value.dtype))

    @staticmethod
    def segment_sum(values: Any, ids: Any, count: int) -> tf.Tensor:
        return tf.math.unsorted_segment_sum(values, ids, count)

    @staticmethod
    def segment_max(values: Any, ids: Any, count: int) -> tf.Tensor:
        return tf.math.unsorted_segment_max(values, ids, count)

    @staticmethod
    def length(value: tf.Tensor) -> int:
        """The static length of the first axis."""
        return int(value.shape[0])

    @staticmethod
    def rank(value: tf.Tensor) -> int:
        return value.shape.rank

    @staticmethod
    def rows_to_columns(stacked: tf.Tensor) -> tf.Tensor:
        """[R, S, V] as [S, V, R]. Up to ``SMALL_TRANSPOSE`` values one gather: oneDNN's
        transpose of a few hundred values took ~0.15 ms more (a third of a small net's
        fold); of large blocks, far less."""
        num_rows, num_stats, num_vars = stacked.shape
        if num_rows is None or num_rows * num_stats * num_vars > SMALL_TRANSPOSE:
            return tf.transpose(stacked, [1, 2, 0])
        block = num_stats * num_vars
        at = tf.range(num_rows)[None, :] * block + tf.range(block)[:, None]
        return tf.reshape(tf.gather(tf.reshape(stacked, [-1]), at), [num_stats, num_vars, num_rows])


class NumpyOps:
    """numpy's operations with TensorFlow's semantics, as the fold calls them.
    Run under ``errors_ignored()``: TensorFlow divides by zero without a warning.

    The fold's arrays are small (a few hundred values): a call's cost is its Python
    overhead, so the reductions are ufunc methods and the stacks plain array
    constructions, not numpy's Python-level helpers (``np.stack``, ``np.max``,
    ``np.expand_dims``), which cost several times more a call here."""

    float32, float64, int32, int64, bool = np.float32, np.float64, np.int32, np.int64, np.bool_
    abs = staticmethod(np.abs)
    cumsum = staticmethod(np.cumsum)
    equal = staticmethod(np.equal)
    is_finite = staticmethod(np.isfinite)
    is_inf = staticmethod(np.isinf)
    is_nan = staticmethod(np.isnan)
    logical_not = staticmethod(np.logical_not)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    not_equal = staticmethod(np.not_equal)
    reshape = staticmethod(np.reshape)
    sqrt = staticmethod(np.sqrt)
    square = staticmethod(np.square)
    squeeze = staticmethod(np.squeeze)
    where = staticmethod(np.where)
    zeros = staticmethod(np.zeros)
    full_like = staticmethod(np.full_like)

    @staticmethod
    def zeros_like(value: Any, dtype: Any = None) -> np.ndarray:
        return np.zeros(np.shape(value), dtype or np.asarray(value).dtype)

    @staticmethod
    def ones_like(value: Any, dtype: Any = None) -> np.ndarray:
        return np.ones(np.shape(value), dtype or np.asarray(value).dtype)

    @staticmethod
    def expand_dims(value: Any, axis: int) -> np.ndarray:
        if axis < 0:
            return np.asarray(value)[(Ellipsis, None) + (slice(None),) * (-axis - 1)]
        return np.asarray(value)[(slice(None),) * axis + (None,)]

    @staticmethod
    def stack(values: list[Any], axis: int = 0) -> np.ndarray:
        stacked = np.array(values)
        return stacked if axis == 0 else np.moveaxis(stacked, 0, axis)

    @staticmethod
    def errors_ignored() -> Any:
        """The context a fold runs in: no warning for a division by zero or an inf - inf."""
        return np.errstate(all="ignore")

    @staticmethod
    def constant(value: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(value, dtype)

    @staticmethod
    def cast(value: Any, dtype: Any) -> np.ndarray:
        return np.asarray(value).astype(dtype, copy=False)

    @staticmethod
    def arange(count: int, dtype: Any) -> np.ndarray:
        return np.arange(count, dtype=dtype)

    @staticmethod
    def concat(values: list[Any], axis: int) -> np.ndarray:
        return np.concatenate(values, axis=axis)

    @staticmethod
    def gather(values: Any, index: Any) -> np.ndarray:
        return np.take(values, index, axis=0)

    @staticmethod
    def unstack(value: np.ndarray, num: int | None = None, axis: int = 0) -> list[np.ndarray]:
        value = np.asarray(value)
        parts = list(value if axis == 0 else np.moveaxis(value, axis, 0))
        if num is not None and len(parts) != num:
            raise ValueError(f"unstack: {len(parts)} parts, not {num}")
        return list(parts)

    @staticmethod
    def reduce_sum(value: Any, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        return np.add.reduce(value, axis=axis, keepdims=keepdims)

    @staticmethod
    def reduce_any(value: Any, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        return np.logical_or.reduce(value, axis=axis, keepdims=keepdims)

    @staticmethod
    def reduce_max(value: Any, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        value = np.asarray(value)
        return np.maximum.reduce(value, axis=axis, keepdims=keepdims, initial=_lowest(value.dtype))

    @staticmethod
    def reduce_min(value: Any, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        value = np.asarray(value)
        return np.minimum.reduce(value, axis=axis, keepdims=keepdims, initial=_highest(value.dtype))

    @staticmethod
    def segment_sum(values: Any, ids: np.ndarray, count: int) -> np.ndarray:
        return _segment_reduce(np.add, values, ids, count, 0)

    @staticmethod
    def segment_max(values: Any, ids: np.ndarray, count: int) -> np.ndarray:
        """A segment with no entry holds the dtype's lowest value, as TensorFlow's. A
        NaN entry is outside what the two agree on (TensorFlow's result then depends on
        the entries' order; numpy's is NaN): the fold masks NaN before every maximum."""
        values = np.asarray(values)
        return _segment_reduce(np.maximum, values, ids, count, _least_value(values.dtype))

    @staticmethod
    def length(value: np.ndarray) -> int:
        return int(np.shape(value)[0])

    @staticmethod
    def rank(value: np.ndarray) -> int:
        return np.ndim(value)

    @staticmethod
    def rows_to_columns(stacked: np.ndarray) -> np.ndarray:
        """[R, S, V] as [S, V, R]."""
        return np.transpose(stacked, (1, 2, 0))


def _segment_reduce(ufunc: np.ufunc, values: Any, ids: Any, count: int, empty: Any) -> np.ndarray:
    """``ufunc`` over the rows of each segment (``empty`` where a segment has none).

    The rows are gathered into a [most members, segments, ...] block padded with the
    ufunc's identity, then reduced along the members (the outer axis: a reduction
    along an inner one of two entries cost ~40 µs): ``ufunc.at`` cost ~0.15 ms and
    ``reduceat`` ~0.07 ms on a [300, 20] block of 150 segments, this ~11 µs.
    Segments of very unequal sizes (where the block would be mostly padding) take
    ``ufunc.at``."""
    values, ids = np.asarray(values), np.asarray(ids)
    index, missing = _segment_layout(ids.tobytes(), ids.dtype.str, count)
    if index is None:
        out = np.full((count,) + values.shape[1:], empty, values.dtype)
        ufunc.at(out, ids, values)
        return out
    identity = ufunc.identity if ufunc.identity is not None else _lowest(values.dtype)
    pad = np.full((1,) + values.shape[1:], identity, values.dtype)
    out = ufunc.reduce(np.concatenate([values, pad])[index], axis=0)
    if missing is not None:
        out[missing] = empty
    return out


@functools.lru_cache(maxsize=64)
def _segment_layout(ids_bytes: bytes, dtype: str, count: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """For segment ids (as bytes, for the cache): the [most members, count] gather index
    of each segment's rows in order, padded with the row past the last; and the mask
    of segments with no row (None: every segment has one). (None, None): the block
    would be mostly padding."""
    ids = np.frombuffer(ids_bytes, np.dtype(dtype)).astype(np.int64)
    sizes = np.bincount(ids, minlength=count)[:count]
    most = int(sizes.max()) if sizes.size else 0
    if count * max(most, 1) > 4 * ids.size + 64:
        return None, None
    order = np.argsort(ids, kind="stable")
    rank = np.arange(ids.size) - np.concatenate([[0], np.cumsum(sizes)[:-1]])[ids[order]]
    index = np.full((count, max(most, 1)), ids.size, np.int64)
    index[ids[order], rank] = order
    missing = sizes == 0
    return np.ascontiguousarray(index.T), (missing if missing.any() else None)


@functools.cache
def _least_value(dtype: np.dtype) -> Any:
    """The dtype's least finite value (TensorFlow's segment maximum of an empty segment)."""
    return np.finfo(dtype).min if dtype.kind == "f" else np.iinfo(dtype).min


@functools.cache
def _lowest(dtype: np.dtype) -> Any:
    """A reduction's start: -inf for floats (TensorFlow's max of nothing), else the least value."""
    if dtype.kind == "f":
        return -np.inf
    if dtype.kind == "b":
        return False
    return np.iinfo(dtype).min


@functools.cache
def _highest(dtype: np.dtype) -> Any:
    """A min reduction's start: inf for floats (TensorFlow's min of nothing), else the largest value."""
    if dtype.kind == "f":
        return np.inf
    if dtype.kind == "b":
        return True
    return np.iinfo(dtype).max


#: Either namespace: what a fold function's ``xp`` is.
ArrayOps = TensorOps | NumpyOps

TF = TensorOps()
NP = NumpyOps()
