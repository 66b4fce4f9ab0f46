"""Fault injection: every exit leaves the model untapped (or its tap pass-through until the
next train-function call), no gradwatch thread alive, the files complete to the last window
the monitor could write, and a following plain fit records nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch as gw
from gradwatch._capture import keras_internals as internals
from gradwatch._internal_options import InternalOptions
from gradwatch._interpret.detectors import Thresholds

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fault_run.py")


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x[:, :1] - x[:, 1:2]).astype("float32")


def make_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="h"),
                              keras.layers.Dense(1, name="o")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


_BEFORE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_before():
    """The threads alive when a test starts: another test file run earlier in this worker may
    leave a writer of a Watch it never closed; each test checks the threads it started."""
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())
    yield


def gradwatch_threads():
    """The gradwatch threads this test started that are still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith("gradwatch") and t not in _BEFORE]


def windows_of(log_dir):
    return gw.read_windows(log_dir)[["step", "steps"]].values.tolist()


def check_plain_fit_records_nothing(model, log_dir):
    before = windows_of(log_dir)
    stats = len(gw.read_stats(log_dir))
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert not internals.has_apply_tap(model.optimizer)
    assert gradwatch_threads() == []
    assert windows_of(log_dir) == before and len(gw.read_stats(log_dir)) == stats


def check_windows_complete(log_dir, log_every, last):
    """Windows of log_every steps, consecutive, up to ``last`` (a final partial window allowed)."""
    rows = windows_of(log_dir)
    assert [step for step, _ in rows] == sorted(set(step for step, _ in rows))
    assert sum(steps for _, steps in rows) == rows[-1][0] == last
    assert all(steps == log_every for _, steps in rows[:-1])


@pytest.mark.slow
def test_on_alert_that_raises_cleans_up_at_once(tmp_path):
    log_dir = str(tmp_path)
    seen = []

    def on_alert(row):
        seen.append(row["step"])
        raise RuntimeError("on_alert failed")

    model = make_model()
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=2, on_alert=on_alert,
                                 thresholds=Thresholds(exploding_l2=1e-9, patience=1))
    x, y = data()
    with pytest.raises(RuntimeError, match="on_alert failed"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    assert not internals.has_apply_tap(model.optimizer)
    assert gradwatch_threads() == []
    # on_alert saw the first alert and was not called again; every step trained is written
    assert seen == [2]
    trained = int(model.optimizer.iterations.numpy())
    assert 2 < trained < 16
    check_windows_complete(log_dir, 2, trained)
    check_plain_fit_records_nothing(model, log_dir)


class Failing(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 4:
            raise ValueError("another callback failed")


@pytest.mark.slow
def test_error_in_another_callback_cleans_up_at_the_next_train_call(tmp_path):
    log_dir = str(tmp_path)
    model = make_model()
    x, y = data()
    with pytest.raises(ValueError, match="another callback failed"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=3), Failing()])
    assert int(model.optimizer.iterations.numpy()) == 5
    # the monitor could not see it: the next train-function call, outside its fit, cleans up and
    # writes the last partial window (steps 4-5); the plain fit itself is not recorded
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert not internals.has_apply_tap(model.optimizer) and gradwatch_threads() == []
    assert windows_of(log_dir) == [[3, 3], [5, 2]]
    check_plain_fit_records_nothing(model, log_dir)


@pytest.mark.slow
def test_reused_monitor_after_an_unseen_exit_starts_clean(tmp_path):
    log_dir = str(tmp_path)
    model = make_model()
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=3)
    x, y = data()
    with pytest.raises(ValueError):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor, Failing()])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    assert windows_of(log_dir) == [[3, 3], [5, 2]] + [[5 + k, 3] for k in (3, 6, 9, 12, 15)] + [[21, 1]]
    assert not internals.has_apply_tap(model.optimizer) and gradwatch_threads() == []


class FullDisk:
    """A sink whose write fails as a full disk does, from window ``at`` on (the seam when no
    tmpfs can be mounted)."""

    def __init__(self, at):
        self.at, self.windows = at, 0

    def open(self, run_info):
        pass

    def write(self, result):
        self.windows += 1
        if self.windows >= self.at:
            raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        pass


