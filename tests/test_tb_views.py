"""Every TensorBoard view of gradwatch, in headless Chromium, on real runs under TensorBoard's
default flags: a run that diverges, a run with a dead layer and a 3,000-step run whose step
2,222 is NaN (TensorBoard keeps a sample of its 1,500 windows).

One TensorBoard and one browser serve the whole module. Each view's screenshot is saved
under ``dashboards/screenshots/`` when ``GRADWATCH_SCREENSHOTS=1`` (else in the test's tmp dir).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _view_runs import (
    LONG_LOG_EVERY,
    LONG_NAN_STEP,
    LONG_STEPS,
    TensorBoard,
    dead_run,
    diverged_run,
    long_run,
)

RUNS = {"diverged": diverged_run, "dead": dead_run, "long": long_run}
SHOTS = os.path.join(os.path.dirname(__file__), "..", "dashboards", "screenshots")
# Viridis, as the tab's RAMP: the expected colour of a norm on the fixed scale is computed here
RAMP = np.array([
    [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
], dtype=float)


def ramp(t: float) -> list[int]:
    x = min(1.0, max(0.0, t)) * (len(RAMP) - 1)
    i = min(len(RAMP) - 2, int(math.floor(x)))
    return [int(round(v)) for v in RAMP[i] + (x - i) * (RAMP[i + 1] - RAMP[i])]


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    from _chromium import chromium_driver, require_chromium

    require_chromium()
    root = tmp_path_factory.mktemp("views")
    start = time.perf_counter()
    for name, write in RUNS.items():
        write(str(root / name))
    print(f"runs trained in {time.perf_counter() - start:.1f} s")
    server = TensorBoard(str(root), str(tmp_path_factory.mktemp("tb") / "stderr.txt"))
    driver = None
    try:
        deadline = time.monotonic() + 120
        runs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                runs = {r["run"]: r["last_step"] for r in server.json("/data/plugin/gradwatch/runs")["runs"]}
            except (OSError, ValueError):
                runs = {}
            if set(runs) == set(RUNS) and runs["long"] and runs["long"] >= LONG_STEPS:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard never listed the runs; last saw {runs}")
        driver = chromium_driver(1400, 1000)
        yield {"root": str(root), "server": server, "driver": driver}
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


def shot(driver: Any, name: str, tmp_path: Any) -> str:
    """Saves the page's screenshot as ``name`` (in dashboards/screenshots/ when asked to)."""
    folder = SHOTS if os.environ.get("GRADWATCH_SCREENSHOTS") == "1" else str(tmp_path)
    path = os.path.join(folder, name)
    driver.save_screenshot(path)
    assert os.path.getsize(path) > 10_000
    return path


def open_tab(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.switch_to.default_content()
    driver.get(url)
    frame = WebDriverWait(driver, 60).until(
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "iframe[src*='name=gradwatch']")), None))
    driver.switch_to.frame(frame)


def ready(driver: Any, run: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "const r = document.getElementById('gw-root');"
        "return r && r.dataset.state === 'ready' && r.dataset.run === arguments[0];", run))


def choose(driver: Any, run: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "gw-run")).select_by_value(run)
    ready(driver, run)


_PIXEL_JS = """
const c = document.getElementById('gw-heatmap'); const h = +c.dataset.rowHeight;
const e = c.dataset.colEdges.split(',').map(Number);
const [row, col, dx] = arguments;
const x = dx === null ? (e[col] + e[col + 1]) >> 1 : e[col] + dx;
return Array.from(c.getContext('2d').getImageData(x, row * h + (h >> 1), 1, 1).data).slice(0, 3);
"""


def pixel(driver: Any, row: int, col: int, dx: int | None = None) -> list[int]:
    """The heatmap's colour at the middle of cell (row, col) (or ``dx`` px right of its left edge)."""
    return driver.execute_script(_PIXEL_JS, row, col, dx)


