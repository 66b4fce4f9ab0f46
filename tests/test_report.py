"""Post-hoc reports: verdicts against alerts.csv, the HTML/Markdown files, escaping, the
``report`` / ``summary`` commands (exit codes, errors), Chromium rendering, events-only runs."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from _chromium import chromium_driver
from gradwatch.examples import broken_nets

from gradwatch._io.schema import ALERT_COLUMNS, STATS_COLUMNS, WINDOW_COLUMNS
from gradwatch._report.report import build_report, load_all
from gradwatch._report.verdicts import compute_verdicts, discover_runs, load_run, problem_pairs
from gradwatch._sinks.csv_sink import CsvSink
from gradwatch.cli import main

GRADWATCH = os.path.join(os.path.dirname(sys.executable), "gradwatch")
HOSTILE = "<script>alert(1)</script>"
FIGURES_PER_RUN = 6


def _healthy(out: str) -> None:
    import keras

    import gradwatch as gw

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="output")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = gw.GradientMonitor(log_dir=out, log_every=4)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs side by side: a vanishing 12-layer sigmoid MLP (warnings), an exploding net
    (an error: non-finite loss), a healthy 2-layer ReLU net."""
    base = tmp_path_factory.mktemp("runs")
    broken_nets.vanishing(str(base / "vanishing"))
    broken_nets.exploding(str(base / "exploding"))
    _healthy(str(base / "healthy"))
    return base


def _alerts_csv(run_dir) -> pd.DataFrame:
    return pd.read_csv(os.path.join(run_dir, "alerts.csv"), keep_default_na=False,
                       dtype={"layer": str, "kind": str, "severity": str})


def _expected_problems(run_dir) -> dict[tuple[str, str], dict]:
    """(layer, kind) -> first/last warning-or-error step and whether it is active at the end,
    straight from alerts.csv (an info row of the kind with the same layer, or no layer, clears)."""
    alerts = _alerts_csv(run_dir).sort_values("step", kind="stable")
    bad = alerts[alerts.severity.isin(["warning", "error"])]
    out = {}
    for (layer, kind), rows in bad.groupby(["layer", "kind"]):
        last = int(rows.step.max())
        cleared = alerts[(alerts.severity == "info") & (alerts.kind == kind) & alerts.layer.isin([layer, ""])
                         & (alerts.step >= last)]
        out[(layer, kind)] = {"first": int(rows.step.min()), "last": last, "active": cleared.empty}
    return out


