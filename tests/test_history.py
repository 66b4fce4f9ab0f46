"""Every fit's history is kept: a reused monitor (recompiled, on another model, A then B
then A) or a new monitor with ``append=True`` opens a new segment after the last step
written; a resume (the optimizer continues) replaces rows from its first step on."""

from __future__ import annotations

import json
import os
import threading

import keras
import numpy as np
import pytest
from conftest import tape_gradients

import gradwatch as gw
from gradwatch._io import schema

BATCH = 4


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x[:, :1] - 0.5 * x[:, 1:2]).astype("float32")


def model_named(prefix, units=3, seed=0, lr=0.05):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(units, activation="tanh", name=f"{prefix}_h"),
                              keras.layers.Dense(1, name=f"{prefix}_o")], name=prefix)
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def fit(model, monitor=None, n=16):
    x, y = data(n)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor] if monitor is not None else [])


def first_step_l2(log_dir, step, variable):
    stats = gw.read_stats(log_dir)
    return float(stats[(stats.step == step) & (stats.variable == variable)].l2.iloc[0])


def reference_l2(model, variable):
    x, y = data()
    grads, _ = tape_gradients(model, x[:BATCH], y[:BATCH])
    index = [v.path.endswith(variable) for v in model.trainable_variables].index(True)
    return float(np.linalg.norm(grads[index]))


def segments(log_dir):
    with open(os.path.join(log_dir, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    assert run["schema_version"] == schema.SCHEMA_VERSION == 4
    return run["segments"]


@pytest.mark.slow  # several small fits
def test_recompiled_model_opens_a_segment_and_keeps_the_first_fit(tmp_path):
    log_dir = str(tmp_path)
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=1)
    model = model_named("a")
    fit(model, monitor)
    model.compile(keras.optimizers.SGD(0.01), "mse")  # a lower learning rate: iterations restart at 0
    expected = reference_l2(model, "a_h/kernel")
    fit(model, monitor)
    assert gw.read_windows(log_dir).step.tolist() == list(range(1, 9))
    got = [(s["segment"], s["first_step"], s["last_step"], s["reason"], s["iterations_at_start"])
           for s in segments(log_dir)]
    assert got == [(1, 1, 4, "start", 0), (2, 5, 8, "optimizer_restart", 0)]
    # the new segment's first step is the recompiled model's first step, measured independently
    assert first_step_l2(log_dir, 5, "a_h/kernel") == pytest.approx(expected, rel=1e-5)
    table = gw.read_segments(log_dir)
    assert table[["first_step", "last_step"]].values.tolist() == [[1, 4], [5, 8]]
    assert table.optimizer.tolist() == ["SGD", "SGD"]


@pytest.mark.slow  # several small fits
def test_one_monitor_on_a_then_b_then_a_keeps_all_three_fits(tmp_path):
    log_dir = str(tmp_path)
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=2)
    a, b = model_named("a"), model_named("b", units=5)
    fit(a, monitor)
    fit(b, monitor)
    expected = reference_l2(a, "a_o/kernel")
    fit(a, monitor)  # A's optimizer continues at 4 iterations, but the watched variables changed
    assert gw.read_windows(log_dir).step.tolist() == [2, 4, 6, 8, 10, 12]
    got = segments(log_dir)
    assert [(s["first_step"], s["last_step"], s["reason"]) for s in got] == [
        (1, 4, "start"), (5, 8, "variables_changed"), (9, 12, "variables_changed")]
    assert got[2]["iterations_at_start"] == 4 and got[2]["step_offset"] == 4
    shapes = {v["name"]: v["shape"] for v in got[1]["variables"]}
    assert shapes == {"b_h/kernel": [4, 5], "b_h/bias": [5], "b_o/kernel": [5, 1], "b_o/bias": [1]}
    stats = gw.read_stats(log_dir)
    by_variable = stats.groupby("variable").step.apply(list).to_dict()
    assert by_variable["b_h/kernel"] == [6, 8]
    assert by_variable["a_h/kernel"] == [2, 4, 10, 12]
    # window 10 folds steps 9 and 10: its l2_max is at least the first step's norm
    window_max = float(stats[(stats.step == 10) & (stats.variable == "a_o/kernel")].l2_max.iloc[0])
    assert window_max >= expected * (1 - 1e-5)
    assert gw.read_stats(log_dir).variable.unique().tolist()[:4] == ["a_h/kernel", "a_h/bias", "a_o/kernel",
                                                                     "a_o/bias"]


@pytest.mark.slow  # several small fits
def test_new_monitor_with_append_opens_a_segment(tmp_path):
    log_dir = str(tmp_path)
    fit(model_named("a"), gw.GradientMonitor(log_dir=log_dir, log_every=2))
    fit(model_named("a", seed=1), gw.GradientMonitor(log_dir=log_dir, log_every=2, append=True))
    assert gw.read_windows(log_dir).step.tolist() == [2, 4, 6, 8]
    assert [s["reason"] for s in segments(log_dir)] == ["start", "optimizer_restart"]


