"""Screenshots of the first screen of ``gradwatch report`` for three real runs (issue 26).

Usage: ``python dashboards/report_screenshots.py [--out dashboards/screenshots] [--keep DIR]``

1. Trains the exploding 2-layer net of ``examples/broken_nets.py`` three ways: as it is (it
   diverges for good), with one batch of NaN inputs and ``on_nonfinite="skip_step"`` at a
   healthy learning rate (it diverges for a step and recovers), and with
   ``clip=gw.clip.GlobalNorm(1.0)`` (clipping fires on every step).
2. Writes each run's report and, over the three, the comparison page.
3. Opens each in headless Chromium (selenium, ``/usr/bin/chromium`` + ``/usr/bin/chromedriver``)
   and saves the first screen: ``report_diverged.png``, ``report_recovered.png``,
   ``report_clipped.png``, ``report_comparison.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np

SHOTS = ("diverged", "recovered", "clipped")


def _data(nan_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 5).astype("float32")
    if nan_batch is not None:
        x[16 * nan_batch: 16 * (nan_batch + 1), 0] = np.nan
    return x, y


def train(root: str) -> None:
    """The three runs under ``root``."""
    import keras
    from gradwatch.examples import broken_nets

    import gradwatch as gw

    broken_nets.exploding(os.path.join(root, "diverged"))
    broken_nets.exploding(os.path.join(root, "clipped"), clip=gw.clip.GlobalNorm(1.0))
    x, y = _data(nan_batch=4)
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = gw.GradientMonitor(log_dir=os.path.join(root, "recovered"), log_every=2,
                                 on_nonfinite="skip_step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=[monitor])


def shoot(pages: dict[str, str], out: str) -> None:
    """The first screen (1400 x 900) of each page, as ``report_<name>.png`` in ``out``."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from _chromium import chromium_driver

    driver = chromium_driver(1400, 900)
    try:
        for name, page in pages.items():
            driver.get("file://" + os.path.abspath(page))
            path = os.path.join(out, f"report_{name}.png")
            driver.save_screenshot(path)
            print(f"wrote {path}")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "screenshots"))
    parser.add_argument("--keep", help="train into this directory and keep it")
    args = parser.parse_args()
    from gradwatch._report.report import build_report

    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or os.path.join(scratch, "runs")
        train(root)
        pages = {name: build_report(os.path.join(root, name), os.path.join(root, f"{name}.html"))[0]
                 for name in SHOTS}
        pages["comparison"] = build_report(root, os.path.join(scratch, "comparison.html"))[0]
        os.makedirs(args.out, exist_ok=True)
        shoot(pages, args.out)


if __name__ == "__main__":
    main()
