"""MultiWorkerMirroredStrategy: 2 worker processes on localhost, CPU only, ``model.fit``
with a ``GradientMonitor`` each (own ``log_dir`` each).

Keras 3.15's ``fit`` cannot run under this strategy at all, with or without
gradwatch (keras-team/keras#20585): the worker script works around the two Keras
bugs on its model (see ``work_around_keras_multi_worker_bugs``); gradwatch itself
is unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import np_stats

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "multiworker_check.py")
# Same data and settings as the script.
SAMPLES, GLOBAL_BATCH, FEATURES, LEARNING_RATE = 64, 16, 6, 0.05
TIMEOUT = 180


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.1 * rng.normal(size=(SAMPLES, 1))).astype("float32")
    return x, y


def _run_workers(tmp_path) -> list[dict]:
    """Both workers, concurrently; killed (by pid) if either hangs or fails."""
    ports = _free_ports(2)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    procs = []
    for task in (0, 1):
        args = [sys.executable, SCRIPT, str(task), str(ports[0]), str(ports[1]),
                str(tmp_path / f"logs{task}"), str(tmp_path / f"weights{task}.npz")]
        procs.append(
            subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pytest.fail(f"a worker did not finish within {TIMEOUT} s (hang in a collective?)")
    results = []
    for task, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"worker {task} failed:\n{err[-3000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _replay(initial: list[np.ndarray]) -> tuple[list[dict[str, dict]], list[float], list[np.ndarray], list]:
    """Plain SGD on the concatenated global batches, by GradientTape."""
    import keras
    import tensorflow as tf

    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(8, activation="tanh", name="h"),
         keras.layers.Dense(1, name="o")]
    )
    model.set_weights(initial)
    x, y = _data()
    steps, global_norms, one_worker = [], [], []
    for start in range(0, SAMPLES, GLOBAL_BATCH):
        xb, yb = x[start:start + GLOBAL_BATCH], y[start:start + GLOBAL_BATCH]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        with tf.GradientTape() as tape:
            half = tf.reduce_mean(tf.square(model(xb[:8]) - yb[:8]))
        one_worker.append([float(np.linalg.norm(g)) for g in tape.gradient(half, model.trainable_variables)])
        # keyed as gradwatch names them: layer/variable
        names = ["/".join(v.path.split("/")[-2:]) for v in model.trainable_variables]
        steps.append({name: np_stats(g) for name, g in zip(names, grads)})
        global_norms.append(float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))))
        for v, g in zip(model.trainable_variables, grads):
            v.assign(v.numpy() - LEARNING_RATE * g)
    return steps, global_norms, model.get_weights(), one_worker


@pytest.mark.slow
def test_multi_worker_chief_writes_the_global_gradient(tmp_path):
    import gradwatch as gw

    results = _run_workers(tmp_path)
    chief, other = results
    assert chief["replicas"] == other["replicas"] == 2
    assert chief["strategy"] == "CollectiveAllReduceStrategy"
    assert (chief["is_chief"], chief["engine_chief"]) == (True, True)
    assert (other["is_chief"], other["engine_chief"]) == (False, False)
    # Both computed every step (their all-reduces are needed), only the chief wrote.
    assert chief["steps_seen"] == other["steps_seen"] == chief["iterations"] == SAMPLES // GLOBAL_BATCH
    other_dir = tmp_path / "logs1"
    assert not other_dir.exists() or not any(other_dir.rglob("*")), list(other_dir.rglob("*"))
    assert {p.name for p in (tmp_path / "logs0").iterdir()} >= {
        "run.json", "windows.csv", "stats.csv", "layers.csv", "alerts.csv"
    }

    saved = [np.load(tmp_path / f"weights{task}.npz") for task in (0, 1)]
    n = chief["num_weights"]
    initial = [saved[0][f"arr_{i}"] for i in range(n)]
    steps, global_norms, final, one_worker = _replay(initial)
    for task in (0, 1):
        for i in range(n):
            np.testing.assert_allclose(saved[task][f"arr_{n + i}"], final[i], rtol=1e-5, atol=1e-6)

    stats = gw.read_stats(tmp_path / "logs0")
    windows = gw.read_windows(tmp_path / "logs0")
    assert list(windows.step) == [1, 2, 3, 4]
    assert list(windows.global_l2) == pytest.approx(global_norms, rel=1e-4)
    for step, expected in enumerate(steps, start=1):
        rows = stats[stats.step == step].set_index("variable")
        assert set(rows.index) == set(expected)
        for variable, ref in expected.items():
            assert rows.loc[variable, "l2"] == pytest.approx(ref["l2"], rel=1e-4), (step, variable)
            assert rows.loc[variable, "max_abs"] == pytest.approx(ref["max_abs"], rel=1e-4), (step, variable)
    # One worker's half of the batch gives other norms: the rows really are global.
    first = stats[stats.step == 1].l2.to_numpy()
    assert not np.allclose(sorted(first), sorted(one_worker[0]), rtol=1e-2)
