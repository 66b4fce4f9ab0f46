"""Property-based tests of the statistics against numpy: random shapes, dtypes,
zeros, huge and tiny values, NaN/Inf mixes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import np_stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch._capture import stats as stats_lib

pytestmark = pytest.mark.fast

DTYPES = {
    "float16": (np.float16, 6e4),
    "bfloat16": (np.float32, 1e37),  # drawn as float32, cast to bfloat16 in TF
    "float32": (np.float32, 1e37),
    "float64": (np.float64, 1e37),
}


@st.composite
def gradients(draw):
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    np_dtype, largest = DTYPES[dtype_name]
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7))
    magnitude = draw(st.sampled_from([1e-30, 1e-8, 1.0, 1e8, largest]))
    elements = st.one_of(
        st.just(0.0),
        st.floats(-1.0, 1.0, allow_nan=False, width=32),
        st.sampled_from([np.nan, np.inf, -np.inf]),
    )
    unit = draw(hnp.arrays(np.float64, shape, elements=elements))
    values = (unit * magnitude).astype(np_dtype)
    if dtype_name == "float16":
        values = np.nan_to_num(values, nan=np.nan, posinf=np.inf, neginf=-np.inf)
    return dtype_name, values


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(gradients(), min_size=1, max_size=4))
def test_statistics_match_numpy(draws):
    grads = []
    references = []
    for dtype_name, values in draws:
        tensor = tf.cast(tf.constant(values), dtype_name)
        grads.append(tensor)
        # The reference sees the values gradwatch measures: statistics are float32,
        # so float64 gradients are rounded to float32 first (below ~1e-45 they are 0).
        seen = tf.cast(tf.cast(tensor, tf.float32), tf.float64) if dtype_name == "float64" else tensor
        references.append(np_stats(tf.cast(seen, tf.float64).numpy()))
    result = stats_lib.gradient_stats(grads)
    for i, reference in enumerate(references):
        if not np.isfinite(reference["l2"]) or reference["l2"] > 3e38:
            continue  # beyond float32: not representable, see test_stats
        assert float(result.l2[i]) == pytest.approx(reference["l2"], rel=1e-4, abs=1e-37)
        assert float(result.max_abs[i]) == pytest.approx(reference["max_abs"], rel=1e-6, abs=1e-37)
        assert float(result.mean_abs[i]) == pytest.approx(reference["mean_abs"], rel=1e-4, abs=1e-37)
        assert float(result.zero_frac[i]) == pytest.approx(reference["zero_frac"], abs=1e-6)
        assert float(result.nonfinite[i]) == reference["nonfinite"]
    # the cheap per-step norm is exact whenever it claims to be
    groups = stats_lib.group_gradients(grads)
    sum_sq = stats_lib.sum_of_squares(groups).numpy()
    inexact = stats_lib.needs_full_stats(tf.constant(sum_sq)).numpy()
    for i, reference in enumerate(references):
        if not inexact[i]:
            assert np.sqrt(sum_sq[i]) == pytest.approx(reference["l2"], rel=1e-4)
