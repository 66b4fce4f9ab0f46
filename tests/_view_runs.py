"""Real gradwatch runs for the browser tests of the TensorBoard views, and a TensorBoard started
with its default flags on them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

LONG_STEPS = 3000
LONG_NAN_STEP = 2222
LONG_LOG_EVERY = 10


def _fit(model: Any, x: np.ndarray, y: np.ndarray, log_dir: str, batch: int, **monitor: Any) -> None:
    import gradwatch as gw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, **monitor)])


def diverged_run(log_dir: str) -> None:
    """The exploding 2-layer ReLU net (SGD 0.2): exploding gradients, then NaN to the end (40 steps)."""
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * 40, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 5).astype("float32")
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.2), "mse")
    # each window interpreted at its read: the histogram a warning asks for then lands on
    # the next step (11 after the warning at 10), not on one that depends on the writer
    # thread's timing (deferred, it came out as steps 7 and 10 in one run, 7, 9 and 11 in another)
    from gradwatch._internal_options import InternalOptions

    _fit(model, x, y, log_dir, 16, log_every=2, internal=InternalOptions(defer_reads=False))


def dead_run(log_dir: str) -> None:
    """A 4-layer net whose second layer is a dead ReLU (bias -100): its gradient is exactly zero on
    every step, and so is the kernel gradient of the layer after it (40 steps)."""
    import keras

    rng = np.random.default_rng(1)
    x = rng.normal(size=(16 * 40, 8)).astype("float32")
    y = np.tanh(x[:, :1]).astype("float32")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="tanh", name="input_tanh"),
        keras.layers.Dense(16, activation="relu", bias_initializer=keras.initializers.Constant(-100.0),
                           name="dead_relu"),
        keras.layers.Dense(8, activation="tanh", name="after_dead"),
        keras.layers.Dense(1, name="out"),
    ])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    _fit(model, x, y, log_dir, 16, log_every=2)


def long_run(log_dir: str) -> None:
    """3,000 steps of a tiny net (batch 1, ``log_every=2``: 1,500 windows); the input of step 2,222
    is NaN, that step is skipped and training goes on."""
    import keras

    rng = np.random.default_rng(2)
    x = rng.normal(size=(LONG_STEPS, 4)).astype("float32")
    y = (x[:, :1] * 0.5).astype("float32")
    x[LONG_NAN_STEP - 1, 0] = np.nan
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, log_dir, 1, log_every=LONG_LOG_EVERY, on_nonfinite="skip_step")


class TensorBoard:
    """``tensorboard --logdir DIR`` with its default flags (only host and port given)."""

    def __init__(self, logdir: str, stderr_path: str):
        tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
        self.args = [tensorboard, "--logdir", logdir, "--host", "127.0.0.1", "--port", "0"]
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err,
                                         stdin=subprocess.DEVNULL)
        self.port = self._await_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _await_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                match = re.search(r"TensorBoard \S+ at http://[^\s/]+:(\d+)/", f.read())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            raise RuntimeError(f"tensorboard did not start ({' '.join(self.args)}):\n{f.read()[-3000:]}")

    def json(self, path: str, **params: Any) -> Any:
        import json
        import urllib.parse
        import urllib.request

        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
