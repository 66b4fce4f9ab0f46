"""``graph_constant``: one node per constant and graph. The host fold's numpy operations
(``array_ops.NP``) give TensorFlow's values (``array_ops.TF``) where the two libraries
differ: segments with no entry, segments of very unequal sizes (the padded gather's
fallback), reductions over nothing, non-finite entries."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from gradwatch._capture import array_ops
from gradwatch._capture.array_ops import NP, TF, graph_constant

pytestmark = pytest.mark.fast


def _segment_cases():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 3)).astype(np.float32)
    values[3, 1], values[7, 0], values[9, 2] = np.inf, -np.inf, np.nan
    return {
        "even": (values[:12], np.repeat(np.arange(6), 2).astype(np.int32), 6),
        "shuffled, two segments empty": (values[:12], rng.permutation(np.repeat([0, 2, 3, 5], 3))
                                         .astype(np.int32), 7),
        "one large segment": (values, np.concatenate([np.zeros(30), np.arange(1, 11)]).astype(np.int32), 11),
        "one row": (values[:1], np.array([2], np.int32), 4),
    }


@pytest.mark.parametrize("case", list(_segment_cases()))
@pytest.mark.parametrize("op", ["segment_sum", "segment_max"])
def test_segment_reductions_equal_tensorflows(case, op):
    values, ids, count = _segment_cases()[case]
    if op == "segment_max":  # the fold masks NaN before a maximum (TensorFlow's then depends on order)
        values = np.where(np.isnan(values), 0.5, values)
    expected = getattr(TF, op)(tf.constant(values), tf.constant(ids), count).numpy()
    with NP.errors_ignored():
        got = getattr(NP, op)(values, ids, count)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("op,dtype", [(op, dtype) for op in ("reduce_max", "reduce_min", "reduce_sum")
                                      for dtype in (np.float32, np.float64, np.int64)]
                         + [("reduce_any", np.bool_)])
def test_reductions_over_nothing_and_along_an_axis_equal_tensorflows(op, dtype):
    rng = np.random.default_rng(1)
    for shape, axis in (((0,), None), ((3, 0), -1), ((4, 5), -1), ((4, 5), 0)):
        values = (rng.normal(size=shape) * 10).astype(dtype)
        expected = getattr(TF, op)(tf.constant(values), axis=axis).numpy()
        got = getattr(NP, op)(values, axis=axis)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"{shape} axis {axis}")


def test_stacks_unstacks_and_the_block_transpose_equal_tensorflows():
    rng = np.random.default_rng(2)
    blocks = rng.normal(size=(5, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(NP.rows_to_columns(blocks), TF.rows_to_columns(tf.constant(blocks)).numpy())
    parts = [blocks[0], blocks[1]]
    for axis in (0, 1, 2):
        np.testing.assert_array_equal(NP.stack(parts, axis=axis), TF.stack(parts, axis=axis).numpy())
        for got, expected in zip(NP.unstack(blocks, axis=axis), TF.unstack(tf.constant(blocks), axis=axis)):
            np.testing.assert_array_equal(got, expected.numpy())
    for axis in (0, 1, -1, -2):
        np.testing.assert_array_equal(NP.expand_dims(blocks, axis), TF.expand_dims(blocks, axis).numpy())
    with pytest.raises(ValueError):
        NP.unstack(blocks, num=4)


def test_a_graph_constant_is_one_node_per_graph_and_branch_and_carries_no_dependency():
    v = tf.Variable(1.0)
    graphs = {}

    @tf.function(autograph=False)
    def step(x, flag):
        first = graph_constant(0.0)
        with tf.control_dependencies([v.assign_add(first)]):
            # made first under a dependency: the next uses must not carry it
            axis = graph_constant(1, tf.int32)
        again = graph_constant(0, tf.float32)  # 0 and 0.0 of one dtype: one node
        summed = tf.reduce_sum(x, axis=graph_constant(1, tf.int32))

        def branch():
            graphs["branch"] = tf.compat.v1.get_default_graph()
            return tf.reduce_max(x, axis=graph_constant(1, tf.int32)) + graph_constant(0.0)

        taken = tf.cond(flag, branch, lambda: summed)
        graphs["step"] = tf.compat.v1.get_default_graph()
        return first + again, axis, summed, taken, graph_constant([2, 3], tf.int32), graph_constant(
            float("nan")), graph_constant(float("nan"))

    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    zero, axis, summed, taken, pair, nan_a, nan_b = step(x, tf.constant(True))
    assert float(zero) == 0.0 and int(axis) == 1 and list(pair.numpy()) == [2, 3]
    np.testing.assert_array_equal(summed.numpy(), [3.0, 7.0])
    np.testing.assert_array_equal(taken.numpy(), [2.0, 4.0])
    assert np.isnan(float(nan_a)) and np.isnan(float(nan_b))
    operations = graphs["step"].get_operations()
    constants = [op for op in operations if op.type == "Const"]
    # 0.0, 1 (made under the dependency, without it), [2, 3], NaN: four constants
    assert len(constants) == 4, [op.name for op in constants]
    assert all(not op.control_inputs for op in constants)
    # the branch made its own constants (no capture of the step's)
    branch_constants = [op for op in graphs["branch"].get_operations() if op.type == "Const"]
    assert len(branch_constants) == 2
    # eager: a plain constant
    assert float(graph_constant(2.5)) == 2.5


def test_graph_constants_do_not_keep_a_graph_alive():
    graph = tf.Graph()
    with graph.as_default():
        graph_constant(1.0)
    assert graph in array_ops._CONSTANTS
    ref = weakref.ref(graph)
    del graph
    gc.collect()
    assert ref() is None
