"""Ctrl-C (SIGINT) inside a fit step or inside another callback, then the checks, in one
process; prints one JSON line. Run by tests/test_exits.py: ``fault_run.py LOG_DIR MODE``
with MODE ``step`` or ``callback``."""

import json
import os
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._capture import keras_internals as internals  # noqa: E402

log_dir, mode = sys.argv[1], sys.argv[2]
# Ctrl-C raises KeyboardInterrupt here even when the suite runs as a background job,
# whose shell starts its children with SIGINT ignored (Python then installs no handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
AT = 7  # the batch (0-based) in which SIGINT arrives
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")
keras.utils.set_random_seed(0)


class Interrupting(keras.layers.Layer):
    """Sends SIGINT to this process from inside the train step of batch AT."""

    def __init__(self):
        super().__init__()
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, dtype="int64")

    def call(self, inputs, training=False):
        if not training:
            return inputs

        def signal_at(count):
            if int(count) == AT:
                os.kill(os.getpid(), signal.SIGINT)
            return count

        count = self.calls.assign_add(1)
        done = tf.py_function(signal_at, [count - 1], tf.int64)
        with tf.control_dependencies([done]):
            return tf.identity(inputs)


class Counting(keras.callbacks.Callback):
    """Counts finished batches; with mode "callback" sends SIGINT in on_train_batch_end of batch AT."""

    done = 0

    def on_train_batch_end(self, batch, logs=None):
        Counting.done += 1
        if mode == "callback" and Counting.done == AT + 1:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs at the next bytecode: here
                pass


layers = [keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="h")]
layers += [Interrupting()] if mode == "step" else []
layers += [keras.layers.Dense(1, name="o")]
model = keras.Sequential(layers)
model.compile(keras.optimizers.SGD(0.01), "mse")
monitor = gw.GradientMonitor(log_dir=log_dir, log_every=3)
interrupted = False
try:
    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[monitor, Counting()])
except KeyboardInterrupt:
    interrupted = True


def threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("gradwatch")]


after_fault = {"tap": internals.has_apply_tap(model.optimizer), "threads": threads()}
windows_before = gw.read_windows(log_dir).to_dict("list")
iterations = int(model.optimizer.iterations.numpy())
model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # a plain fit: records nothing
print(json.dumps({
    "interrupted": interrupted, "batches_done": Counting.done,
    "iterations_before_plain": iterations,
    "after_fault": after_fault,
    "after_plain": {"tap": internals.has_apply_tap(model.optimizer), "threads": threads()},
    "windows_before_plain": windows_before,
    "windows_after_plain": gw.read_windows(log_dir).to_dict("list"),
}), flush=True)