@pytest.mark.parametrize("name", ["vanishing", "exploding", "healthy"])
def test_verdicts_match_the_alerts_csv(runs, name):
    verdicts = compute_verdicts(load_run(name, str(runs / name)))
    expected = _expected_problems(runs / name)
    assert problem_pairs(verdicts) == set(expected)
    for problem in verdicts.problems:
        want = expected[(problem.layer, problem.kind)]
        assert (problem.first_step, problem.last_step, problem.active) == (want["first"], want["last"],
                                                                          want["active"])
    layers = pd.read_csv(runs / name / "layers.csv")
    assert set(verdicts.healthy) == set(layers.layer) - {layer for layer, _ in expected}
    if name == "vanishing":
        assert ("sigmoid_0", "vanishing_gradient") in expected and not verdicts.errors_raised
        # the evidence's median is the median of layers.csv from the first alert on
        problem = next(p for p in verdicts.problems if p.layer == "sigmoid_0")
        rows = layers[(layers.layer == "sigmoid_0") & (layers.step >= problem.first_step)]
        assert f"median grad norm {float(np.median(rows.l2_mean.astype(np.float32))):.3g} from step" in (
            problem.evidence)
        assert problem.hint.startswith("Use ReLU")
    if name == "exploding":
        assert verdicts.errors_raised and ("", "nonfinite_gradient") in expected
    if name == "healthy":
        assert expected == {} and set(verdicts.healthy) == {"hidden", "output"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRADWATCH, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def _figures(text: str) -> list[str]:
    """The inline <svg> of every figure, by its figure element."""
    return re.findall(r'<figure data-figure="[a-z_]+"><figcaption>[^<]*</figcaption>(<svg .*?</svg>)', text)


@pytest.fixture(scope="module")
def html_report(runs, tmp_path_factory):
    """``gradwatch report`` of the three runs, through the console script."""
    out = tmp_path_factory.mktemp("html") / "report.html"
    result = _cli("report", str(runs), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and result.stderr == ""  # no progress bar when not a TTY
    return out


def test_html_report_of_several_runs_is_self_contained(html_report):
    text = html_report.read_text(encoding="utf-8")
    figures = _figures(text)
    assert text.count("<figure") == len(figures) >= 3 * 2  # heatmap + gradient norms at least, per run
    skipped = text.count("Skipped:")
    assert len(figures) + skipped == 3 * FIGURES_PER_RUN
    for heatmap in re.findall(r'href="data:image/png;base64,([^"]+)"', text):  # the heatmaps' cells
        png = base64.b64decode(heatmap)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") > 0
    assert len(re.findall(r'href="data:image/png', text)) == 3
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:", text) and "<script" not in text
    assert "<link" not in text and "@import" not in text
    # the comparison table: one row per run, linking to its section, with the run's state
    comparison = text.split("Comparison of runs", 1)[1].split("</table>", 1)[0]
    for i, (name, state) in enumerate([("exploding", "diverged"), ("healthy", "healthy"),
                                       ("vanishing", "warnings")]):
        assert f'<a href="#run-{i}">{name}</a></td><td>{state}</td>' in comparison
        assert f'<section id="run-{i}">' in text
    assert "7 (7 active): sigmoid_0, sigmoid_1, sigmoid_2 +4" in comparison


def _write_run(log_dir: str, layers: list[str], windows: int = 6, alert_layer: str | None = None) -> None:
    """A gradwatch run written straight through CsvSink (layer names Keras would refuse)."""
    sink = CsvSink(log_dir)
    sink.open({"layers": [{"name": name, "index": i, "variables": [f"{name}/kernel"]}
                          for i, name in enumerate(layers)],
               "variables": [{"name": f"{name}/kernel", "layer": name} for name in layers]})
    rng = np.random.default_rng(0)
    for w in range(1, windows + 1):
        step = 10 * w
        window = {c: float("nan") for c in WINDOW_COLUMNS}
        window.update(step=step, steps=10, loss=1.0 / w, nonfinite_steps=0, skipped_steps=0,
                      first_nonfinite_step=None, nonfinite_loss_at_first=None)
        rows = []
        for i, name in enumerate(layers):
            row = {c: float("nan") for c in STATS_COLUMNS}
            norm = float(10.0 ** (-i / 10) * rng.uniform(0.5, 2))
            row.update(step=step, steps=10, layer=name, variable="*", l2=norm, l2_max=norm, l2_min=norm,
                       l2_mean=norm, nonfinite=0, grad_steps=10, dead_frac=0.1 * (i % 3))
            rows.append(row)
        sink.write_rows(window, [dict(r, variable=f"{r['layer']}/kernel") for r in rows], rows, step - 9)
    if alert_layer is not None:
        alert = dict(zip(ALERT_COLUMNS, [20, alert_layer, "*", "vanishing_gradient", "warning", 1e-9, 1e-8,
                                         f"Layer {alert_layer!r}: tiny", "Use ReLU <b>now</b>"]))
        sink.write_alerts([alert])
    sink.close()


@pytest.mark.fast
def test_hostile_layer_names_are_escaped_in_html_and_markdown(tmp_path):
    run = tmp_path / "hostile"
    _write_run(str(run), [HOSTILE, "a$b|c", "plain"], alert_layer=HOSTILE)
    html_path, verdicts = build_report(str(run), str(tmp_path / "r.html"))
    assert problem_pairs(verdicts[0]) == {(HOSTILE, "vanishing_gradient")}
    text = open(html_path, encoding="utf-8").read()
    assert HOSTILE not in text and "<b>now" not in text and "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "Use ReLU &lt;b&gt;now&lt;/b&gt;" in text
    md_path, _ = build_report(str(run), str(tmp_path / "r.md"), fmt="md")
    md = open(md_path, encoding="utf-8").read()
    assert HOSTILE not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "a$b\\|c" in md


def test_markdown_writes_its_figures_beside_it(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "report.md"
    assert main(["report", str(runs / "vanishing"), "-o", str(out), "--format", "md"]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    md = out.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all(link.startswith("report_files/") for link in links)
    svgs = sorted(os.listdir(out.parent / "report_files"))
    assert sorted(os.path.basename(link) for link in links) == svgs
    assert all((out.parent / link).read_text().startswith("<svg ") for link in links)
    assert len(links) + md.count("Skipped:") == FIGURES_PER_RUN
    assert "| sigmoid_0 | vanishing | warning |" in md


def test_summary_exit_status_gates_on_error_alerts(runs, capsys):
    healthy = _cli("summary", str(runs / "healthy"))
    assert healthy.returncode == 0, healthy.stderr
    assert "healthy" in healthy.stdout and "hidden" in healthy.stdout and healthy.stderr == ""
    assert main(["summary", str(runs / "vanishing")]) == 0  # warnings do not fail
    warnings_only = capsys.readouterr().out
    assert "sigmoid_0" in warnings_only and "hint (vanishing): Use ReLU" in warnings_only
    errors = _cli("summary", str(runs))  # several runs: exploding raised an error
    assert errors.returncode == 1
    titles = [line.strip().split(": ")[:2] for line in errors.stdout.splitlines()
              if line.startswith(("exploding: ", "healthy: ", "vanishing: "))]
    assert titles == [["exploding", "diverged"], ["healthy", "healthy"], ["vanishing", "warnings"]]
    assert "1 of 3 run(s) diverged or raised an error alert: exploding" in errors.stdout
    with pytest.raises(SystemExit):
        main(["summary", "--help"])
    assert "raised at some point (even if it later recovered) or the run diverged" in " ".join(
        capsys.readouterr().out.split())


@pytest.mark.parametrize("case", ["empty", "not_gradwatch", "wrong_header", "garbage", "headers_only",
                                  "missing"])
def test_unreadable_input_is_one_line_and_exit_2(runs, tmp_path, capsys, case):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
        expected = "is empty"
    elif case == "not_gradwatch":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
        expected = "No gradwatch run in"
    elif case == "wrong_header":
        shutil.copytree(runs / "healthy", target)
        (target / "layers.csv").write_bytes(b"\x00\xff garbage,,\n1,2\n")
        expected = "layers.csv is not a gradwatch file"
    elif case == "garbage":  # binary bytes without a line end
        shutil.copytree(runs / "healthy", target)
        (target / "windows.csv").write_bytes(bytes(range(14, 256)) * 8)
        expected = "windows.csv is not a gradwatch CSV file: its 1936 bytes hold no complete line"
    elif case == "headers_only":
        _write_run(str(target), ["a"], windows=0)
        expected = "no window was written yet (1 run(s): headers_only; their files hold headers only)"
    else:
        expected = "does not exist"
    for command in ("report", "summary"):
        args = [command, str(target)] + (["-o", str(tmp_path / "r.html")] if command == "report" else [])
        if case == "empty":  # once through the console script, the rest in-process (same code path)
            result = _cli(*args)
            status, stderr = result.returncode, result.stderr
        else:
            status = main(args)
            stderr = capsys.readouterr().err
        assert status == 2, (command, stderr)
        assert "Traceback" not in stderr and stderr.count("\n") == 1
        assert stderr.startswith("gradwatch: error: ") and expected in stderr
        assert not (tmp_path / "r.html").exists()


@pytest.mark.fast
def test_two_hundred_layers_stay_readable(tmp_path):
    layers = [f"block_{i:03d}" for i in range(200)]
    _write_run(str(tmp_path / "wide"), layers, windows=5, alert_layer="block_150")
    path, verdicts = build_report(str(tmp_path / "wide"), str(tmp_path / "wide.html"), max_lines=12)
    text = open(path, encoding="utf-8").read()
    assert 'data-figure="heatmap"' in text
    assert text.count("Showing 12 of 200 layers") == 2  # gradient norms and dead units
    assert "199 layers</td><td>healthy" in text  # healthy layers folded into one row
    heatmap = re.search(r'data-figure="heatmap">.*?viewBox="0 0 1000 (\d+)".*?base64,([^"]+)"', text)
    png = base64.b64decode(heatmap.group(2))
    assert int.from_bytes(png[20:24], "big") == 200  # a pixel row per layer, drawn 5 px high
    assert int(heatmap.group(1)) >= 200 * 5
    from gradwatch._report.verdicts import interesting_layers

    chosen = interesting_layers(verdicts[0], 12)
    assert len(chosen) == 12 and "block_150" in chosen and chosen == sorted(chosen)
    # after the alerted layer: the layers farthest from the median norm (10^-i/10: both ends)
    assert {"block_000", "block_199"} <= set(chosen)


@pytest.mark.fast
def test_a_run_without_windows_is_no_data_not_healthy(tmp_path, capsys):
    # alone it is no readable data (exit 2, above); beside a run with data it is shown
    # as "no data", with no layer called healthy
    _write_run(str(tmp_path / "runs" / "empty_run"), ["a"], windows=0)
    _write_run(str(tmp_path / "runs" / "full_run"), ["a"], windows=2)
    assert main(["summary", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "empty_run: no data" in out and "full_run: healthy" in out
    empty, full = load_all(str(tmp_path / "runs"))
    assert empty.healthy == {} and empty.state == "no data"
    assert list(full.healthy) == ["a"]


@pytest.mark.fast
def test_a_row_of_text_in_numbers_is_left_out_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    _write_run(str(run), ["a", "b"], windows=3)
    lines = (run / "layers.csv").read_text().splitlines()
    fields = lines[2].split(",")  # window 1, layer b
    fields[STATS_COLUMNS.index("l2_mean")] = "garbage"
    lines[2] = ",".join(fields)
    (run / "layers.csv").write_text("\n".join(lines) + "\n")
    assert main(["summary", str(run)]) == 0
    warning = "layers.csv line 3 is not a gradwatch row (l2_mean is 'garbage', not a number)"
    assert any(warning in r.getMessage() for r in caplog.records)
    (verdicts,) = load_all(str(run))
    assert len(verdicts.run.layers) == 5 and verdicts.run.layers["l2_mean"].dtype == np.float32


@pytest.mark.fast
def test_default_progress_is_silent_and_forced_progress_shows(tmp_path, capsys):
    _write_run(str(tmp_path / "run"), ["a", "b"])
    build_report(str(tmp_path / "run"), str(tmp_path / "a.html"))
    assert capsys.readouterr().err == ""
    load_all(str(tmp_path / "run"), progress=True)
    assert "run" in capsys.readouterr().err


def test_report_renders_in_chromium_with_every_figure_loaded(html_report, tmp_path):
    out = html_report
    hostile = tmp_path / "hostile"
    _write_run(str(hostile), [HOSTILE, "b"], alert_layer=HOSTILE)
    build_report(str(hostile), str(tmp_path / "hostile.html"))
    driver = chromium_driver(1300, 900)
    try:
        driver.get(out.as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure > svg')).map(s => "
            "[s.getBoundingClientRect().width, s.getBoundingClientRect().height])")
        assert len(sizes) == len(_figures(out.read_text(encoding="utf-8"))) >= 6
        assert all(width > 800 and height > 100 for width, height in sizes)
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure svg image')).map(i => i.getBBox().height)")
        assert len(cells) == 3 and all(height > 100 for height in cells)  # the heatmaps' cells
        rows = driver.execute_script("return document.querySelectorAll('section').length")
        assert rows == 3
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1300, min(int(height), 8000))
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        driver.get((tmp_path / "hostile.html").as_uri())
        assert driver.execute_script("return document.scripts.length") == 0
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('td')).map(t => t.textContent)")
        assert HOSTILE in cells  # shown as text, not run
    finally:
        driver.quit()


def test_events_only_run_gives_the_same_verdicts(runs, tmp_path):
    from _runs import rows_by_window

    import gradwatch as gw
    from gradwatch._sinks.tb_sink import TensorBoardSink

    source = runs / "vanishing"
    info = gw.read_run(str(source))
    sink = TensorBoardSink(str(tmp_path / "events"), info, [layer["name"] for layer in info["layers"]])
    for window in rows_by_window(str(source)):
        sink.write_window(**window, histograms=None)
    sink.close()
    assert not [n for n in os.listdir(tmp_path / "events") if n.endswith((".csv", ".json"))]
    from_csv = compute_verdicts(load_run("csv", str(source)))
    from_events = load_all(str(tmp_path / "events"))[0]
    assert discover_runs(str(tmp_path / "events"))[0][1] == str(tmp_path / "events")

    def key(v):
        return [(p.layer, p.kind, p.severity, p.first_step, p.last_step, p.active) for p in v.problems]

    assert key(from_events) == key(from_csv) and key(from_csv)
    assert from_events.healthy == from_csv.healthy
    assert all(a.evidence == b.evidence for a, b in zip(from_events.problems, from_csv.problems))
    assert not any(math.isnan(p.value) for p in from_events.problems)


def test_many_runs_make_an_index_page_and_a_page_per_run(tmp_path):
    from gradwatch._report.report import INLINE_RUNS

    count = INLINE_RUNS + 2
    for i in range(count):
        _write_run(str(tmp_path / "runs" / f"r{i:02d}"), ["a", "b"], alert_layer="b" if i == 3 else None)
    out = tmp_path / "report.html"
    path, verdicts = build_report(str(tmp_path / "runs"), str(out))
    index = out.read_text(encoding="utf-8")
    pages = re.findall(r'<a href="(report_files/run-\d{4}\.html)">(r\d\d)</a>', index)
    assert [name for _, name in pages] == [f"r{i:02d}" for i in range(count)]
    assert "<figure" not in index and "<svg" not in index and "no problem found" in index
    for i, (page, name) in enumerate(pages):
        text = (tmp_path / page).read_text(encoding="utf-8")
        assert f"<h2>{name}</h2>" in text and '<a href="../report.html">' in text
        assert len(_figures(text)) >= 2
        assert ("vanishing at &#x27;b&#x27;" in text) == (i == 3)
    assert sorted(os.listdir(tmp_path / "report_files")) == [os.path.basename(p) for p, _ in pages]


@pytest.mark.fast
def test_single_points_and_all_zero_series_are_drawn():
    from gradwatch._report import svg

    steps = np.arange(1.0, 61.0)
    # a few windows measured: every point of a short series is marked
    sparse = np.full(60, np.nan)
    sparse[[0, 20, 21, 40]] = [1e-3, 2e-3, 3e-3, 1e-4]
    chart = svg.line_chart([svg.Series("a", steps, sparse, "#1f77b4")], "t", "ratio", log=True)
    assert chart.count("<circle") == 4 and chart.count("<polyline") == 1  # 21-22 joined
    assert ">1e-4<" in chart and ">1e-2<" in chart  # the log axis covers the values' decades
    # a long series: only its isolated points (between gaps) are marked
    gappy = np.full(60, 1e-3)
    gappy[[44, 45, 47, 48, 50]] = np.nan
    long = svg.line_chart([svg.Series("a", steps, gappy, "#1f77b4")], "t", "ratio", log=True)
    assert long.count("<circle") == 2 and long.count("<polyline") == 2  # steps 47 and 50 alone
    one = svg.line_chart([svg.Series("a", np.array([5.0]), np.array([0.25]), "#000")], "t", "y")
    assert one.count("<circle") == 1 and ">0.2<" in one and ">0.3<" in one  # an axis around 0.25
    zeros = svg.line_chart([svg.Series("dead", steps, np.zeros(60), "#000")], "t", "y", log=True)
    assert zeros.count("<polyline") == 1 and ">0<" in zeros and ">1<" in zeros  # linear 0..1, drawn
    assert "(all 0: not on a log axis)" in svg.line_chart(
        [svg.Series("live", steps, np.ones(60), "#000"), svg.Series("dead", steps, np.zeros(60), "#111")],
        "t", "y", log=True)
