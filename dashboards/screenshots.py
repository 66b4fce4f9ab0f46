"""Screenshots of gradwatch's TensorBoard dashboards, from a real run.

Usage: ``python dashboards/screenshots.py [--out dashboards/screenshots] [--run-dir DIR] [--keep]``

1. Trains a 12-layer sigmoid MLP (its first layers' gradients vanish) for 300 steps in a custom
   loop with ``gradwatch.Watch`` (``log_every=10``), and computes numpy histograms of the real
   gradients every 50 steps.
2. If the run has no gradwatch event files (the engine not writing TensorBoard yet), writes its
   CSV rows and those histograms through :class:`gradwatch._sinks.tb_sink.TensorBoardSink`.
3. Starts ``tensorboard --logdir`` on a free port, opens it in headless Chromium (selenium,
   ``/usr/bin/chromium`` + ``/usr/bin/chromedriver``) and saves one PNG per dashboard:
   Custom Scalars, Scalars, Histograms, Text (alerts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np

DASHBOARDS = (
    ("custom_scalars", "custom_scalars.png"),
    ("scalars", "scalars.png"),
    ("histograms", "histograms.png"),
    ("text", "text_alerts.png"),
)


def train(run_dir: str, steps: int = 300, histogram_every: int = 50) -> list[dict[str, Any]]:
    """The real run (CSV via gradwatch.Watch); returns numpy histograms of its gradients."""
    import keras
    import tensorflow as tf

    import gradwatch as gw

    keras.utils.set_random_seed(0)
    layers = [keras.Input((16,))]
    layers += [keras.layers.Dense(16, activation="sigmoid", name=f"sigmoid_{i}") for i in range(12)]
    layers += [keras.layers.Dense(1, name="out")]
    model = keras.Sequential(layers)
    optimizer = keras.optimizers.SGD(0.05)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 16)).astype("float32")
    y = np.tanh(x[:, :1] - x[:, 1:2]).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=0).batch(32).repeat()
    layer_of = [layer.name for layer in model.layers for _ in layer.trainable_variables]
    watch = gw.Watch(log_dir=run_dir, log_every=10, model=model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        observed = watch.observe(grads, model.trainable_variables, loss=loss)
        optimizer.apply_gradients(zip(observed, model.trainable_variables))
        return grads

    histograms = []
    with watch:
        for step, (xb, yb) in enumerate(data.take(steps), start=1):
            grads = train_step(xb, yb)
            watch.step_end()
            if step % histogram_every == 0:
                histograms += numpy_histograms(step, layer_of, [g.numpy() for g in grads])
    return histograms


def numpy_histograms(step: int, layer_of: list[str], grads: list[np.ndarray]) -> list[dict[str, Any]]:
    """log10 |g| (30 buckets) and signed (30 buckets) histograms of each layer's gradient."""
    per_layer: dict[str, list[np.ndarray]] = {}
    for layer, grad in zip(layer_of, grads):
        per_layer.setdefault(layer, []).append(np.asarray(grad, np.float64).ravel())
    out = []
    for layer, parts in per_layer.items():
        g = np.concatenate(parts)
        finite = g[np.isfinite(g)]
        nonzero = np.abs(finite[finite != 0])
        common = {"step": step, "layer": layer, "zeros": int(np.sum(finite == 0)),
                  "nonfinite": int(g.size - finite.size)}
        if nonzero.size:
            counts, edges = np.histogram(np.log10(nonzero), bins=30)
            out.append({**common, "kind": "log10_abs", "edges": edges, "counts": counts})
        if finite.size:
            counts, edges = np.histogram(finite, bins=30)
            out.append({**common, "kind": "signed", "edges": edges, "counts": counts})
    return out