@pytest.mark.slow  # several small fits
def test_resume_replaces_rows_from_its_first_step(tmp_path):
    """BackupAndRestore: the optimizer continues at 2 iterations; steps 3 and 4 are written again."""
    log_dir = str(tmp_path)
    fit(model_named("a"), gw.GradientMonitor(log_dir=log_dir, log_every=1))
    model = model_named("a", seed=1)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(2)
    expected = reference_l2(model, "a_h/kernel")
    fit(model, gw.GradientMonitor(log_dir=log_dir, log_every=1, append=True), n=8)
    assert gw.read_windows(log_dir).step.tolist() == [1, 2, 3, 4]
    assert first_step_l2(log_dir, 3, "a_h/kernel") == pytest.approx(expected, rel=1e-5)
    assert [(s["first_step"], s["last_step"]) for s in segments(log_dir)] == [(1, 4)]


@pytest.mark.slow  # several small fits
def test_append_refuses_same_names_with_other_shapes(tmp_path):
    log_dir = str(tmp_path)
    fit(model_named("a", units=3), gw.GradientMonitor(log_dir=log_dir, log_every=2))
    threads = set(threading.enumerate())
    before = open(os.path.join(log_dir, "run.json"), encoding="utf-8").read()
    with pytest.raises(ValueError, match=r"same names but other shapes .*'a_h/kernel': \[4, 3\] in the run, "
                                         r"\[4, 5\] now"):
        fit(model_named("a", units=5), gw.GradientMonitor(log_dir=log_dir, log_every=2, append=True))
    assert open(os.path.join(log_dir, "run.json"), encoding="utf-8").read() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("gradwatch") and t not in threads]


@pytest.mark.slow  # several small fits
def test_two_monitors_on_one_model_are_refused_at_once(tmp_path):
    model = model_named("a")
    first = gw.GradientMonitor(log_dir=str(tmp_path / "one"), log_every=2)
    second = gw.GradientMonitor(log_dir=str(tmp_path / "two"), log_every=2)
    x, y = data()
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="Two GradientMonitors watch this model's optimizer in one fit"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[first, second])
    from gradwatch._capture import keras_internals as internals

    assert not internals.has_apply_tap(model.optimizer)
    assert not [t for t in threading.enumerate() if t.name.startswith("gradwatch") and t not in before]
    fit(model, first)  # the first monitor still works on its own
    assert gw.read_windows(str(tmp_path / "one")).steps.sum() == 4


@pytest.mark.fast
def test_segment_ranges_fill_a_crashed_segment_from_its_rows():
    run = {"schema_version": 4, "segments": [
        {"segment": 1, "first_step": 1, "last_step": None, "reason": "start"},
        {"segment": 2, "first_step": 9, "last_step": None, "reason": "optimizer_restart"}]}
    got = [(s["first_step"], s["last_step"]) for s in schema.segment_ranges(run, [2, 4, 6, 10, 12])]
    assert got == [(1, 6), (9, 12)]
    old = {"schema_version": 3, "variables": [{"name": "w", "layer": "l", "shape": [2], "dtype": "float32"}]}
    assert [(s["first_step"], s["last_step"], s["reason"]) for s in schema.segment_ranges(old, [5, 10])] == [
        (1, 10, "start")]


@pytest.mark.slow  # several small fits
def test_report_and_tab_show_the_segments(tmp_path):
    from _plugin import get_json, plugin_over

    from gradwatch._report.report import build_report

    log_dir = str(tmp_path / "run")
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=2)
    a = model_named("a")
    fit(a, monitor)
    fit(model_named("b", units=5), monitor)
    a.compile(keras.optimizers.SGD(0.01), "mse")
    fit(a, monitor)
    path, _ = build_report(log_dir, progress=False)
    text = open(path, encoding="utf-8").read()
    assert ("3 segments: steps 1-4 (start); steps 5-8 (variables changed); steps 9-12 (variables changed)"
            in text)
    plugin, _ = plugin_over(str(tmp_path))
    status, flow = get_json(plugin, "/flow", run="run")
    assert status == 200
    assert flow["steps"] == [2, 4, 6, 8, 10, 12]
    assert [(s["column"], s["first_step"], s["reason"]) for s in flow["segments"]] == [
        (2, 5, "variables_changed"), (4, 9, "variables_changed")]
    assert sorted(flow["layers"]) == ["a_h", "a_o", "b_h", "b_o"]


@pytest.mark.slow  # several small fits
def test_runs_of_version_1_and_3_read_as_one_segment_and_a_v3_run_continues(tmp_path):
    data_dir = os.path.join(os.path.dirname(__file__), "data", "run_v1")
    table = gw.read_segments(data_dir)
    windows = gw.read_windows(data_dir)
    assert table[["segment", "first_step", "last_step", "reason"]].values.tolist() == [
        [1, 1, int(windows.step.max()), "start"]]
    log_dir = str(tmp_path)
    fit(model_named("a"), gw.GradientMonitor(log_dir=log_dir, log_every=2))
    path = os.path.join(log_dir, "run.json")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    run.pop("segments")
    run["schema_version"] = 3  # as gradwatch wrote it before segments
    with open(path, "w", encoding="utf-8") as f:
        json.dump(run, f)
    assert gw.read_segments(log_dir)[["first_step", "last_step"]].values.tolist() == [[1, 4]]
    fit(model_named("a", seed=1), gw.GradientMonitor(log_dir=log_dir, log_every=2, append=True))
    assert gw.read_windows(log_dir).step.tolist() == [2, 4, 6, 8]
    assert [(s["first_step"], s["last_step"], s["reason"]) for s in segments(log_dir)] == [
        (1, 4, "start"), (5, 8, "optimizer_restart")]