@pytest.mark.slow
def test_write_error_on_the_writer_thread_cleans_up(tmp_path):
    log_dir = str(tmp_path)
    model = make_model()
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=2,
                                 internal=InternalOptions(extra_sinks=[FullDisk(3)]))
    x, y = data()
    with pytest.raises(OSError, match="No space left"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    assert not internals.has_apply_tap(model.optimizer) and gradwatch_threads() == []
    check_windows_complete(log_dir, 2, 6)  # the CSV sink wrote window 3 before the failing sink
    check_plain_fit_records_nothing(model, log_dir)


@pytest.mark.slow
def test_full_tmpfs_cleans_up_and_unmounts(tmp_path):
    mount = str(tmp_path / "small")
    os.makedirs(mount)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", f"gw{uuid.uuid4().hex[:6]}", mount],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        log_dir = os.path.join(mount, "run")
        model = make_model()
        x, y = data(1024)
        with pytest.raises(OSError) as error:
            model.fit(x, y, batch_size=4, epochs=4, verbose=0,
                      callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1, histogram_every=0)])
        assert error.value.errno == errno.ENOSPC
        assert not internals.has_apply_tap(model.optimizer) and gradwatch_threads() == []
        rows = windows_of(log_dir)  # a torn last line is cut by the reader
        assert [step for step, _ in rows] == list(range(1, len(rows) + 1)) and len(rows) > 5
        check_plain_fit_records_nothing(model, log_dir)
    finally:
        # every file is closed: the mount is not busy
        assert subprocess.run(["umount", mount], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["step", "callback"])
def test_ctrl_c_inside_a_step_or_another_callback(tmp_path, mode):
    log_dir = str(tmp_path / "run")
    out = subprocess.run([sys.executable, SCRIPT, log_dir, mode], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["interrupted"]
    if mode == "step":  # seen by the monitor: clean at once
        assert got["after_fault"] == {"tap": False, "threads": []}
    else:  # unseen: the tap stays until the next train-function call, which cleans up
        assert got["after_fault"]["tap"]
    assert got["after_plain"] == {"tap": False, "threads": []}
    windows = got["windows_after_plain"]
    iterations = got["iterations_before_plain"]
    # every step the optimizer took under the monitor is in the files, no more (the plain fit's are not)
    assert sum(windows["steps"]) == windows["step"][-1] == iterations == 8
    assert windows["step"] == [3, 6, 8]


@pytest.mark.fast
def test_watch_raise_inside_with_raises_once_and_closes(tmp_path):
    variable = tf.Variable([1.0, 2.0])
    with pytest.raises(ValueError, match="the loop's own error") as error:
        with gw.Watch(log_dir=str(tmp_path), log_every=5, on_nonfinite="raise") as watch:
            for i in range(3):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(variable * (np.nan if i == 1 else 1.0))
                watch.observe(tape.gradient(loss, [variable]), [variable], loss=loss)
                if not np.isfinite(loss.numpy()):
                    raise ValueError("the loop's own error")
                watch.step_end()
    assert error.value.__context__ is None  # raised once: no "during handling ... another exception"
    assert gradwatch_threads() == []
    assert windows_of(str(tmp_path)) == [[2, 2]]  # the non-finite window is written all the same
    assert gw.read_alerts(str(tmp_path)).kind.tolist()[0] == "nonfinite_gradient"
    assert gw.NonFiniteGradientError.__module__ == "gradwatch._interpret.alerts"


@pytest.mark.fast
def test_watch_raise_when_closing_after_the_files_are_closed(tmp_path):
    variable = tf.Variable([1.0, 2.0])
    watch = gw.Watch(log_dir=str(tmp_path), log_every=5, on_nonfinite="raise")
    with pytest.raises(gw.NonFiniteGradientError):
        with watch:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(variable * np.nan)
            watch.observe(tape.gradient(loss, [variable]), [variable], loss=loss)
    assert gradwatch_threads() == []
    assert windows_of(str(tmp_path)) == [[1, 1]]


@pytest.mark.slow
def test_tap_left_by_an_unseen_exit_is_pass_through_after_a_recompile(tmp_path):
    log_dir = str(tmp_path)
    model = make_model()
    x, y = data()
    monitor = gw.GradientMonitor(log_dir=log_dir, log_every=3)
    with pytest.raises(ValueError):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor, Failing()])
    model.compile(model.optimizer, "mse")  # the same (still tapped) optimizer, a fresh train function
    # the window read at step 3 is folded and written on the writer thread, which goes on
    deadline = time.monotonic() + 60
    while windows_of(log_dir) != [[3, 3]] and time.monotonic() < deadline:
        time.sleep(0.05)
    before = windows_of(log_dir)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert windows_of(log_dir) == before == [[3, 3]]
    assert int(model.optimizer.iterations.numpy()) == 5 + 16
    # its writer waits for the process's end, or for the monitor's next fit, which cleans up first
    model.fit(x[:12], y[:12], batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    assert not internals.has_apply_tap(model.optimizer) and gradwatch_threads() == []
    assert windows_of(log_dir)[:2] == [[3, 3], [5, 2]]
