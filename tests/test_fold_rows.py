"""The host read folds a window's buffered rows in one call, every row at once
(``StepFolder.fold`` over a [columns, rows] block: last values, the window's
sampled step, the first non-finite step, counts once per step, the loss tracker's
deltas). Folding the same rows one at a time, in order, must give the same
accumulators, whatever the rows hold: non-finite and underflowed norms, absent
gradients, several observations of one step, skipped and clipped steps, and losses
given, unknown or from a tracker that is reset and goes non-finite."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradwatch._capture import model_topology
from gradwatch._capture.accumulate import StepFolder
from gradwatch._capture.array_ops import NP
from gradwatch._capture.layouts import (
    LOSS_GIVEN,
    LOSS_UNKNOWN,
    STEP_SCALARS,
    STEP_VALUES,
    WINDOW_COLUMNS,
    WINDOW_GLOBALS,
)
from gradwatch._capture.window import Window

pytestmark = pytest.mark.fast

CAPACITY = 12


def _rows(rng, num_vars, first_step):
    """CAPACITY random rows and their step numbers (a row continues its step a quarter
    of the time), and the tracker's totals they end with."""
    values = np.zeros((CAPACITY, len(STEP_VALUES), num_vars), np.float32)
    scalars = np.zeros((CAPACITY, len(STEP_SCALARS)), np.float32)
    steps = np.zeros(CAPACITY, np.int64)
    step, total, count = first_step, 0.0, 0.0
    for r in range(CAPACITY):
        new = r == 0 or rng.random() > 0.25
        step += int(new)
        steps[r] = step
        squares = rng.exponential(2.0, num_vars).astype(np.float32)
        kind = rng.random(num_vars)
        squares[kind < 0.1] = np.nan
        squares[(kind >= 0.1) & (kind < 0.18)] = np.inf
        squares[(kind >= 0.18) & (kind < 0.25)] = 1e-40  # underflowed: the full pass's norm counts
        full = np.sqrt(np.abs(rng.normal(size=num_vars))).astype(np.float32)
        full[rng.random(num_vars) < 0.2] = np.nan  # no finite entry
        values[r] = [squares, full, rng.exponential(1, num_vars), rng.exponential(1, num_vars),
                     rng.random(num_vars), np.where(np.isfinite(squares), 0, rng.integers(1, 4, num_vars)),
                     rng.uniform(0.2, 1.0, num_vars), rng.random(num_vars) < 0.3, rng.random(num_vars) < 0.85]
        kind = rng.random()
        if kind < 0.5:  # a tracker's (total, count), reset now and then
            if rng.random() < 0.15:
                total, count = 0.0, 0.0
            total += float(rng.normal()) * 4 if rng.random() > 0.05 else np.nan
            count += 4
            loss = (total, count)
        elif kind < 0.75:
            loss = (float(rng.normal()) if rng.random() > 0.1 else np.inf, LOSS_GIVEN)
        else:
            loss = (np.nan, LOSS_UNKNOWN)
        scale = np.nan if rng.random() < 0.5 else 2.0 ** rng.integers(0, 8)
        scalars[r] = [*loss, rng.random(), scale, rng.random(), rng.random() < 0.1, new]
    return np.concatenate([values.reshape(CAPACITY, -1), scalars], axis=1), steps


def _numpy_fold(folder):
    """The host's fold: the same fold in numpy (what a read's rows go through)."""
    def fold(var_acc, global_acc, rows, steps, count, loss_prev):
        with NP.errors_ignored():
            args = [np.asarray(a) for a in (var_acc, global_acc, rows, steps, count, loss_prev)]
            return tuple(tf.constant(v) for v in folder.fold(*args, xp=NP))
    return fold


