"""gradwatch._capture.stats against numpy, eager, in graph and under XLA."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import np_stats

from gradwatch._capture import stats as stats_lib

pytestmark = pytest.mark.fast

FIELDS = ("l2", "max_abs", "mean_abs", "zero_frac", "nonfinite")


def _check(grads, result, rel=1e-5):
    for i, grad in enumerate(grads):
        dense = np.asarray(tf.convert_to_tensor(grad), dtype=np.float64)
        expected = np_stats(dense)
        for field in FIELDS:
            got = float(getattr(result, field)[i])
            assert got == pytest.approx(expected[field], rel=rel, abs=1e-30), (i, field)


def _mixed_grads():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 5)).astype("float32")
    a[0, :] = 0.0
    b = rng.normal(size=(35,)).astype("float32")  # same size as a: stacked together
    c = rng.normal(size=(3,)).astype("float32")
    d = np.array([1.0, np.nan, -2.0, np.inf, 0.0], "float32")
    return [tf.constant(a), tf.constant(b), tf.constant(c), tf.constant(d)]


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_stats_match_numpy(mode):
    grads = _mixed_grads()
    fn = stats_lib.gradient_stats
    if mode == "graph":
        fn = tf.function(fn)
    elif mode == "xla":
        fn = tf.function(fn, jit_compile=True)
    _check(grads, fn(grads))


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_finite_stats_equal_full_stats_when_every_cheap_norm_is_exact(mode):
    # the window's sampled step takes finite_stats when no sum of squares needs the
    # careful path: stacked small gradients, a zero row, a large single gradient, and
    # gradients of one shape apart in the list
    rng = np.random.default_rng(5)
    a = rng.normal(size=(7, 5)).astype("float32")
    a[:, 2] = 0.0
    b = np.zeros(35, "float32")
    b[3] = -2.5
    c = (rng.normal(size=(300, 70)) * 1e-3).astype("float32")  # above STACK_LIMIT: alone
    d = rng.normal(size=(3,)).astype("float32") * 1e4
    e = rng.normal(size=(7, 5)).astype("float32")  # stacked with a: the groups are not in list order
    grads = [tf.constant(x) for x in (a, b, c, d, e)]
    assert stats_lib.group_gradients(grads).inverse is not None

    def passes(grads):
        groups = stats_lib.group_gradients(grads)
        sums = stats_lib.sum_of_squares(groups)
        # alone, and with the largest magnitudes the careful pass's zero check took
        return (stats_lib.finite_stats(groups, sums), stats_lib.finite_stats(groups, sums,
                                                                              stats_lib.group_max_abs(groups)),
                stats_lib.full_stats(groups))

    fn = tf.function(passes, jit_compile=(mode == "xla"))
    finite, shared, full = fn(grads)
    sums = stats_lib.sum_of_squares(stats_lib.group_gradients(grads))
    assert not stats_lib.needs_full_stats(sums).numpy().any()
    for result in (finite, shared):
        _check(grads, result)
        for field in FIELDS:
            np.testing.assert_allclose(getattr(result, field).numpy(), getattr(full, field).numpy(),
                                       rtol=2e-6, err_msg=field)


def test_under_xla_the_rare_passes_read_the_smaller_gradients_as_padded_rows():
    # Under XLA the careful pass, the finite pass and the largest magnitudes read the
    # gradients of up to XLA_ROW_MAX entries as one [R, XLA_ROW_WIDTH] matrix, each padded
    # to whole rows (a fixed few reductions whatever the widths), and a larger one as a
    # block: the padding's zeros are no gradient's zeros or finite entries, a gradient's
    # many rows add up in float64 to numpy's figures, and each keeps its place in the list.
    rng = np.random.default_rng(11)
    large = (rng.normal(size=(784, 512)) * rng.uniform(0.1, 10.0, size=(784, 1))).astype("float32")
    large[::7] = 0.0  # over XLA_ROW_MAX: a block
    odd = rng.normal(size=(3, 37)).astype("float32")  # 111 entries: one row, 145 zeros of padding
    odd[0, :5] = 0.0
    broken = rng.normal(size=(300,)).astype("float32")  # two rows, one partly padding
    broken[[3, 299]] = [np.nan, np.inf]
    tiny = (rng.normal(size=(3, 37)) * 1e-30).astype("float32")  # stacked with odd: squares underflow
    # 250 rows, one entry 1e5 times the rest: scaled by it, each later row's sum of squares
    # is below half of float32's spacing at 1, so a float32 sum of the rows would drop them
    spike = np.full((250, 256), 0.1, "float32")
    spike[0, 0] = 1e4
    spike[5, 5] = np.nan
    assert spike.size <= stats_lib.XLA_ROW_MAX < large.size
    bias = rng.normal(size=(64,)).astype("float32")  # a fourth width of the smaller ones
    grads = [tf.constant(g) for g in (odd, large, broken, tiny, spike, bias)]
    groups = stats_lib.group_gradients(grads)
    assert groups.inverse is not None  # odd and tiny are one group: not in list order

    @tf.function(jit_compile=True, autograph=False)
    def passes(grads):
        groups = stats_lib.group_gradients(grads)
        split = stats_lib.xla_split(groups)
        assert split is not None and split.blocks is not None  # the large one is a block
        sums = stats_lib.sum_of_squares(groups)
        return (stats_lib.full_stats(groups), stats_lib.finite_stats(groups, sums),
                stats_lib.group_max_abs(groups))

    full, finite, largest = passes(grads)
    _check(grads, full, rel=1e-6)
    for k in (0, 1, 5):  # the gradients whose sums of squares are exact
        expected = np_stats(np.asarray(grads[k], np.float64))
        for field in FIELDS:
            assert float(getattr(finite, field)[k]) == pytest.approx(expected[field], rel=1e-6), (k, field)
        assert float(largest[k]) == expected["max_abs"]
    assert float(largest[3]) == pytest.approx(np.abs(tiny).max(), rel=1e-6)
    assert stats_lib.xla_split(groups) is None  # eagerly, outside XLA: the width blocks

    @tf.function(jit_compile=True, autograph=False)
    def three_widths(grads):  # the MLP's case: fewer widths than rows pay for
        return stats_lib.xla_split(stats_lib.group_gradients(grads)) is None

    assert three_widths(grads[:5])


def test_nan_is_masked_under_xla_and_counted():
    grads = [tf.constant([np.nan, 3.0, -4.0, np.inf], tf.float32)]
    result = tf.function(stats_lib.gradient_stats, jit_compile=True)(grads)
    assert float(result.l2[0]) == pytest.approx(5.0)
    assert float(result.max_abs[0]) == pytest.approx(4.0)
    assert float(result.nonfinite[0]) == 2.0


def test_order_is_kept_when_groups_interleave():
    sizes = [4, 9, 4, 2, 9, 4]
    rng = np.random.default_rng(2)
    grads = [tf.constant(rng.normal(size=s).astype("float32") * (i + 1)) for i, s in enumerate(sizes)]
    _check(grads, stats_lib.gradient_stats(grads))


def test_large_gradients_are_not_stacked_and_their_norms_are_exact():
    # Above STACK_LIMIT entries each gradient is its own group (a stack would copy it);
    # small ones of equal size still share one matrix.
    rng = np.random.default_rng(3)
    big = stats_lib.STACK_LIMIT + 1
    grads = [tf.constant(rng.normal(size=big).astype("float32") * s) for s in (1.0, 3.0)]
    grads += [tf.constant(rng.normal(size=4).astype("float32")) for _ in range(3)]
    groups = stats_lib.group_gradients(grads)
    assert [g.positions for g in groups.groups] == [(0,), (1,), (2, 3, 4)]
    norms = tf.sqrt(stats_lib.sum_of_squares(groups)).numpy()
    expected = [np.linalg.norm(np.asarray(g, np.float64)) for g in grads]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    _check(grads, stats_lib.gradient_stats(grads))



@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_the_careful_pass_merges_groups_of_one_width_and_keeps_each_gradients_numbers(mode):
    # Large gradients of one size are groups of their own (no stack each step); the
    # careful pass reduces them as one matrix, whose rows go back to list order.
    rng = np.random.default_rng(6)
    big = stats_lib.STACK_LIMIT + 1
    first = rng.normal(size=big).astype("float32")
    first[[5, 70]] = [np.nan, np.inf]
    tiny = (rng.normal(size=big) * 1e-30).astype("float32")  # squares underflow
    third = rng.normal(size=big).astype("float32") * 1e3
    third[:100] = 0.0
    small = rng.normal(size=3).astype("float32")
    grads = [tf.constant(x) for x in (small, first, np.zeros(3, "float32"), tiny, third)]
    groups = stats_lib.group_gradients(grads)
    assert len(groups.groups) == 4  # the three large ones apart, the small ones stacked
    blocks, row_of = stats_lib._width_blocks(groups)
    assert sorted(len(members) for _, members in blocks) == [1, 3]
    assert row_of is not None  # list order differs from the merged rows'
    fn = tf.function(stats_lib.gradient_stats, jit_compile=mode == "xla")
    _check(grads, fn(grads))

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_low_precision_and_huge_values_do_not_overflow(dtype):
    big = {"float16": 60000.0, "bfloat16": 1e38, "float32": 1e30, "float64": 1e30}[dtype]
    values = np.array([big, -big, big / 2, 0.0], np.float64)
    grad = tf.cast(tf.constant(values), dtype)
    result = stats_lib.gradient_stats([grad])
    reference = np_stats(np.asarray(tf.cast(grad, tf.float64)))
    assert np.isfinite(float(result.l2[0]))
    assert float(result.l2[0]) == pytest.approx(reference["l2"], rel=1e-3 if dtype != "float32" else 1e-5)



def test_a_mean_magnitude_whose_sum_overflows_float32_stays_exact():
    # 64 entries of 1e37 sum to 6.4e38, past float32's 3.4e38; their mean is 1e37, in a
    # variable (the careful pass) and in a layer of two such variables (hypothesis found
    # the first: mean_abs was inf)
    values = np.full((8, 8), 1e37, np.float32)
    values[0, 0] = -1e37
    var_stats = stats_lib.gradient_stats([tf.constant(values), tf.constant(values)])
    assert float(var_stats.mean_abs[0]) == pytest.approx(1e37, rel=1e-5)
    layer, _ = stats_lib.layer_stats(var_stats, tf.constant([True, True]), tf.constant([0, 0]),
                                     tf.constant([64.0, 64.0]), 1)
    assert float(layer.mean_abs[0]) == pytest.approx(1e37, rel=1e-5)
    assert float(layer.max_abs[0]) == pytest.approx(1e37, rel=1e-6)

def test_tiny_values_do_not_underflow():
    grad = tf.constant(np.full(1000, 1e-25, np.float32))
    result = stats_lib.gradient_stats([grad])
    assert float(result.l2[0]) == pytest.approx(1e-25 * np.sqrt(1000), rel=1e-4)
    assert float(result.mean_abs[0]) == pytest.approx(1e-25, rel=1e-4)


def test_indexed_slices_match_the_dense_gradient():
    values = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3) - 5.0)
    indices = tf.constant([2, 7, 2, 0])  # row 2 twice: the dense gradient sums them
    sparse = tf.IndexedSlices(values, indices, dense_shape=tf.constant([10, 3]))
    dense = tf.convert_to_tensor(sparse)
    result = stats_lib.gradient_stats([sparse, tf.constant([1.0, 2.0])])
    _check([dense, tf.constant([1.0, 2.0])], result)


def test_finite_stats_count_a_sparse_gradients_untouched_rows_as_zeros():
    # constant indices in a tf.function give the summed rows a static shape: the
    # gradient then takes the dense passes, whose zero fraction must count the rows
    # the slices leave out
    values = np.array([[1.0, -1.0, 0.0], [2.0, 2.0, 2.0], [0.5, 0.5, 0.5]], "float32")

    def sparse():
        return tf.IndexedSlices(tf.constant(values), tf.constant([4, 1, 4]), dense_shape=tf.constant([50, 3]))

    @tf.function
    def finite():
        groups = stats_lib.group_gradients([sparse()])
        assert all(g.matrix.shape.is_fully_defined() for g in groups.groups)
        return stats_lib.finite_stats(groups, stats_lib.sum_of_squares(groups))

    _check([sparse()], finite())


@pytest.mark.parametrize("indices", ["constant", "fed"])
def test_watch_zero_fraction_of_an_embedding_gradient(tmp_path, indices):
    import gradwatch as gw

    table = tf.Variable(tf.reshape(tf.range(400, dtype=tf.float32), [100, 4]) / 400.0, name="table")
    log_dir = str(tmp_path / indices)
    watch = gw.Watch(log_dir=log_dir, log_every=1, histogram_every=1)

    def gradient(rows):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(tf.gather(table, rows)))
        return tape.gradient(loss, [table])

    if indices == "constant":
        step = tf.function(lambda: watch.observe(gradient(tf.constant([1, 2, 2, 7])), [table]))
    else:
        step = tf.function(lambda rows: watch.observe(gradient(rows), [table]),
                           input_signature=[tf.TensorSpec([None], tf.int32)])
    (grad,) = step() if indices == "constant" else step(tf.constant([1, 2, 2, 7]))
    watch.step_end()
    watch.close()
    assert isinstance(grad, tf.IndexedSlices)
    expected = np_stats(tf.convert_to_tensor(grad).numpy())
    assert expected["zero_frac"] == pytest.approx(1.0 - 3 * 4 / 400)  # 3 rows touched
    row = gw.read_stats(log_dir).set_index("variable").loc["table"]
    for field in FIELDS:
        assert row[field] == pytest.approx(expected[field], rel=1e-6), field


def test_watch_embedding_windows_hold_every_steps_norm_and_their_first_steps_statistics(tmp_path):
    # A window of 3 steps: the sparse gradient's norm on every step (repeated rows, a
    # NaN on step 5, which is no window's first), its max, mean and zero fraction from
    # the window's first step (the sampled one), as for a dense gradient.
    import gradwatch as gw

    values = np.reshape(np.arange(400, dtype=np.float32), [100, 4]) / 400.0
    values[50, 2] = np.nan
    table = tf.Variable(values, name="table")
    log_dir = str(tmp_path / "run")
    watch = gw.Watch(log_dir=log_dir, log_every=3, histogram_every=0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def step(rows):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(tf.gather(table, rows)))
        return watch.observe(tape.gradient(loss, [table]), [table])

    dense = []
    with pytest.warns(RuntimeWarning, match="Non-finite gradient at step 5"):
        for rows in ([1, 2, 2, 7], [3], [5, 5, 5, 9, 9], [0, 1], [99, 50, 1, 1], [4]):
            (grad,) = step(tf.constant(rows))
            watch.step_end()
            assert isinstance(grad, tf.IndexedSlices)
            dense.append(np_stats(tf.convert_to_tensor(grad).numpy()))
        watch.close()
    stats = gw.read_stats(log_dir)
    assert list(stats.step) == [3, 6]
    for w, row in enumerate(stats.to_dict("records")):
        steps = dense[3 * w:3 * w + 3]
        norms = [s["l2"] for s in steps]
        assert row["l2"] == pytest.approx(norms[-1], rel=1e-6)
        assert row["l2_max"] == pytest.approx(max(norms), rel=1e-6)
        assert row["l2_min"] == pytest.approx(min(norms), rel=1e-6)
        assert row["l2_mean"] == pytest.approx(np.mean(norms), rel=1e-6)
        for field in ("max_abs", "mean_abs", "zero_frac"):
            assert row[field] == pytest.approx(steps[0][field], rel=1e-6), (w, field)
        assert row["nonfinite"] == sum(s["nonfinite"] for s in steps)
    assert list(stats.nonfinite) == [0, 1]


def test_eager_watch_takes_an_embeddings_sparse_gradient(log_dir):
    # eager observe runs a tf.function that receives the IndexedSlices: its dense
    # shape is then a tensor, and the variable's static shape stands in for it
    import keras

    import gradwatch as gw

    keras.utils.set_random_seed(0)
    embedding = keras.layers.Embedding(60, 3)
    ids = np.array([[3, 5, 5], [59, 0, 3]])
    embedding(ids)
    variables = embedding.trainable_variables
    with gw.Watch(log_dir=log_dir, log_every=1, histogram_every=1) as watch:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(embedding(ids) ** 3)
        grads = tape.gradient(loss, variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        watch.observe(grads, variables)
        watch.step_end()
    expected = np_stats(tf.convert_to_tensor(grads[0]).numpy())
    assert expected["zero_frac"] == pytest.approx(1.0 - 4 / 60)
    (row,) = gw.read_stats(log_dir).to_dict("records")
    for field in FIELDS:
        assert row[field] == pytest.approx(expected[field], rel=1e-6), field


def test_global_norm_is_overflow_safe():
    l2 = tf.constant([3e30, 4e30], tf.float32)
    assert float(stats_lib.global_norm(l2)) == pytest.approx(5e30, rel=1e-6)


def test_layer_stats_aggregate_variables():
    rng = np.random.default_rng(3)
    kernels = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
    kernels[1][1] = 0.0
    other = rng.normal(size=(3, 2)).astype("float32")
    grads = [tf.constant(k) for k in kernels] + [tf.constant(other)]
    var_stats = stats_lib.gradient_stats(grads)
    layer, present = stats_lib.layer_stats(
        var_stats,
        tf.constant([True, True, True]),
        tf.constant([0, 0, 1]),
        tf.constant([12.0, 3.0, 6.0]),
        2,
    )
    joined = np.concatenate([kernels[0].ravel(), kernels[1].ravel()])
    reference = np_stats(joined)
    for field in FIELDS:
        assert float(getattr(layer, field)[0]) == pytest.approx(reference[field], rel=1e-5)
    assert float(layer.l2[1]) == pytest.approx(np.linalg.norm(other), rel=1e-5)
    assert bool(present[0]) and bool(present[1])


def test_many_equal_gradients_make_bounded_groups_with_exact_norms():
    # Gradients of one size are stacked GROUP_LIMIT entries at a time, in list order;
    # every norm is still its own gradient's.
    rng = np.random.default_rng(4)
    size = 4096
    count = 2 * (stats_lib.GROUP_LIMIT // size) + 1
    grads = [tf.constant(rng.normal(size=(64, 64)).astype("float32") * (i + 1)) for i in range(count)]
    groups = stats_lib.group_gradients(grads)
    per_group = stats_lib.GROUP_LIMIT // size
    assert [len(g.positions) for g in groups.groups] == [per_group, per_group, 1]
    assert [p for g in groups.groups for p in g.positions] == list(range(count))
    norms = tf.sqrt(stats_lib.sum_of_squares(groups)).numpy()
    expected = [np.linalg.norm(np.asarray(g, np.float64)) for g in grads]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    _check(grads, stats_lib.gradient_stats(grads))


def test_under_xla_sums_of_squares_are_taken_over_pieces_of_each_row():
    # Under XLA a row's squares are summed in pieces of at most XLA_PIECE_MAX entries (a
    # product with a vector of ones, which XLA's CPU backend fuses with the square); a
    # size with no divisor from XLA_PIECE_MIN up keeps the plain reduction. Each norm is
    # still its own gradient's: stacked rows cut into several pieces each, rows of one
    # piece, a large gradient, a size with no such divisor.
    assert stats_lib.xla_piece(10) == 10
    assert stats_lib.xla_piece(784 * 512) == 1024
    assert stats_lib.xla_piece(3 * 3 * 32 * 64) == 1024
    assert stats_lib.xla_piece(1500) == 750
    assert stats_lib.xla_piece(2 * 1031) is None
    rng = np.random.default_rng(5)
    shapes = [(32, 64)] * 3 + [(300,)] * 2 + [(784, 512), (2 * 1031,), (1500,), (10,)]
    grads = [tf.constant(rng.normal(size=shape).astype("float32") * (i + 1))
             for i, shape in enumerate(shapes)]
    groups = stats_lib.group_gradients(grads)
    assert sorted(len(g.positions) for g in groups.groups) == [1, 1, 1, 1, 2, 3]

    @tf.function(jit_compile=True, autograph=False)
    def sums():
        return stats_lib.sum_of_squares(stats_lib.group_gradients(grads))

    expected = [np.sum(np.square(np.asarray(g, np.float64))) for g in grads]
    np.testing.assert_allclose(sums().numpy(), expected, rtol=1e-6)


def test_scalar_and_equal_size_gradients_of_other_shapes_group_correctly():
    # A scalar gradient (a learned temperature, say) groups alone; gradients of equal
    # size but different shape are stacked only with their own shape.
    grads = [tf.constant(3.0), tf.constant([[1.0, 2.0], [3.0, 4.0]]), tf.constant([1.0, -2.0, 2.0, 0.0]),
             tf.constant(-4.0), tf.constant([[0.5, 0.5], [0.5, 0.5]])]
    groups = stats_lib.group_gradients(grads)
    assert sorted(g.positions for g in groups.groups) == [(0, 3), (1, 4), (2,)]
    norms = tf.sqrt(stats_lib.sum_of_squares(groups)).numpy()
    np.testing.assert_allclose(norms, [3.0, np.sqrt(30.0), 3.0, 4.0, 1.0], rtol=1e-6)
    _check(grads, stats_lib.gradient_stats(grads))


@pytest.mark.parametrize("jit", [False, True])
def test_zero_gradients_settle_their_sums_of_squares_and_underflows_do_not(jit):
    """``settled_by_zeros``: True when every sum of squares is exact once all-zero
    gradients are told apart (by their largest magnitude, ``group_max_abs``: a max and
    a min, or under XLA one reduction of ``abs``); False for an underflow (a lone tiny
    value of either sign) or a non-finite entry, which need the full statistics."""
    def settled(*grads):
        tensors = [tf.constant(np.asarray(g, np.float32)) for g in grads]

        @tf.function(jit_compile=jit, autograph=False)
        def check(*tensors):
            groups = stats_lib.group_gradients(list(tensors))
            sums = stats_lib.sum_of_squares(groups)
            return stats_lib.settled_by_zeros(sums, stats_lib.group_max_abs(groups))

        return bool(check(*tensors))

    normal, zero = [1.0, -2.0, 0.0], [0.0, 0.0, 0.0]
    assert settled(normal, normal)
    assert settled(zero, normal)
    assert settled(zero, zero, np.zeros((70, 300)))  # a large one alone, small ones stacked
    assert not settled(zero, [0.0, -1e-30, 0.0])
    assert not settled([0.0, 1e-30, 0.0], normal)
    assert not settled(zero, [0.0, np.nan, 0.0])
    assert not settled([np.inf, 0.0, 0.0])
    assert settled(np.full((70, 300), 1e-14))  # sum of squares 2.1e-24: exact
    assert not settled(np.full((70, 300), 1e-15))  # 2.1e-26, below SAFE_MIN_SQ: may have underflowed


def test_subnormal_gradients_read_as_zero_as_the_readme_says():
    # TensorFlow's CPU kernels flush denormals to zero: documented, not worked around
    import os

    grad = tf.constant(np.array([1e-40, -2e-40, 3e-39, 0.0], "float32"))
    assert np.count_nonzero(grad.numpy()) == 3  # the values themselves are there
    result = stats_lib.gradient_stats([grad])
    assert float(result.l2[0]) == 0.0 and float(result.max_abs[0]) == 0.0
    assert float(result.zero_frac[0]) == 1.0
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert "Subnormal gradient entries (below ~1.2e-38 in float32) read as zero" in text


@pytest.mark.parametrize("sampled", [True, False])
def test_a_steps_careful_pass_places_each_gradient_where_its_list_puts_it(sampled):
    # measure_gradients hands the careful pass the dense groups and each sparse one
    # with their places in the step's list (an embedding after a dense layer): a step
    # with a NaN in each kind takes that pass, and every column holds its own numbers.
    from gradwatch._capture.layouts import RAW_STATS
    from gradwatch._capture.measure import finish_stats, measure_gradients

    rng = np.random.default_rng(7)
    first = rng.normal(size=(4, 3)).astype("float32")
    table = np.zeros((6, 3), "float32")
    rows = rng.normal(size=(2, 3)).astype("float32")
    rows[1, 2] = np.nan
    last = rng.normal(size=(5,)).astype("float32") * 1e-20  # its square underflows
    sparse = tf.IndexedSlices(tf.constant(rows), tf.constant([4, 1]), tf.constant([6, 3]))
    table[[4, 1]] = rows

    @tf.function(autograph=False)
    def step():
        flat, index, nonfinite = measure_gradients(
            [tf.constant(first), sparse, tf.constant(last)], tf.constant(sampled))
        raw = tf.reshape(tf.gather(flat, tf.constant(index.reshape(-1), tf.int32)), [len(RAW_STATS), 3])
        return finish_stats(raw, tf.constant(1.0)), nonfinite

    finished, nonfinite = step()
    assert bool(nonfinite)
    for k, dense in enumerate((first, table, last)):
        expected = np_stats(np.asarray(dense, np.float64))
        assert float(finished[0, k]) == pytest.approx(expected["l2"], rel=1e-5, abs=1e-30), k
        assert float(finished[1, k]) == expected["nonfinite"], k
        for row, field in ((2, "max_abs"), (3, "mean_abs"), (4, "zero_frac")):  # the careful pass's
            assert float(finished[row, k]) == pytest.approx(expected[field], rel=1e-5, abs=1e-30), (k, field)


def test_a_full_step_traces_each_pass_once(monkeypatch):
    # The window's sampled step and a settled inexact step share one finite pass, and
    # the careful pass is traced once too: a trace's length is part of a fit's start.
    from gradwatch._capture.measure import measure_gradients

    traced = {"finite_stats": 0, "full_stats": 0, "settled_by_zeros": 0, "group_max_abs": 0}
    for name in traced:
        original = getattr(stats_lib, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            traced[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(stats_lib, name, counted)
    grads = [tf.zeros([3, 2]), tf.ones([5])]
    tf.function(lambda s: measure_gradients(grads, s)[0], autograph=False
                ).get_concrete_function(tf.TensorSpec([], tf.bool))
    assert traced == {"finite_stats": 1, "full_stats": 1, "settled_by_zeros": 1, "group_max_abs": 1}


@pytest.mark.parametrize(("rows", "known_slices"), [(6, True), (6, False), (350_000, True)])
def test_an_embeddings_gradient_under_xla_has_the_dense_gradients_statistics(rows, known_slices):
    # Under XLA a small table's sparse gradient is measured as the dense one it stands
    # for (XLA's unique is a sort: slow), also when the slices' count is unknown when
    # traced (a tf.data batch); a table over XLA_DENSE_LIMIT entries and XLA_DENSE_RATIO
    # times its slices stays sparse. Either way every statistic is the dense gradient's,
    # repeated rows summed.
    from gradwatch._capture import measure
    from gradwatch._capture.layouts import RAW_STATS

    rng = np.random.default_rng(8)
    indices = np.array([4, 1, 4, 0, 1], np.int32)
    values = rng.normal(size=(5, 3)).astype("float32")
    values[3] = 0.0
    table = np.zeros((rows, 3), np.float64)
    np.add.at(table, indices, values.astype(np.float64))
    assert (rows * 3 > measure.XLA_DENSE_LIMIT) == (rows == 350_000)
    kept_sparse = []

    @tf.function(jit_compile=True, autograph=False, input_signature=[
        tf.TensorSpec([], tf.bool), tf.TensorSpec([5 if known_slices else None, 3], tf.float32)])
    def step(sampled, slices):
        sparse = tf.IndexedSlices(slices, tf.constant(indices), tf.constant([rows, 3]))
        kept_sparse.append(isinstance(measure._dense_under_xla(sparse), tf.IndexedSlices))
        flat, index, _ = measure.measure_gradients([tf.ones([2, 2]), sparse], sampled)
        raw = tf.reshape(tf.gather(flat, tf.constant(index.reshape(-1), tf.int32)), [len(RAW_STATS), 2])
        return measure.finish_stats(raw, tf.constant(1.0))

    expected = np_stats(table)
    not_sampled, sampled = step(tf.constant(False), values), step(tf.constant(True), values)
    assert set(kept_sparse) == {rows == 350_000}
    assert float(not_sampled[0, 1]) == pytest.approx(expected["l2"], rel=1e-5)
    for row, field in enumerate(("l2", "nonfinite", "max_abs", "mean_abs", "zero_frac")):
        assert float(sampled[row, 1]) == pytest.approx(expected[field], rel=1e-5, abs=1e-12), field
