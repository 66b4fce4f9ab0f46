"""Run in its own process: MirroredStrategy over 2 logical CPUs must report the
all-reduced (global) gradient, equal to one full-batch tape gradient."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradwatch as gw  # noqa: E402


def build(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(12, activation="relu", name="h"),
            keras.layers.Dense(1, name="o"),
        ]
    )


def main(log_dir):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build(0)
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    reference = build(0)
    reference.compile(keras.optimizers.SGD(0.01), "mse")
    reference.set_weights(model.get_weights())
    # Steps of 16 samples (8 per replica): reference gradient on the full 16.
    expected = []
    losses = []
    for start in (0, 16):
        xb, yb = x[start : start + 16], y[start : start + 16]
        with tf.GradientTape() as tape:
            loss = reference.compute_loss(x=xb, y=yb, y_pred=reference(xb, training=True))
        grads = tape.gradient(loss, reference.trainable_variables)
        expected.append([float(tf.norm(g)) for g in grads])
        losses.append(float(loss))
        # the same one replica's half gives another number (what must NOT be reported)
        with tf.GradientTape() as tape:
            half = reference.compute_loss(x=xb[:8], y=yb[:8], y_pred=reference(xb[:8], training=True))
        half_grads = tape.gradient(half, reference.trainable_variables)
        for v, g in zip(reference.trainable_variables, grads):
            v.assign_sub(0.01 * g)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1)])
    stats = gw.read_stats(log_dir)
    windows = gw.read_windows(log_dir)
    got = [list(stats[stats.step == s].l2) for s in (1, 2)]
    result = {
        "expected": expected,
        "got": got,
        "one_replica": [float(tf.norm(g)) for g in half_grads],
        "losses": losses,
        "window_losses": list(windows.loss),
        "replicas": strategy.num_replicas_in_sync,
        "weights_match": bool(
            all(np.allclose(a, b, rtol=1e-5, atol=1e-7)
                for a, b in zip(model.get_weights(), reference.get_weights()))
        ),
    }
    print("RESULT " + json.dumps(result))


def clipped(log_dir):
    """GradientMonitor(clip=GlobalNorm) under Mirrored == Keras global_clipnorm on one device."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32") * 3
    y = rng.normal(size=(64, 1)).astype("float32") * 10
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build(0)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse", jit_compile=False)
    reference = build(0)
    reference.compile(keras.optimizers.SGD(0.01, momentum=0.9, global_clipnorm=0.5), "mse")
    reference.set_weights(model.get_weights())
    reference.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0,
              callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=2, clip=gw.clip.GlobalNorm(0.5))])
    replicas_agree = all(
        np.array_equal(*[np.asarray(t) for t in strategy.experimental_local_results(v.value)])
        for v in model.trainable_variables
    )
    windows = gw.read_windows(log_dir)
    result = {
        "weights_match": bool(all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                                  for a, b in zip(model.get_weights(), reference.get_weights()))),
        "replicas_agree": bool(replicas_agree),
        "clip_global_l2": list(windows.clip_global_l2),
        "clip_fraction": list(windows.clip_fraction),
    }
    print("RESULT " + json.dumps(result))


def mixed_inf(log_dir):
    """mixed_float16 + Mirrored, an Inf in one replica's half of batch 2, skip_step."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")
    x[16 + 8 : 16 + 10] = np.inf  # only the second replica's share of the second batch
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build(0)
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0,
                  callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=1, on_nonfinite="skip_step")])
    finite_everywhere = all(
        np.isfinite(np.asarray(t)).all()
        for v in model.trainable_variables
        for t in strategy.experimental_local_results(v.value)
    )
    windows = gw.read_windows(log_dir)
    alerts = gw.read_alerts(log_dir)
    result = {
        "finite_everywhere": bool(finite_everywhere),
        "nonfinite_steps": list(windows.nonfinite_steps),
        "alert_steps": [int(s) for s in alerts.step],
        "alert_kinds": list(alerts.kind),
        "alert_severities": list(alerts.severity),
        "iterations": int(model.optimizer.iterations.numpy()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "mixed_inf":
        mixed_inf(sys.argv[1])
    elif len(sys.argv) > 2 and sys.argv[2] == "clip":
        clipped(sys.argv[1])
    else:
        main(sys.argv[1])