def hover(driver: Any, row: int, col: int) -> str:
    """Moves the pointer over cell (row, col) and returns the tooltip's text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    canvas = driver.find_element(By.ID, "gw-heatmap")
    geometry = driver.execute_script(
        "const c = document.getElementById('gw-heatmap'); const h = +c.dataset.rowHeight;"
        "const e = c.dataset.colEdges.split(',').map(Number); const [row, col] = arguments;"
        "return {x: (e[col] + e[col + 1]) / 2, y: row * h + h / 2, w: c.width, h: c.height};", row, col)
    rect = canvas.rect
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(geometry["x"] * rect["width"] / geometry["w"] - rect["width"] / 2),
        int(geometry["y"] * rect["height"] / geometry["h"] - rect["height"] / 2)).perform()
    tooltip = driver.find_element(By.ID, "gw-tooltip")
    WebDriverWait(driver, 10).until(lambda d: tooltip.is_displayed())
    return tooltip.text


def test_long_run_under_default_flags_keeps_every_alert_and_says_windows_were_dropped(views, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver = views["server"], views["driver"]
    flow = server.json("/data/plugin/gradwatch/flow", run="long")
    windows = LONG_STEPS // LONG_LOG_EVERY
    print(f"default flags: TensorBoard kept {flow['windows']} of {windows} windows")
    assert flow["windows"] < windows // 2  # TensorBoard sampled the windows ...
    expected = pd.read_csv(os.path.join(views["root"], "long", "alerts.csv"))
    assert (expected.step == LONG_NAN_STEP).any()
    assert flow["alerts"] == len(expected) and flow["alerts_source"] == "alerts.csv"  # ... not the alerts
    assert flow["dropped"]["kept_windows"] == flow["windows"]
    assert flow["dropped"]["expected_windows"] == windows

    open_tab(driver, f"{server.url}/#gradwatch&gw_run=long")  # the run named in the URL is shown
    ready(driver, "long")
    dropped = driver.find_element(By.ID, "gw-dropped")
    assert dropped.is_displayed()
    assert f"kept only {flow['windows']} of about {windows} windows" in dropped.text
    assert "The alerts below are all of them (read from alerts.csv)" in dropped.text
    notices_top = driver.execute_script("return document.getElementById('gw-notices').firstChild.id")
    assert notices_top == "gw-dropped"  # the first thing under the run bar
    rows = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts tbody tr")
    first = {td.get_attribute("data-col"): td.text for td in rows[0].find_elements(By.TAG_NAME, "td")}
    assert (first["step"], first["kind"], first["severity"]) == (str(LONG_NAN_STEP), "nonfinite_gradient",
                                                                 "error")
    canvas = driver.find_element(By.ID, "gw-heatmap")
    assert int(canvas.get_attribute("data-markers")) >= 1
    ticks = [int(t) for t in driver.find_element(By.ID, "gw-axis").get_attribute("data-ticks").split(",")]
    assert len(ticks) >= 4 and ticks == sorted(ticks) and ticks[-1] <= LONG_STEPS
    assert all(t % 100 == 0 for t in ticks)  # round step numbers
    shot(driver, "gradient_flow_long_default_flags.png", tmp_path)

    # zoom into steps 2,100-2,300: only the windows there, the NaN step's alert outlined
    driver.find_element(By.ID, "gw-zoom-start").send_keys("2100")
    driver.find_element(By.ID, "gw-zoom-end").send_keys("2300")
    driver.find_element(By.ID, "gw-zoom-apply").click()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.getElementById('gw-root').dataset.state === 'ready' &&"
        " !document.getElementById('gw-zoom-reset').disabled"))
    zoomed = server.json("/data/plugin/gradwatch/flow", run="long", start=2100, end=2300)
    assert 0 < zoomed["windows"] < flow["windows"] and zoomed["markers"]
    assert zoomed["first_steps"][0] >= 2100 - LONG_LOG_EVERY and zoomed["steps"][-1] <= 2300 + 100
    assert canvas.get_attribute("data-cols") == str(len(zoomed["steps"]))
    ticks = [int(t) for t in driver.find_element(By.ID, "gw-axis").get_attribute("data-ticks").split(",")]
    assert ticks[0] >= 2100 - 100 and ticks[-1] <= 2300 + 100
    shot(driver, "gradient_flow_zoomed.png", tmp_path)
    driver.find_element(By.ID, "gw-zoom-reset").click()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.getElementById('gw-zoom-reset').disabled"))


def test_dead_and_diverged_runs_on_one_fixed_scale(views, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver, root = views["server"], views["driver"], views["root"]
    open_tab(driver, f"{server.url}/#gradwatch")
    ready(driver, driver.execute_script("return document.getElementById('gw-run').value"))
    choose(driver, "dead")
    assert "gw_run=dead" in driver.execute_script("return window.parent.location.hash")
    assert "gw_run=dead" in driver.execute_script("return window.parent.location.hash")
    flow = server.json("/data/plugin/gradwatch/flow", run="dead")
    layers = pd.read_csv(os.path.join(root, "dead", "layers.csv"))
    assert flow["layers"] == ["input_tanh", "dead_relu", "after_dead", "out"]
    assert flow["scale"] == server.json("/data/plugin/gradwatch/flow", run="diverged")["scale"]  # shared
    scale = flow["scale"]
    col = 3
    step = flow["steps"][col]
    for row, name in enumerate(flow["layers"]):
        l2 = float(layers[(layers.step == step) & (layers.layer == name)].l2.iloc[0])
        got = pixel(driver, row, col)
        if l2 == 0:  # the dead layer (and the one before it): black, not the light grey of "no data"
            assert got == [0, 0, 0], (name, got)
        else:  # the colour of its norm on the fixed scale, whatever the run's own range
            want = ramp((math.log10(l2) - scale["min"]) / (scale["max"] - scale["min"]))
            assert max(abs(a - b) for a, b in zip(got, want)) <= 2, (name, l2, got, want)
    assert float(layers[(layers.step == step) & (layers.layer == "dead_relu")].l2.iloc[0]) == 0
    text = hover(driver, 1, col)
    assert "layer: dead_relu" in text and "exactly 0" in text
    legend = driver.find_element(By.ID, "gw-legend").text
    assert "exactly 0 (dead)" in legend and "no data" in legend
    labels = driver.find_element(By.ID, "gw-scale").text.split()
    assert labels[0] == f"≤1e{int(scale['min'])}" and "1" in labels
    assert labels[-1] == f"≥1e{int(scale['max'])}"
    shot(driver, "gradient_flow_dead.png", tmp_path)

    choose(driver, "diverged")  # the pointer is still over the map: no tooltip of the dead run's layers
    tooltip = driver.find_element(By.ID, "gw-tooltip")
    assert not tooltip.is_displayed() or "dead_relu" not in tooltip.text
    flow = server.json("/data/plugin/gradwatch/flow", run="diverged")
    marked = {(m[0], m[1]) for m in flow["markers"]}
    nan_cell = next((r, c) for r, c in flow["nonfinite"] if (r, c) in marked or (-1, c) in marked)
    magenta = [213, 0, 249]
    assert pixel(driver, *nan_cell) == magenta
    assert pixel(driver, nan_cell[0], nan_cell[1], 1) == magenta  # drawn above its alert's outline
    text = hover(driver, *nan_cell)
    assert f"layer: {flow['layers'][nan_cell[0]]}" in text and "non-finite" in text
    assert driver.find_element(By.ID, "gw-diverged").is_displayed()
    shot(driver, "gradient_flow_diverged.png", tmp_path)

    driver.refresh()  # the run in the URL comes back
    driver.switch_to.frame(WebDriverWait(driver, 60).until(
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "iframe[src*='name=gradwatch']")), None)))
    ready(driver, "diverged")

    from gradwatch._sinks.tb_sink import TensorBoardSink  # a run appears while the tab is open

    sink = TensorBoardSink(os.path.join(root, "late"), {"layers": [{"name": "a"}]}, ["a"])
    sink.write_window({"step": 5, "steps": 5}, [], [{"layer": "a", "variable": "*", "l2": 0.5}], [], 1)
    sink.close()
    # the options read in one script: the tab rebuilds the list when a run appears, and an
    # option found before that and read after it was a stale element (a failed CI run)
    WebDriverWait(driver, 60).until(lambda d: "late" in d.execute_script(
        "return Array.from(document.querySelectorAll('#gw-run option'), o => o.value)"))
    assert driver.execute_script("return document.getElementById('gw-root').dataset.run") == "diverged"


_DEEP_COUNT_JS = """
let count = 0;
const walk = (root) => root.querySelectorAll('*').forEach((el) => {
  if (el.matches(arguments[0])) count += 1;
  if (el.shadowRoot) walk(el.shadowRoot);
});
walk(document);
return count;
"""


# The cards' "Toggle y-axis log scale" button, reached through their shadow roots (norm charts only).
_LOG_SCALE_JS = """
const cards = [];
const walk = (root) => root.querySelectorAll('*').forEach((el) => {
  if (typeof el._toggleLogScale === 'function') cards.push(el);
  if (el.shadowRoot) walk(el.shadowRoot);
});
walk(document);
const chosen = cards.filter((c) => /norm/.test(c.title || ''));
chosen.forEach((c) => c._toggleLogScale());
return chosen.length;
"""


def drawn(driver: Any, url: str, selector: str, timeout: float = 60) -> int:
    """Opens a TensorBoard dashboard and waits until it has ``selector`` elements (shadow roots
    included) whose number held for 2 s; returns that number."""
    driver.switch_to.default_content()
    driver.get(url)
    counts: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts.append(driver.execute_script(_DEEP_COUNT_JS, selector))
        if len(counts) >= 3 and counts[-1] > 0 and len(set(counts[-3:])) == 1:
            return counts[-1]
        time.sleep(1)
    raise AssertionError(f"{url} drew no stable {selector!r}: {counts[-5:]}")


def _hist_buckets(server: Any, run: str, tag: str) -> list[tuple[int, np.ndarray]]:
    data = server.json("/data/plugin/histograms/histograms", run=run, tag=tag)
    return [(step, np.array(buckets)) for _, step, buckets in data]


def test_scalars_histograms_distributions_text_and_custom_scalars(views, tmp_path):
    server, driver, root = views["server"], views["driver"], views["root"]
    # Scalars: at most 20 cards a run, per-layer cards in model order
    tags = server.json("/data/plugin/scalars/tags")
    for run in RUNS:
        assert len(tags[run]) <= 20, (run, len(tags[run]))
        model = [layer["name"] for layer in pd.read_json(os.path.join(root, run, "run.json"),
                                                          typ="series")["layers"]]
        norms = sorted(t for t in tags[run] if t.startswith("gradwatch/grad_norm/"))
        assert [t.split("/")[2].split("_", 1)[1] for t in norms] == model  # the sort TensorBoard uses
    drawn(driver, f"{server.url}/#scalars&tagFilter=grad_norm%2F", "path")
    shot(driver, "scalars.png", tmp_path)

    # Histograms: short runs have them from their first step; a dead layer's zeros sit at 0
    hist_tags = server.json("/data/plugin/histograms/tags")
    for run in ("diverged", "dead"):
        steps = {step for tag in hist_tags[run] for step, _ in _hist_buckets(server, run, tag)}
        assert 1 in steps, (run, steps)
    assert 11 in {s for t in hist_tags["diverged"] for s, _ in _hist_buckets(server, "diverged", t)}
    assert "gradwatch/grad_log10_abs/01_dead_relu" not in hist_tags["dead"]  # no empty log10 chart
    for _, buckets in _hist_buckets(server, "dead", "gradwatch/grad_values/01_dead_relu"):
        # every entry of its kernel and bias, in one bucket at exactly 0
        assert buckets[:, :2].min() == buckets[:, :2].max() == 0.0 and buckets[:, 2].sum() == 16 * 16 + 16
    drawn(driver, f"{server.url}/#histograms&regexInput=dead", "path")
    shot(driver, "histograms.png", tmp_path)
    drawn(driver, f"{server.url}/#distributions&regexInput=dead", "path")
    shot(driver, "distributions.png", tmp_path)

    # Text: one short table, the run's first problem first
    text = server.json("/data/plugin/text/text", run="long", tag="gradwatch/alerts")
    latest = max(text, key=lambda t: t["step"])["text"]
    rows = [line for line in latest.split("<tr>")[2:]]
    assert f"<td>{LONG_NAN_STEP}</td>" in rows[0] and "nonfinite gradient" in rows[0]
    text = server.json("/data/plugin/text/text", run="diverged", tag="gradwatch/alerts")
    latest = max(text, key=lambda t: t["step"])["text"]
    assert latest.index("exploding gradient") < latest.index("nonfinite gradient")
    assert "<th>first step</th>" in latest and latest.count("<th>") == 4
    drawn(driver, f"{server.url}/#text&regexInput=diverged", "td")
    shot(driver, "text_alerts.png", tmp_path)

    # Custom Scalars: the layout of every run (per-layer charts in model order)
    layout = server.json("/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles[0] == "gradient norm" and titles[-1] == "per layer"
    per_layer = [c["title"].split(":")[0] for c in layout["category"][-1]["chart"]]
    assert per_layer[:4] == ["input_tanh", "dead_relu", "after_dead", "out"] or "hidden" in per_layer
    drawn(driver, f"{server.url}/#custom_scalars&regexInput=long", "path")
    toggled = driver.execute_script(_LOG_SCALE_JS)  # norms span decades: the card's log y axis
    assert toggled >= 2
    time.sleep(2)
    shot(driver, "custom_scalars.png", tmp_path)


# The layer-norm chart: each layer's colour as RGB, how many of its pixels are in the chart and in
# the zero band, the decade labels and their y.
_LINES_JS = """
const c = document.getElementById('gw-lines');
const probe = document.createElement('canvas').getContext('2d');
const rgb = JSON.parse(c.dataset.colours).map((col) => {
  probe.fillStyle = col; const h = probe.fillStyle;
  return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
});
const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const counts = rgb.map(() => [0, 0]);
for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
  const o = (y * c.width + x) * 4;
  rgb.forEach((k, i) => {
    const d = Math.abs(data[o] - k[0]) + Math.abs(data[o + 1] - k[1]) + Math.abs(data[o + 2] - k[2]);
    if (d <= 12) counts[i][y >= c.height - +c.dataset.zeroBand ? 1 : 0] += 1;
  });
}
const ticks = [...document.querySelectorAll('#gw-lines-yaxis .gw-ytick[data-decade]')];
return {rgb, counts, lines: +c.dataset.lines, ticks: c.dataset.yTicks,
  labels: ticks.map((t) => t.textContent), tops: ticks.map((t) => parseFloat(t.style.top)),
  legend: [...document.querySelectorAll('#gw-lines-legend .gw-line-key')].map((e) => e.textContent)};
