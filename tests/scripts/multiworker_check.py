"""One worker of a 2-worker MultiWorkerMirroredStrategy run on localhost (CPU only).

Usage: multiworker_check.py TASK_INDEX PORT0 PORT1 LOG_DIR OUT_NPZ

The strategy is created before anything else touches TensorFlow (it must be).
The worker trains a small Keras model with ``model.fit`` and a
``GradientMonitor(log_dir=LOG_DIR, log_every=1)``; it saves its initial and final
weights to OUT_NPZ and prints ``RESULT {json}`` so the test can replay the same
global batches with a plain GradientTape.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TASK, PORT0, PORT1, LOG_DIR, OUT = (
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
)
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"localhost:{PORT0}", f"localhost:{PORT1}"]},
        "task": {"type": "worker", "index": TASK},
    }
)

import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._capture import keras_internals as internals  # noqa: E402

# Shared with the test's replay (tests/test_multiworker.py).
SAMPLES, GLOBAL_BATCH, FEATURES, LEARNING_RATE = 64, 16, 6, 0.05


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.1 * rng.normal(size=(SAMPLES, 1))).astype("float32")
    return x, y


def work_around_keras_multi_worker_bugs(model: keras.Model) -> None:
    """Keras 3 ``fit`` under MultiWorkerMirroredStrategy fails with or without gradwatch
    (keras-team/keras#20585, tensorflow/tensorflow#72388); two bugs, both in Keras:

    1. ``_maybe_symbolic_build`` reduces the whole first-batch tuple with
       ``strategy.reduce`` ("Attempt to convert a value (PerReplica...) to a Tensor").
       The build only needs shapes: this model builds from the local replica's batch.
    2. ``reduce_per_replica`` takes the mean of the scalar logs over ``axis=0`` across
       workers ("Invalid reduction dimension 0 for input with 0 dimensions"); the
       single-worker path takes the element-wise mean over replicas, so ``axis=None`` here.
    """
    from keras.src.backend.tensorflow import trainer as keras_trainer

    original_build = model._maybe_symbolic_build

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v,
                    next(it),
                )
                break
        return original_build(data_batch=data_batch)

    model._maybe_symbolic_build = build
    original_reduce = keras_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and keras_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    keras_trainer.reduce_per_replica = reduce_per_replica


def main() -> None:
    x, y = data()
    options = tf.data.Options()
    # Element sharding: global batch k is samples [16k, 16k+16) split between the workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(8, activation="tanh", name="h"),
                keras.layers.Dense(1, name="o"),
            ]
        )
        model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse", jit_compile=False)
    if os.environ.get("GRADWATCH_NO_KERAS_WORKAROUND") != "1":
        work_around_keras_multi_worker_bugs(model)
    initial = model.get_weights()
    monitor = gw.GradientMonitor(log_dir=LOG_DIR, log_every=1, histogram_every=0)
    model.fit(dataset, epochs=1, verbose=0, callbacks=[monitor])
    final = model.get_weights()
    np.savez(OUT, *initial, *final)
    result = {
        "task": TASK,
        "replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "is_chief": internals.is_chief(strategy),
        # the chief alone writes: run.json exists only under its log dir
        "engine_chief": os.path.exists(os.path.join(LOG_DIR, "run.json")),
        "steps_seen": monitor.steps_seen,
        "iterations": int(model.optimizer.iterations.numpy()),
        "num_weights": len(initial),
        "last_window_l2": monitor.last_window["global_l2"] if monitor.last_window else None,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
