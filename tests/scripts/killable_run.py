"""Trains forever with a GradientMonitor writing every step; killed by the test."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradwatch as gw  # noqa: E402

log_dir = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = rng.normal(size=(256, 1)).astype("float32")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="a"),
                          keras.layers.Dense(1, name="b")])
model.compile(keras.optimizers.SGD(0.01), "mse")


class Started(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 5:
            print("STARTED", flush=True)


model.fit(x, y, batch_size=4, epochs=10000, verbose=0,
          callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1), Started()])
