"""CSV sink and readers: headers, append/resume, torn lines, refusals."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import gradwatch as gw
from gradwatch._io.schema import STATS_COLUMNS, WINDOW_COLUMNS


def _run(log_dir, steps, append=False, names=("layer/w",), log_every=2, scale=1.0):
    variables = [tf.Variable(np.ones(3, "float32")) for _ in names]
    with gw.Watch(log_dir=log_dir, log_every=log_every, append=append, names=list(names)) as watch:
        for i in range(steps):
            watch.observe([tf.fill([3], scale * (i + 1.0)) for _ in names], variables)
            watch.step_end()


@pytest.mark.fast
def test_columns_are_the_contract(log_dir):
    _run(log_dir, 4)
    with open(os.path.join(log_dir, "windows.csv")) as f:
        assert f.readline().strip() == ",".join(WINDOW_COLUMNS)
    with open(os.path.join(log_dir, "stats.csv")) as f:
        assert f.readline().strip() == ",".join(STATS_COLUMNS)
    assert list(gw.read_alerts(log_dir).columns) == [
        "step", "layer", "variable", "kind", "severity", "value", "threshold", "message", "hint"]
    assert WINDOW_COLUMNS[:9] == ("step", "steps", "loss", "learning_rate", "global_l2", "global_l2_max",
                              "nonfinite_steps", "first_nonfinite_step", "skipped_steps")
    assert STATS_COLUMNS[:13] == (
        "step", "steps", "layer", "variable", "l2", "l2_max", "l2_min", "l2_mean", "max_abs",
        "mean_abs", "zero_frac", "nonfinite", "grad_steps")


@pytest.mark.fast
def test_reader_tolerates_a_torn_last_line(log_dir, caplog):
    _run(log_dir, 6)
    path = os.path.join(log_dir, "stats.csv")
    with open(path, "a") as f:
        f.write("8,2,layer,layer/w,1.23")  # a write cut short by a kill
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        stats = gw.read_stats(log_dir)
    assert list(stats.step) == [2, 4, 6]
    # the header and three rows: the torn row is line 5, and the warning says so
    assert [r.getMessage() for r in caplog.records] == [
        f"gradwatch: {path} line 5 has no line end (a write cut short?); it is left out."]
    # and appending after it cuts the torn bytes instead of gluing onto them
    _run(log_dir, 2, append=True)
    stats = gw.read_stats(log_dir)
    assert list(stats.step) == [2, 4, 6, 8]
    with open(path) as f:
        assert all(len(line.split(",")) == len(STATS_COLUMNS) for line in f.read().splitlines())


@pytest.mark.fast
def test_rows_that_are_not_gradwatch_rows_are_left_out_naming_their_lines(log_dir, caplog):
    _run(log_dir, 6)
    path = os.path.join(log_dir, "windows.csv")
    with open(path) as f:
        lines = f.read().splitlines()
    numbers_as_text = ["hello"] + lines[1].split(",")[1:]  # every field there, one not a number
    lines[2:2] = ["hello,world", ",".join(numbers_as_text), "", lines[1] + ",1"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        windows = gw.read_windows(log_dir)
    assert list(windows.step) == [2, 4, 6] and windows.step.dtype == np.int64
    assert all(windows[c].dtype.kind in "if" for c in WINDOW_COLUMNS)
    expected = gw.read_windows(log_dir, source="events")
    np.testing.assert_allclose(windows.global_l2, expected.global_l2, rtol=1e-6)
    width = len(WINDOW_COLUMNS)
    reasons = [(3, f"2 fields, the header has {width}"), (4, "step is 'hello', not a number"),
               (6, f"{width + 1} fields, the header has {width}")]
    assert [r.getMessage() for r in caplog.records] == [
        f"gradwatch: {path} line {line} is not a gradwatch row ({reason}); it is left out."
        for line, reason in reasons]


@pytest.mark.fast
def test_a_file_of_binary_garbage_is_refused(log_dir):
    _run(log_dir, 2)
    path = os.path.join(log_dir, "windows.csv")
    garbage = bytes(range(14, 256)) * 4  # no line end
    with open(path, "wb") as f:
        f.write(garbage)
    with pytest.raises(gw.GradwatchDataError, match=f"its {len(garbage)} bytes hold no complete line"):
        gw.read_windows(log_dir)
    with open(path, "wb") as f:
        f.write(garbage + b"\n" + garbage + b"\n")
    with pytest.raises(gw.GradwatchDataError, match="windows.csv is not a gradwatch file: columns"):
        gw.read_windows(log_dir)


@pytest.mark.fast
def test_names_that_read_like_missing_values_come_back_as_names(log_dir):
    _run(log_dir, 2, names=("NA", "None/nan", "null/NaN"))
    stats = gw.read_stats(log_dir)
    assert list(stats.variable) == ["NA", "None/nan", "null/NaN"]
    assert list(stats.layer) == ["NA", "None", "null"]
    assert list(gw.read_stats(log_dir, level="layer").layer) == ["NA", "None", "null"]


@pytest.mark.fast
def test_append_refuses_different_columns(log_dir):
    _run(log_dir, 2)
    path = os.path.join(log_dir, "windows.csv")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("skipped_steps", "something_else"))
    with pytest.raises(ValueError, match="columns are .*something_else"):
        _run(log_dir, 2, append=True)


@pytest.mark.fast
def test_append_refuses_different_variables_and_says_why(log_dir):
    _run(log_dir, 2, names=("dense_1/kernel",))
    with pytest.raises(ValueError, match="Auto-numbered layer names"):
        _run(log_dir, 2, append=True, names=("dense_7/kernel",))


@pytest.mark.fast
def test_no_append_overwrites(log_dir):
    _run(log_dir, 4)
    _run(log_dir, 2)
    assert list(gw.read_windows(log_dir).step) == [2]


def test_resume_supersedes_rows_after_the_checkpoint(tmp_path):
    """A run resumed from an earlier checkpoint rewrites those steps: later write wins."""
    import keras

    log_dir = str(tmp_path / "gw")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)

    def model_at(iterations):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="lin")])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(iterations)
        return model

    model_at(0).fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                    callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=4)])
    assert list(gw.read_windows(log_dir).step) == [4, 8, 12, 16]
    # resume from a checkpoint taken at step 8, with different data
    model_at(8).fit(x * 2, y * 2, batch_size=4, epochs=1, shuffle=False, verbose=0,
                    callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=4, append=True)])
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [4, 8, 12, 16]
    with open(os.path.join(log_dir, "windows.csv")) as f:
        assert len(f.read().splitlines()) == 5
    stats = gw.read_stats(log_dir)
    assert len(stats) == 8 and not stats.duplicated(["step", "variable"]).any()


@pytest.mark.fast
def test_read_errors_are_clear(tmp_path):
    with pytest.raises(gw.GradwatchDataError, match="does not exist"):
        gw.read_stats(str(tmp_path / "nope"))
    with pytest.raises(gw.GradwatchDataError, match="is empty: no gradwatch run"):
        gw.read_stats(str(tmp_path))
    (tmp_path / "stats.csv").write_text("a,b\n1,2\n")
    with pytest.raises(gw.GradwatchDataError, match="not a gradwatch file"):
        gw.read_stats(str(tmp_path))
    with pytest.raises(ValueError, match="level must be one of"):
        gw.read_stats(str(tmp_path), level="unit")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"log_every": 0}, ValueError, "log_every must be an int from 1 to 1,000,000,000; received 0"),
        ({"log_every": 2.5}, TypeError, "log_every must be an int"),
        ({"histogram_every": -1}, ValueError, "histogram_every must be an int from 0 to 1,000,000,000"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite must be one of .*'warn'.*received 'ignore'"),
        ({"append": "yes"}, TypeError, "append must be True or False"),
        ({"log_dir": 3}, TypeError, "log_dir must be a path"),
    ],
)
@pytest.mark.fast
def test_invalid_options_name_argument_value_and_choices(kwargs, error, match):
    with pytest.raises(error, match=match):
        gw.GradientMonitor(**{"log_dir": None, **kwargs})
    with pytest.raises(error, match=match):
        gw.Watch(**{"log_dir": None, **kwargs})


@pytest.mark.fast
def test_log_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        gw.GradientMonitor(log_dir=str(path))


@pytest.mark.fast
def test_names_with_commas_quotes_and_newlines_read_back_as_written(log_dir):
    # csv quoting: a cell holding a comma, a quote or a newline is quoted, the rest is not
    names = ('enc,1/kernel', 'say "hi"/bias', 'two\nlines/w')
    _run(log_dir, 4, names=names)
    stats = gw.read_stats(log_dir)
    assert set(stats["variable"]) == set(names)
    for name in names:
        rows = stats[stats["variable"] == name]
        np.testing.assert_allclose(rows["l2"].to_numpy(), np.sqrt(3.0) * np.array([2.0, 4.0]), rtol=1e-6)