def write_events(run_dir: str, histograms: list[dict[str, Any]]) -> None:
    """Writes the run's CSV rows (and the histograms) through the TensorBoard sink."""
    import gradwatch as gw
    from gradwatch._sinks.tb_sink import TensorBoardSink

    info = gw.read_run(run_dir)
    windows = gw.read_windows(run_dir, source="csv")
    stats = gw.read_stats(run_dir, source="csv")
    layers = gw.read_stats(run_dir, level="layer", source="csv")
    alerts = gw.read_alerts(run_dir, source="csv")
    sink = TensorBoardSink(run_dir, info, [layer["name"] for layer in info["layers"]])
    previous = 0
    for window in windows.to_dict("records"):
        step = int(window["step"])
        in_window = (alerts.step > previous) & (alerts.step <= step)
        sink.write_window(
            _plain(window), [_plain(r) for r in stats[stats.step == step].to_dict("records")],
            [_plain(r) for r in layers[layers.step == step].to_dict("records")],
            [_plain(r) for r in alerts[in_window].to_dict("records")], previous + 1,
            histograms=[h for h in histograms if previous < h["step"] <= step] or None,
        )
        previous = step
    sink.close()


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(log_dir: str) -> tuple[subprocess.Popen, str]:
    """A real ``tensorboard`` server on a free port; returns it once it serves the run's scalars."""
    port = _free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host", "127.0.0.1",
               "--port", str(port), "--samples_per_plugin", "gradwatch=0,text=1000", "--reload_interval", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                if b"gradwatch/grad_norm" in response.read():
                    return server, url
        except OSError:
            pass
        time.sleep(1)
    server.terminate()
    raise RuntimeError(f"tensorboard did not serve {log_dir!r} within 120 s")


# Norms and ratios span orders of magnitude: switch those charts to a log y axis (the button
# "Toggle y-axis log scale" of each chart card, reached through the cards' shadow roots).
_LOG_SCALE_JS = """
const cards = [];
const walk = (root) => root.querySelectorAll('*').forEach((el) => {
  if (typeof el._toggleLogScale === 'function') cards.push(el);
  if (el.shadowRoot) walk(el.shadowRoot);
});
walk(document);
const chosen = cards.filter((c) => /norm|update/.test(c.title || ''));
chosen.forEach((c) => c._toggleLogScale());
return chosen.length;
"""


_DEEP_COUNT_JS = """
let count = 0;
const walk = (root) => root.querySelectorAll('*').forEach((el) => {
  if (el.matches(arguments[0])) count += 1;
  if (el.shadowRoot) walk(el.shadowRoot);
});
walk(document);
return count;
"""


def _wait_drawn(driver: Any, selector: str, timeout: float = 120) -> None:
    """Waits until the page (shadow roots included) has ``selector`` elements and their number
    has not changed for 3 s: the dashboard has fetched its data and drawn it."""
    counts: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts.append(driver.execute_script(_DEEP_COUNT_JS, selector))
        if len(counts) >= 4 and counts[-1] > 0 and len(set(counts[-4:])) == 1:
            return
        time.sleep(1)
    print(f"warning: {driver.current_url} still changing after {timeout:.0f} s; saving it as it is")


def screenshot(url: str, out_dir: str) -> list[str]:
    """One PNG per dashboard, from headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1100",
                     "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    saved = []
    try:
        for dashboard, name in DASHBOARDS:
            driver.get(f"{url}/#{dashboard}")
            _wait_drawn(driver, "td" if dashboard == "text" else "path")
            if dashboard == "custom_scalars":
                toggled = driver.execute_script(_LOG_SCALE_JS)
                print(f"log-scale y axis on {toggled} custom-scalars charts")
                _wait_drawn(driver, "path")
            path = os.path.join(out_dir, name)
            driver.save_screenshot(path)
            saved.append(path)
    finally:
        driver.quit()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "screenshots"))
    parser.add_argument("--run-dir", help="where to write the run (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = args.run_dir or tempfile.mkdtemp(prefix="gradwatch-screens-")
    run_dir = os.path.join(root, "vanishing_mlp")
    histograms = train(run_dir)
    from gradwatch._io.readers import list_runs

    if not list_runs(run_dir, source="events"):  # the engine did not write TensorBoard events
        write_events(run_dir, histograms)
    server, url = start_tensorboard(root)
    try:
        for path in screenshot(url, args.out):
            print(f"saved {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.run_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
