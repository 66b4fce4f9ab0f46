"""A short real gradwatch run (CSV) for the TensorBoard sink and event-reader tests."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def exploding_run(log_dir: str, steps: int = 30, log_every: int = 5, seed: int = 11) -> list[dict[str, Any]]:
    """Trains the exploding 2-layer ReLU net of ``examples/broken_nets.py`` for ``steps`` steps
    with a ``GradientMonitor`` writing CSV into ``log_dir``; it raises exploding and non-finite
    alerts and has NaN rows.  Returns numpy histograms of the first step's real gradients."""
    import keras

    import gradwatch as gw

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * steps, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 5).astype("float32")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.2), "mse")
    histograms = gradient_histograms(model, x[:16], y[:16], step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[gw.GradientMonitor(log_dir=log_dir, log_every=log_every)],
        )
    return histograms


def gradient_histograms(model: Any, x: np.ndarray, y: np.ndarray, step: int) -> list[dict[str, Any]]:
    """log10 |g| and signed histograms (numpy) of each layer's tape gradient at ``step``."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    layer_of = {id(v): layer.name for layer in model.layers for v in layer.trainable_variables}
    per_layer: dict[str, list[np.ndarray]] = {}
    for variable, grad in zip(model.trainable_variables, grads):
        per_layer.setdefault(layer_of[id(variable)], []).append(np.asarray(grad).ravel())
    out = []
    for layer, parts in per_layer.items():
        g = np.concatenate(parts).astype(np.float64)
        finite = g[np.isfinite(g)]
        nonzero = finite[finite != 0]
        log_counts, log_edges = np.histogram(np.log10(np.abs(nonzero)), bins=12)
        counts, edges = np.histogram(finite, bins=10)
        common = {
            "step": step,
            "layer": layer,
            "zeros": int(np.sum(finite == 0)),
            "nonfinite": int(g.size - finite.size),
        }
        out.append({**common, "kind": "log10_abs", "edges": log_edges, "counts": log_counts})
        out.append({**common, "kind": "signed", "edges": edges, "counts": counts})
    return out


def rows_by_window(log_dir: str) -> list[dict[str, Any]]:
    """The run's CSV rows grouped per window, as the sink's ``write_window`` arguments."""
    import gradwatch as gw

    windows = gw.read_windows(log_dir, source="csv")
    stats = gw.read_stats(log_dir, source="csv")
    layers = gw.read_stats(log_dir, level="layer", source="csv")
    alerts = gw.read_alerts(log_dir, source="csv")
    out = []
    previous = -1
    for window in windows.to_dict("records"):
        step = int(window["step"])
        in_window = (alerts.step > previous) & (alerts.step <= step)  # an alert may name an earlier step
        previous = step
        window = {k: _plain(v) for k, v in window.items()}
        window["step"] = step
        out.append(
            {
                "window_row": window,
                "stats_rows": [
                    {k: _plain(v) for k, v in r.items()} for r in stats[stats.step == step].to_dict("records")
                ],
                "layer_rows": [
                    {k: _plain(v) for k, v in r.items()}
                    for r in layers[layers.step == step].to_dict("records")
                ],
                "alert_rows": [
                    {k: _plain(v) for k, v in r.items()} for r in alerts[in_window].to_dict("records")
                ],
                "first_step": step - int(window["steps"]) + 1,
            }
        )
    return out


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def move_event_files(log_dir: str, dest: str) -> int:
    """Moves the event files gradwatch's engine wrote in ``log_dir`` to ``dest``; returns how many."""
    import os
    import shutil

    from gradwatch._io.readers import event_files

    paths = event_files(log_dir)
    if paths:
        os.makedirs(dest, exist_ok=True)
    for path in paths:
        shutil.move(path, dest)
    return len(paths)