"""

_NEAR_JS = """
const c = document.getElementById('gw-lines'); const [x, y] = arguments;
return Array.from(c.getContext('2d').getImageData(x - 2, y - 2, 5, 5).data);
"""


def test_layer_norms_chart_one_colour_per_layer_on_decades(views, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver, root = views["server"], views["driver"], views["root"]
    driver.switch_to.default_content()
    driver.get("about:blank")  # a fresh page: the run named in the URL is the one shown
    open_tab(driver, f"{server.url}/#gradwatch&gw_run=dead")
    ready(driver, "dead")
    flow = server.json("/data/plugin/gradwatch/flow", run="dead")
    layers = pd.read_csv(os.path.join(root, "dead", "layers.csv"))
    if "variable" in layers:
        layers = layers[layers.variable == "*"]
    got = driver.execute_script(_LINES_JS)
    assert got["legend"] == flow["layers"] == ["input_tanh", "dead_relu", "after_dead", "out"]  # model order
    rgb = [tuple(c) for c in got["rgb"]]
    assert all(sum(abs(a - b) for a, b in zip(p, q)) > 60 for i, p in enumerate(rgb) for q in rgb[i + 1:])
    by_layer = {name: layers[layers.layer == name].l2.to_numpy() for name in flow["layers"]}
    finite = [name for name, l2 in by_layer.items() if (l2 > 0).any()]
    dead = [name for name, l2 in by_layer.items() if (l2 == 0).all()]
    assert "dead_relu" in dead and "out" in finite and set(finite) | set(dead) == set(flow["layers"])
    assert got["lines"] == len(finite)
    for i, name in enumerate(flow["layers"]):  # a line in its own colour, or its marks at "= 0"
        chart, zero_band = got["counts"][i]
        assert (chart > 50) if name in finite else (zero_band > 10 and chart == 0), (name, got["counts"][i])

    # y ticks: every decade the norms span, labelled 1e-k, evenly spaced (a log axis)
    nonzero = layers.l2[layers.l2 > 0]
    lo, hi = math.floor(math.log10(nonzero.min())), math.ceil(math.log10(nonzero.max()))
    decades = [int(t) for t in got["ticks"].split(",")]
    assert decades == list(range(lo, hi + 1)) and len(decades) >= 3
    assert got["labels"] == ["1" if d == 0 else "10" if d == 1 else f"1e{d}" for d in decades]
    gaps = np.diff(got["tops"])
    assert (gaps < 0).all() and np.ptp(gaps) <= 1.01  # higher decades higher up, equal spacing

    # the out layer's norm at column 3 is drawn where the decades put it, in its colour
    col = 3
    l2 = float(layers[(layers.step == flow["steps"][col]) & (layers.layer == "out")].l2.iloc[0])
    edges = [int(e) for e in driver.execute_script(
        "return document.getElementById('gw-heatmap').dataset.colEdges").split(",")]
    x = (edges[col] + edges[col + 1]) // 2
    y = int(round(np.interp(math.log10(l2), decades, got["tops"])))
    near = np.array(driver.execute_script(_NEAR_JS, x, y)).reshape(-1, 4)[:, :3]
    out = np.array(rgb[flow["layers"].index("out")])
    assert np.abs(near - out).sum(axis=1).min() <= 40, (l2, near.tolist())

    canvas = driver.find_element(By.ID, "gw-lines")
    rect = canvas.rect
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(x - rect["width"] / 2), int(y - rect["height"] / 2)).perform()
    tooltip = driver.find_element(By.ID, "gw-tooltip")
    WebDriverWait(driver, 10).until(lambda d: tooltip.is_displayed())
    assert "layer: out" in tooltip.text
    assert f"steps: {flow['first_steps'][col]}–{flow['steps'][col]}" in tooltip.text
    shown = float(tooltip.text.split("gradient norm: ")[1].split()[0])
    assert shown == pytest.approx(l2, rel=0.01)
    driver.execute_script("document.getElementById('gw-lines-section').scrollIntoView({block: 'center'})")
    shot(driver, "layer_norms.png", tmp_path)

    choose(driver, "diverged")  # NaN/Inf windows: magenta in the top band, no point on a line
    flow = server.json("/data/plugin/gradwatch/flow", run="diverged")
    cols = sorted({c for _, c in flow["nonfinite"]})
    assert cols and all(v is None for row in flow["values"] for v in (row[c] for c in cols))
    edges = [int(e) for e in driver.execute_script(
        "return document.getElementById('gw-heatmap').dataset.colEdges").split(",")]
    for c in cols:
        x = (edges[c] + edges[c + 1]) // 2
        top = np.array(driver.execute_script(_NEAR_JS, x, 7)).reshape(-1, 4)
        assert (top[:, :3] == [213, 0, 249]).all(axis=1).any(), c