@pytest.mark.parametrize("host", [False, True], ids=["graph", "numpy"])
@pytest.mark.parametrize("clipping", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_folded_at_once_equal_rows_folded_one_at_a_time(seed, clipping, host):
    # numpy: the host's fold of the rows at once against the graph's, one row at a time
    rng = np.random.default_rng(seed)
    num_vars = int(rng.integers(2, 7))
    variables = [tf.Variable(np.zeros((2, 3), np.float32)) for _ in range(num_vars)]
    names = [f"layer{rng.integers(0, 3)}/v{i}" for i in range(num_vars)]
    topology = model_topology.from_variables(variables, names)
    window = Window(num_vars + len(topology.layers))
    folder = StepFolder(topology, window, clipping)
    fold = tf.function(folder.fold, autograph=False)
    fold_at_once = _numpy_fold(folder) if host else fold

    at_once = (tf.constant(window._var_reset), tf.constant(window._global_reset), tf.zeros([2], tf.float64))
    one_by_one = at_once
    first_step, events = 0, 0
    folded = []  # the live rows since the last reset, for numpy's counts
    for window_number in range(4):
        if window_number == 2:  # a read: the next window starts from the reset accumulators
            at_once = one_by_one = (tf.constant(window._var_reset), tf.constant(window._global_reset),
                                    at_once[2])
            folded = []
        count = int(rng.integers(1, CAPACITY + 1))
        rows, steps = _rows(rng, num_vars, first_step)
        first_step = int(steps[count - 1])
        folded += [(rows[r], int(steps[r])) for r in range(count)]
        # the rows past count are stale: the fold at once must leave them out
        at_once = fold_at_once(at_once[0], at_once[1], tf.constant(rows), tf.constant(steps),
                               tf.constant(count, tf.int64), at_once[2])
        for r in range(count):
            one_by_one = fold(one_by_one[0], one_by_one[1], tf.constant(rows[r:r + 1]),
                              tf.constant(steps[r:r + 1]), tf.constant(1, tf.int64), one_by_one[2])
        # float32 statistics of a [V, R] block and of [V, 1] ones may differ in the last bit
        for name, got, expected in zip(
                ("columns", "globals", "loss totals"), at_once, one_by_one):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, equal_nan=True,
                                       err_msg=f"{name}, window {window_number}")
        _assert_counts_once_per_step(WINDOW_GLOBALS.unpack_numpy(at_once[1].numpy()), folded, num_vars,
                                     clipping)
        events += int(WINDOW_GLOBALS.unpack_numpy(at_once[1].numpy())["first_nonfinite_step"] >= 0)
    # the rows took the paths worth testing
    final = WINDOW_GLOBALS.unpack_numpy(at_once[1].numpy())
    assert events >= 1 and final["steps"] >= 2 and final["loss_count"] >= 1
    columns = WINDOW_COLUMNS.unpack_numpy(at_once[0].numpy().reshape(len(WINDOW_COLUMNS), -1))
    assert np.all(columns["grad_steps"] >= 1)


def _assert_counts_once_per_step(globals_, folded, num_vars, clipping):
    """numpy's counts of the folded rows: steps, and the steps (not rows) with a
    non-finite gradient, a skipped update or a clip that fired; the first non-finite step."""
    block = len(STEP_VALUES) * num_vars
    flagged = {"nonfinite_steps": set(), "skipped_steps": set(), "clip_fired_steps": set()}
    new_steps = 0
    for row, step in folded:
        values = row[:block].reshape(len(STEP_VALUES), num_vars)
        scalars = dict(zip(STEP_SCALARS.names, row[block:]))
        new_steps += int(scalars["new_step"] > 0.5)
        if np.any(values[STEP_VALUES.index("nonfinite")] > 0):
            flagged["nonfinite_steps"].add(step)
        if scalars["skipped"] > 0.5:
            flagged["skipped_steps"].add(step)
        if clipping and np.any(values[STEP_VALUES.index("clip_fired")] > 0):
            flagged["clip_fired_steps"].add(step)
    assert globals_["steps"] == new_steps
    for name, steps in flagged.items():
        assert globals_[name] == len(steps), name
    first = min(flagged["nonfinite_steps"], default=-1)
    assert globals_["first_nonfinite_step"] == first


@pytest.mark.parametrize("num_vars,num_rows", [(3, 4), (40, 60)])
def test_split_rows_gives_each_value_block_as_numpy_does(num_vars, num_rows):
    # a small block is split with a gather, a large one (over SMALL_TRANSPOSE) with a transpose
    from gradwatch._capture.array_ops import SMALL_TRANSPOSE
    from gradwatch._capture.layouts import StepRow

    layout = StepRow(num_vars)
    block = len(STEP_VALUES) * num_vars
    assert (num_rows * block <= SMALL_TRANSPOSE) == (num_vars == 3)
    rows = np.random.default_rng(num_vars).normal(size=(num_rows, layout.width)).astype(np.float32)
    values, scalars = layout.split_rows(tf.constant(rows))
    expected = rows[:, :block].reshape(num_rows, len(STEP_VALUES), num_vars).transpose(1, 2, 0)
    for s, name in enumerate(STEP_VALUES.names):
        np.testing.assert_array_equal(values[name].numpy(), expected[s])
    for j, name in enumerate(STEP_SCALARS.names):
        np.testing.assert_array_equal(scalars[name].numpy(), rows[:, block + j])
