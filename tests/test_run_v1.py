"""The committed schema-version-1 runs (``tests/data/run_v1``, ``watch_v1``, written by gradwatch
0.1.0, see ``tests/data/make_run_v1.py``) open in every reader, the report, the summary command
and the TensorBoard plugin. Expected values are the fixture's own CSV text, read here with the
``csv`` module, not with gradwatch."""

from __future__ import annotations

import csv
import math
import os
import shutil

import pandas as pd
import pytest
from _plugin import get_json, plugin_over

import gradwatch as gw
from gradwatch._io import tb_format
from gradwatch._io.readers import event_files, iter_records
from gradwatch._io.schema import SCHEMA_VERSION_KEY, check_schema_version
from gradwatch._report.report import build_report, load_all
from gradwatch.cli import main

pytestmark = pytest.mark.fast

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RUNS = ("run_v1", "watch_v1")


def csv_rows(run: str, name: str) -> list[dict[str, str]]:
    with open(os.path.join(DATA, run, name), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A copy of the fixture runs (the report writes beside them; the originals stay as committed)."""
    root = tmp_path_factory.mktemp("v1")
    for run in RUNS:
        shutil.copytree(os.path.join(DATA, run), root / run)
    return str(root)


@pytest.fixture(scope="module")
def events_root(root, tmp_path_factory) -> str:
    """The same runs with their event files only (no CSV, no run.json)."""
    events = tmp_path_factory.mktemp("v1_events")
    for run in RUNS:
        os.makedirs(events / run)
        for path in event_files(os.path.join(root, run)):
            shutil.copy(path, events / run)
    return str(events)


def test_the_fixture_is_version_1_with_everything_in_it():
    for run in RUNS:
        info = gw.read_run(os.path.join(DATA, run))
        assert SCHEMA_VERSION_KEY not in info and check_schema_version(info, run) == 1
        assert info["gradwatch_version"] == "0.1.0"
        files = {"run.json", "windows.csv", "stats.csv", "layers.csv", "alerts.csv"}
        assert files <= set(os.listdir(os.path.join(DATA, run)))
        assert len(event_files(os.path.join(DATA, run))) == 1
    assert os.path.getsize(os.path.join(DATA, "run_v1", "run.json")) < 1 << 20
    (path,) = event_files(os.path.join(DATA, "run_v1"))
    tags = {tag for record in iter_records(path) for tag in _tags(record)}
    assert {"gradwatch/grad_log10_abs/live", "gradwatch/clip_fraction", tb_format.WINDOW_TAG,
            tb_format.RUN_TAG} <= tags


def _tags(record: bytes) -> list[str]:
    from tensorboard.compat.proto import event_pb2

    return [value.tag for value in event_pb2.Event.FromString(record).summary.value]


def test_readers_give_the_csv_values(root):
    run = os.path.join(root, "run_v1")
    windows = gw.read_windows(run)
    expected = csv_rows("run_v1", "windows.csv")
    assert list(windows.step) == [int(r["step"]) for r in expected] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert list(windows.global_l2) == [float(r["global_l2"]) for r in expected]
    assert list(windows.clip_fraction) == [float(r["clip_fraction"]) for r in expected]
    assert windows.set_index("step").first_nonfinite_step[25] == 23

    layers = gw.read_stats(run, level="layer")
    assert list(layers.layer[:3]) == ["live", "dead", "out"]  # model order, from run.json
    first_live = next(r for r in csv_rows("run_v1", "layers.csv") if r["layer"] == "live")
    assert layers.l2[0] == float(first_live["l2"]) and layers.step[0] == int(first_live["step"])
    stats = gw.read_stats(run)
    assert len(stats) == len(csv_rows("run_v1", "stats.csv")) == 8 * 6
    assert list(stats.variable[:6]) == [v["name"] for v in gw.read_run(run)["variables"]]

    alerts = gw.read_alerts(run)
    expected = csv_rows("run_v1", "alerts.csv")
    assert list(alerts.kind) == [r["kind"] for r in expected]
    assert {"dead_relu", "no_learning_signal", "nonfinite_gradient"} == set(alerts.kind)
    error = alerts[alerts.severity == "error"].iloc[0]
    assert (error.step, error.layer, error.variable, error.value) == (23, "live", "live/kernel", 72.0)
    assert gw.list_runs(root) == list(RUNS)

    watch = os.path.join(root, "watch_v1")
    assert list(gw.read_windows(watch).global_l2) == [float(r["global_l2"]) for r in csv_rows(
        "watch_v1", "windows.csv")]
    assert gw.read_alerts(watch).empty and gw.read_run(watch)["front"] == "Watch"


@pytest.mark.parametrize("read", [
    lambda d, s: gw.read_windows(d, source=s),
    lambda d, s: gw.read_stats(d, source=s),
    lambda d, s: gw.read_stats(d, level="layer", source=s),
    lambda d, s: gw.read_alerts(d, source=s),
], ids=["windows", "stats", "layers", "alerts"])
@pytest.mark.parametrize("run", RUNS)
def test_the_events_of_version_1_read_like_its_csv(root, events_root, read, run):
    from_events = read(os.path.join(events_root, run), "auto")
    from_csv = read(os.path.join(root, run), "csv")
    pd.testing.assert_frame_equal(from_events, from_csv, check_dtype=False)
    assert gw.read_run(os.path.join(events_root, run)) == gw.read_run(os.path.join(root, run))


def test_report_and_summary(root, tmp_path, capsys):
    out = tmp_path / "report.html"
    path, verdicts = build_report(root, str(out))
    html = out.read_text(encoding="utf-8")
    assert path == str(out) and html.startswith("<!DOCTYPE html>") and "run_v1" in html and "watch_v1" in html
    by_name = {v.run.name: v for v in verdicts}
    assert by_name["run_v1"].errors_raised and by_name["run_v1"].state == "errors"
    assert {(p.layer, p.kind) for p in by_name["run_v1"].problems} >= {
        ("live", "dead_relu"), ("dead", "dead_relu"), ("out", "no_learning_signal")
    }
    assert by_name["watch_v1"].state == "healthy"

    assert main(["summary", os.path.join(root, "run_v1")]) == 1  # an error alert was raised
    text = capsys.readouterr().out
    assert "run_v1: errors" in text and "dead units" in text and "non-finite" in text
    assert main(["summary", os.path.join(root, "watch_v1")]) == 0
    assert "watch_v1: healthy" in capsys.readouterr().out
    (loaded,) = load_all(os.path.join(root, "run_v1"), source="events")
    assert loaded.run.layer_order == ["live", "dead", "out"]


def test_the_plugin_routes(root):
    plugin, _ = plugin_over(root)
    status, runs = get_json(plugin, "/runs")
    assert status == 200
    assert {r["run"]: r["last_step"] for r in runs["runs"]} == {"run_v1": 40, "watch_v1": 20}
    status, flow = get_json(plugin, "/flow", run="run_v1")
    assert status == 200 and flow["layers"] == ["live", "dead", "out"] and flow["windows"] == 8
    assert flow["steps"] == [5, 10, 15, 20, 25, 30, 35, 40] and flow["first_steps"][0] == 1
    first = {r["layer"]: float(r["l2"]) for r in csv_rows("run_v1", "layers.csv") if r["step"] == "5"}
    assert flow["values"][0][0] == round(math.log10(first["live"]), 3)
    assert flow["values"][1][0] is None  # "dead": a zero norm has no log
    assert flow["alerts"] == len(csv_rows("run_v1", "alerts.csv")) and flow["dropped"]["corrupt"] == 0
    status, alerts = get_json(plugin, "/alerts", run="run_v1")
    rows = [dict(zip(alerts["columns"], row)) for row in alerts["rows"]]
    assert status == 200
    assert [r["kind"] for r in rows] == [r["kind"] for r in csv_rows("run_v1", "alerts.csv")]
    nonfinite = next(r for r in rows if r["severity"] == "error")
    assert (nonfinite["step"], nonfinite["layer_index"], nonfinite["value"]) == (23, 0, 72.0)
    status, flow = get_json(plugin, "/flow", run="watch_v1")
    assert status == 200 and flow["windows"] == 4 and flow["alerts"] == 0
