"""The "Gradient Flow" TensorBoard tab against a live TensorBoard (both loaders) and headless Chromium.

Runs are written by gradwatch's own ``TensorBoardSink`` (and by a small raw event
helper for what the sink never writes: a corrupt payload, a non-gradwatch run and a
10,000-window run written without the per-window flush).  Expected values come from
the rows written here, not from the plugin.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import numpy as np
import pytest
from _plugin import get_json as get_json_local
from _plugin import plugin_over

from gradwatch._io import tb_format
from gradwatch._io.schema import SEVERITIES

SAMPLES_FLAG = "--samples_per_plugin=gradwatch=0"
HOSTILE = "<b>x</b>"
HOSTILE_HINT = "Use ReLU and He initialisation <img src=x onerror=alert(1)>"
MLP_LAYERS = ["input_dense", HOSTILE, "hidden/relu", "output"]
MLP_STEPS = [5, 10, 15, 20, 25, 30, 35, 40]
BIG_LAYERS = [f"block{i}/dense" for i in range(8)]
BIG_WINDOWS = 10_000
BIG_SPIKES = [(2, 123), (5, 4321), (7, 9999)]  # (layer, window index) set to l2 = 1e3
BIG_ALERT = (3, 7777)  # (layer, step)
BIG_NAN = (6, 5000)  # (layer, window index): NaN/Inf entries in one window of 10,000
GW_RUNS = {"big", "corrupt", "empty_gw", "gapped", "mlp"}


# -- writing the log directory ------------------------------------------------------------------------


def _event(tag: str, step: int, payload: bytes, plugin: str = tb_format.PLUGIN_NAME) -> Any:
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[payload])
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value]))


def _raw_writer(path: str) -> Any:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return EventFileWriter(path)


def _run_info(layers: list[str]) -> dict[str, Any]:
    """run.json as the engine writes it: Topology.to_json() (layers input -> output)."""
    return {
        "model_name": "m",
        "layers": [
            {"name": n, "index": i, "class_name": "Dense", "activation": "relu", "variables": [f"{n}/kernel"]}
            for i, n in enumerate(layers)
        ],
        "variables": [],
    }


def _layer_row(step: int, layer: str, l2: float, nonfinite: float = 0.0) -> dict[str, Any]:
    return {"step": step, "steps": 5, "layer": layer, "variable": "*", "l2": l2, "l2_max": l2,
            "nonfinite": nonfinite, "dead_frac": math.nan, "update_ratio": 1e-3}


def write_mlp(log_dir: str) -> dict[str, Any]:
    """4 layers x 8 windows through TensorBoardSink; a zero norm, a NaN norm and two alerts."""
    from gradwatch._sinks.tb_sink import TensorBoardSink

    rng = np.random.default_rng(1)
    l2 = 10.0 ** rng.uniform(-5, 1, size=(len(MLP_LAYERS), len(MLP_STEPS)))
    l2[2, 3] = 0.0  # hidden/relu at step 20: zero -> no value
    l2[3, 5] = math.nan  # output at step 30: NaN norm, non-finite entries
    alerts = {
        20: {"step": 20, "layer": HOSTILE, "variable": "*", "kind": "vanishing_gradient",
             "severity": "warning", "value": 1e-9, "threshold": 1e-7,
             "message": f"gradient of {HOSTILE} vanished", "hint": HOSTILE_HINT},
        35: {"step": 35, "layer": "output", "variable": "output/kernel", "kind": "nonfinite_gradient",
             "severity": "error", "value": 3.0, "threshold": 0.0, "message": "NaN in output",
             "hint": "Lower the learning rate"},
    }
    sink = TensorBoardSink(log_dir, _run_info(MLP_LAYERS), MLP_LAYERS)
    for col, step in enumerate(MLP_STEPS):
        rows = [
            _layer_row(step, name, float(l2[row, col]), 3.0 if math.isnan(l2[row, col]) else 0.0)
            for row, name in enumerate(MLP_LAYERS)
        ][::-1]  # written output -> input: the order must come from run.json
        window_alerts = [alerts[step]] if step in alerts else []
        sink.write_window({"step": step, "steps": 5}, [], rows, window_alerts, step - 4)
    sink.close()
    return {"l2": l2, "alerts": alerts}


def write_gapped(log_dir: str) -> None:
    """Windows 10, 20, 40, 50: the one ending at step 30 is missing (as if TensorBoard sampled it out)."""
    from gradwatch._sinks.tb_sink import TensorBoardSink

    sink = TensorBoardSink(log_dir, _run_info(["a", "b"]), ["a", "b"])
    for step in (10, 20, 40, 50):
        rows = [_layer_row(step, n, 0.5) for n in "ab"]
        sink.write_window({"step": step, "steps": 10}, [], rows, [], step - 9)
    sink.close()


def write_big(log_dir: str) -> np.ndarray:
    """8 layers x 10,000 one-step windows (raw events: the sink flushes every window), spikes, one alert."""
    rng = np.random.default_rng(2)
    l2 = 10.0 ** rng.uniform(-4, 0, size=(len(BIG_LAYERS), BIG_WINDOWS))
    for layer, window in BIG_SPIKES:
        l2[layer, window] = 1e3
    writer = _raw_writer(log_dir)
    writer.add_event(_event(tb_format.RUN_TAG, 0, tb_format.encode_run(_run_info(BIG_LAYERS))))
    layer, alert_step = BIG_ALERT
    alert = {"step": alert_step, "layer": BIG_LAYERS[layer], "variable": "*", "kind": "exploding_gradient",
             "severity": "error", "value": 1e3, "threshold": 1e2, "message": "big", "hint": "clip"}
    for k in range(BIG_WINDOWS):
        step = k + 1
        rows = [{"layer": n, "variable": "*", "l2": float(l2[i, k]),
                 "nonfinite": 3.0 if (i, k) == BIG_NAN else 0.0} for i, n in enumerate(BIG_LAYERS)]
        alerts = [alert] if step == alert_step else []
        payload = tb_format.encode_window({"step": step}, [], rows, alerts, step)
        writer.add_event(_event(tb_format.WINDOW_TAG, step, payload))
    writer.close()
    return l2


def write_corrupt(log_dir: str) -> None:
    writer = _raw_writer(log_dir)
    writer.add_event(_event(tb_format.RUN_TAG, 0, tb_format.encode_run(_run_info(["a"]))))
    good = tb_format.encode_window({"step": 10}, [], [_layer_row(10, "a", 2.0)], [], 1)
    writer.add_event(_event(tb_format.WINDOW_TAG, 10, good))
    writer.add_event(_event(tb_format.WINDOW_TAG, 20, b'{"v": 1, "window": {"step": 2'))
    writer.close()


def write_empty_gw(log_dir: str) -> None:
    writer = _raw_writer(log_dir)
    writer.add_event(_event(tb_format.RUN_TAG, 0, tb_format.encode_run(_run_info(["a"]))))
    writer.close()


def write_other(log_dir: str) -> None:
    """A run with only a text summary of another plugin: no gradwatch data."""
    writer = _raw_writer(log_dir)
    writer.add_event(_event("notes", 1, b"hello", plugin="text"))
    writer.close()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tb_logdir")
    start = time.perf_counter()
    written = {"root": str(root), "mlp": write_mlp(str(root / "mlp"))}
    write_gapped(str(root / "gapped"))
    write_corrupt(str(root / "corrupt"))
    write_empty_gw(str(root / "empty_gw"))
    write_other(str(root / "other"))
    written["big"] = write_big(str(root / "big"))
    print(f"log dir written in {time.perf_counter() - start:.1f} s")
    return written


# -- a live TensorBoard ---------------------------------------------------------------------------------


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, load_fast: str):
        self.proc, self.port, self.load_fast = proc, port, load_fast

    def get(self, path: str, **params: Any) -> tuple[int, dict[str, str], bytes]:
        """GET a raw path (sent as is, no normalisation) on the server."""
        if params:
            path += "?" + urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, path: str, **params: Any) -> Any:
        status, _, body = self.get(path, **params)
        assert status == 200, (path, params, status, body[:500])
        return json.loads(body)


def _launch_tensorboard(logdir: str, load_fast: str, stderr_path: str, keep_all: bool = True) -> Any:
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    args = [tensorboard, "--logdir", logdir, "--host", "127.0.0.1", "--port", "0",
            f"--load_fast={load_fast}", "--reload_interval=2"] + ([SAMPLES_FLAG] if keep_all else [])
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    return proc, args, stderr_path, load_fast


def _await_port(launched: Any) -> Server:
    """The server once it printed "TensorBoard <version> at http://host:PORT/" on stderr."""
    proc, args, stderr_path, load_fast = launched
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(stderr_path, encoding="utf-8", errors="replace") as f:
            match = re.search(r"TensorBoard \S+ at http://[^\s/]+:(\d+)/", f.read())
        if match:
            return Server(proc, int(match.group(1)), load_fast)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=15)
    with open(stderr_path, encoding="utf-8", errors="replace") as f:
        raise RuntimeError(f"tensorboard did not start ({' '.join(args)}):\n{f.read()[-3000:]}")


def _stop(servers: list[Server]) -> None:
    for srv in servers:
        srv.proc.terminate()
    for srv in servers:
        try:
            srv.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=15)


@pytest.fixture(scope="module", params=["true", "false"], ids=["load_fast", "python_loader"])
def server(request, logdir, tmp_path_factory):
    stderr_path = str(tmp_path_factory.mktemp("tb") / "stderr.txt")
    start = time.perf_counter()
    srv = _await_port(_launch_tensorboard(logdir["root"], request.param, stderr_path))
    try:
        deadline = time.monotonic() + 90
        runs: dict[str, Any] = {}
        while time.monotonic() < deadline:  # loaded: every gradwatch run present with its last window
            try:
                runs = {r["run"]: r["last_step"] for r in srv.json("/data/plugin/gradwatch/runs")["runs"]}
            except (OSError, AssertionError, ValueError):
                runs = {}
            if set(runs) == GW_RUNS and runs["big"] == BIG_WINDOWS and runs["mlp"] == MLP_STEPS[-1]:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"tensorboard (load_fast={request.param}) never listed all runs; last saw {runs}")
        print(f"tensorboard load_fast={request.param} ready in {time.perf_counter() - start:.1f} s")
        yield srv
    finally:
        _stop([srv])


# -- tests without a server -----------------------------------------------------------------------------


def test_plugin_module_imports_no_tensorflow():
    code = (
        "import sys, gradwatch.tb_plugin.plugin as p; "
        "assert p.GradientFlowPlugin.plugin_name == 'gradwatch'; "
        "print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture
def local_plugin(tmp_path):
    """The plugin over an empty log dir, with a werkzeug test client per route."""
    from werkzeug.test import Client

    plugin, _ = plugin_over(str(tmp_path))
    return plugin, {route: Client(app) for route, app in plugin.get_plugin_apps().items()}


@pytest.mark.fast
def test_is_active_only_with_gradwatch_data(tmp_path):
    write_other(str(tmp_path / "other"))
    plugin, multiplexer = plugin_over(str(tmp_path))
    assert plugin.is_active() is False  # a run, but no gradwatch summaries
    write_gapped(str(tmp_path / "gapped"))
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    assert plugin.is_active() is True


TRAVERSALS = [
    "static/../plugin.py",
    "static/..%2Fplugin.py",
    "static/%2e%2e%2fplugin.py",
    "static/%2E%2E%2F%2E%2E%2Fschema.py",
    "static/..%5Cplugin.py",
    "static/%2Fetc%2Fpasswd",
    "static//etc/passwd",
    "static/..",
    "static/",
    "static/plugin.py",
    "static/.hidden.js",
    "static/index.js%00.css",
]


@pytest.mark.fast
def test_static_route_rejects_traversal_wsgi(local_plugin):
    plugin, clients = local_plugin
    static = clients["/static/*"]
    ok = static.get("/data/plugin/gradwatch/static/style.css")
    assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("text/css")
    assert b".gw-root" in ok.data
    for path in TRAVERSALS:
        response = static.get("/data/plugin/gradwatch/" + path)
        assert response.status_code in (400, 404), (path, response.status_code)
        assert b"GradientFlowPlugin" not in response.data and b"root:" not in response.data, path
    index = clients["/index.js"].get("/data/plugin/gradwatch/index.js")
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/javascript")
    assert b"export async function render" in index.data


@pytest.mark.fast
def test_empty_logdir_has_no_runs(local_plugin):
    plugin, clients = local_plugin
    assert plugin.is_active() is False
    assert json.loads(clients["/runs"].get("/data/plugin/gradwatch/runs").data)["runs"] == []
    missing = clients["/flow"].get("/data/plugin/gradwatch/flow?run=nope")
    assert missing.status_code == 404 and "no gradwatch data" in json.loads(missing.data)["error"]
    bad = clients["/flow"].get("/data/plugin/gradwatch/flow?run=x&max_cols=abc")
    assert bad.status_code == 400 and "'abc'" in json.loads(bad.data)["error"]


@pytest.mark.fast
def test_build_run_matches_decode_window_and_skips_unreadable_payloads():
    """The plugin's partial parser agrees with tb_format.decode_window, even with names that spell keys."""
    from gradwatch.tb_plugin.plugin import build_run

    tricky = ['"layers":{"columns":["layer"]', '"v":2', 'a\\"alerts\\":', "ünï/çødé"]
    rng = np.random.default_rng(4)
    payloads = []
    for k in range(6):
        step = 3 * (k + 1)
        rows = [_layer_row(step, n, float(v)) for n, v in zip(tricky, 10.0 ** rng.uniform(-3, 3, 4))]
        stats = [dict(r, variable=f'{r["layer"]}/"kernel"') for r in rows]
        alerts = [{"step": step, "layer": tricky[0], "variable": "*", "kind": "dead_relu", "severity": "info",
                   "value": math.nan, "threshold": 0.5, "message": '"first_step":99', "hint": "h"}]
        payloads.append((step, tb_format.encode_window({"step": step}, stats, rows, alerts, step - 2)))
    payloads[2] = (9, b'{"v":1,"window":{"step":9},"stats":')  # torn
    payloads[3] = (12, payloads[3][1].replace(b'"v":1', b'"v":7'))  # unknown format version
    payloads.append((30, b"\xff\xfe not utf-8"))
    data = build_run(_run_info(tricky[::-1]), payloads)
    assert data.corrupt == 3
    assert data.layers == tricky[::-1]
    assert data.steps.tolist() == [3, 6, 15, 18] and data.first_steps.tolist() == [1, 4, 13, 16]
    for col, (_, payload) in enumerate(p for i, p in enumerate(payloads) if i in (0, 1, 4, 5)):
        decoded = tb_format.decode_window(payload)
        for row in decoded["layers"]:
            assert data.log_l2[data.layers.index(row["layer"]), col] == pytest.approx(math.log10(row["l2"]))
    assert [a["message"] for a in data.alerts] == ['"first_step":99'] * 4
    assert all(math.isnan(a["value"]) and a["layer_index"] == 3 for a in data.alerts)

    parsed: dict = {}  # the per-run parse cache gives the same result while the run grows
    build_run(_run_info(tricky), payloads[:3], parsed)
    grown = build_run(_run_info(tricky), payloads, parsed)
    fresh = build_run(_run_info(tricky), payloads)
    assert len(parsed) == len(payloads) and grown.corrupt == fresh.corrupt == 3
    assert np.array_equal(grown.log_l2, fresh.log_l2, equal_nan=True) and grown.alerts == fresh.alerts


@pytest.mark.fast
def test_gaps_count_dropped_windows_not_overlaps():
    from gradwatch.tb_plugin.plugin import RunHeatmap

    def gaps(first_steps: list[int], steps: list[int]) -> dict[str, int]:
        n = len(steps)
        return RunHeatmap(["a"], np.array(steps), np.array(first_steps), np.zeros((1, n)),
                       np.zeros((1, n), dtype=bool)).gaps()

    assert gaps([1, 11, 21], [10, 20, 30]) == {"gaps": 0, "missing_steps": 0, "leading_missing_steps": 0}
    assert gaps([1, 5, 21], [10, 20, 30])["gaps"] == 0  # a resumed run rewrote steps 5..10: no drop
    assert gaps([6, 11, 25, 41], [10, 20, 30, 50]) == {
        "gaps": 2, "missing_steps": 4 + 10, "leading_missing_steps": 5
    }


@pytest.mark.fast
def test_downsample_200_layers_10000_windows_keeps_spikes_and_alerts():
    from gradwatch.tb_plugin.plugin import RunHeatmap, bucket_of, downsample_columns, flow_json

    rows, width, max_cols = 200, 10_000, 1000
    rng = np.random.default_rng(3)
    values = rng.uniform(-6.0, 0.0, size=(rows, width))
    values[rng.random((rows, width)) < 0.2] = np.nan
    values[17, 2000:2010] = np.nan  # one whole bucket of one row absent
    spikes = [(int(r), int(c)) for r, c in zip(rng.integers(0, rows, 50), rng.integers(0, width, 50))]
    for r, c in spikes:
        values[r, c] = 5.0
    reduced, edges = downsample_columns(values, max_cols)
    assert reduced.shape == (rows, max_cols)
    assert edges[0] == 0 and edges[-1] == width and np.all(np.diff(edges) >= 1)
    for r, c in spikes:  # every spike survives in its bucket
        assert reduced[r, bucket_of(edges, np.array([c]))[0]] == 5.0
    b = bucket_of(edges, np.array([2005]))[0]
    assert np.isnan(reduced[17, b])
    for c in rng.integers(0, max_cols, 20):  # bucket value = max of its windows, by a plain loop
        lo, hi = edges[c], edges[c + 1]
        for r in range(0, rows, 37):
            window = [v for v in values[r, lo:hi] if not math.isnan(v)]
            expected = max(window) if window else math.nan
            assert (math.isnan(expected) and math.isnan(reduced[r, c])) or reduced[r, c] == expected

    steps = np.arange(1, width + 1, dtype=np.int64)
    alerts = [{"step": 8765, "layer": "l9", "layer_index": 9, "kind": "dead_relu", "severity": "warning"}]
    data = RunHeatmap([f"l{i}" for i in range(rows)], steps, steps.copy(), values,
                   np.zeros((rows, width), dtype=bool), alerts)
    start = time.perf_counter()
    body = json.dumps(flow_json("r", data, max_cols), separators=(",", ":"), allow_nan=False)
    elapsed = time.perf_counter() - start
    flow = json.loads(body)
    print(f"flow_json 200x10000 -> {max_cols} columns: {elapsed * 1000:.0f} ms, {len(body) / 1e6:.2f} MB")
    assert len(flow["steps"]) == max_cols and len(flow["values"]) == rows
    assert all(len(row) == max_cols for row in flow["values"])
    col = int(bucket_of(edges, np.array([8765 - 1]))[0])
    assert flow["first_steps"][col] <= 8765 <= flow["steps"][col]
    assert flow["markers"] == [[9, col, SEVERITIES.index("warning"), 1, ["dead_relu"]]]
    assert flow["downsampled"] == {"windows": width, "columns": max_cols, "per_column": width / max_cols}
    assert flow["gap_columns"] == [] and flow["dropped"]["gaps"] == 0
    assert len(body) < 2_000_000


# -- tests against the live server ------------------------------------------------------------------------


def test_plugins_listing(server):
    listing = server.json("/data/plugins_listing")
    entry = listing["gradwatch"]
    assert entry["enabled"] is True
    assert entry["tab_name"] == "Gradient Flow"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/gradwatch/index.js"}
    status, headers, body = server.get("/data/plugin/gradwatch/index.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")


def test_static_route_rejects_traversal_live(server):
    status, headers, body = server.get("/data/plugin/gradwatch/static/style.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    for path in TRAVERSALS:
        status, _, body = server.get("/data/plugin/gradwatch/" + path)
        assert status in (400, 404), (path, status)
        assert b"GradientFlowPlugin" not in body and b"root:" not in body, path


def test_runs_lists_only_gradwatch_runs(server):
    runs = {r["run"]: r["last_step"] for r in server.json("/data/plugin/gradwatch/runs")["runs"]}
    assert set(runs) == GW_RUNS  # "other" holds only a text summary
    assert runs["empty_gw"] is None and runs["gapped"] == 50


def test_flow_values_order_and_alerts(server, logdir):
    flow = server.json("/data/plugin/gradwatch/flow", run="mlp", max_cols=1000)
    l2 = logdir["mlp"]["l2"]
    assert flow["layers"] == MLP_LAYERS
    assert flow["steps"] == MLP_STEPS and flow["first_steps"] == [s - 4 for s in MLP_STEPS]
    assert flow["downsampled"] is None
    for r in range(len(MLP_LAYERS)):
        for c in range(len(MLP_STEPS)):
            got, written = flow["values"][r][c], l2[r, c]
            if written > 0 and math.isfinite(written):
                assert got == pytest.approx(math.log10(written), abs=6e-4), (r, c)
            else:
                assert got is None, (r, c, got)
    assert flow["nonfinite"] == [[3, 5]]
    assert flow["markers"] == [
        [1, MLP_STEPS.index(20), SEVERITIES.index("warning"), 1, ["vanishing_gradient"]],
        [3, MLP_STEPS.index(35), SEVERITIES.index("error"), 1, ["nonfinite_gradient"]],
    ]
    assert flow["dropped"]["gaps"] == 0 and flow["dropped"]["corrupt"] == 0

    alerts = server.json("/data/plugin/gradwatch/alerts", run="mlp")
    rows = [dict(zip(alerts["columns"], row)) for row in alerts["rows"]]
    assert [(a["step"], a["layer"], a["kind"], a["hint"]) for a in rows] == [
        (a["step"], a["layer"], a["kind"], a["hint"]) for a in logdir["mlp"]["alerts"].values()
    ]
    assert rows[0]["value"] == pytest.approx(1e-9) and rows[0]["layer_index"] == 1


def test_gaps_corrupt_and_empty_runs(server):
    gapped = server.json("/data/plugin/gradwatch/flow", run="gapped")
    assert gapped["steps"] == [10, 20, 40, 50]
    assert gapped["dropped"]["gaps"] == 1 and gapped["dropped"]["missing_steps"] == 10
    assert gapped["gap_columns"] == [2]
    assert "--samples_per_plugin=gradwatch=0" in gapped["dropped"]["advice"]
    corrupt = server.json("/data/plugin/gradwatch/flow", run="corrupt")
    assert corrupt["dropped"]["corrupt"] == 1 and corrupt["steps"] == [10]
    assert corrupt["values"] == [[pytest.approx(math.log10(2.0), abs=6e-4)]]
    empty = server.json("/data/plugin/gradwatch/flow", run="empty_gw")
    assert empty["windows"] == 0 and empty["steps"] == [] and empty["layers"] == ["a"]
    status, _, body = server.get("/data/plugin/gradwatch/flow", run="other")
    assert status == 404 and b"no gradwatch data" in body


def test_flow_downsamples_10000_windows(server, logdir):
    start = time.perf_counter()
    flow = server.json("/data/plugin/gradwatch/flow", run="big", max_cols=500)
    first_request = time.perf_counter() - start
    start = time.perf_counter()
    server.json("/data/plugin/gradwatch/flow", run="big", max_cols=500)
    cached = time.perf_counter() - start
    print(f"/flow big (8x10000 -> 500) load_fast={server.load_fast}: first {first_request:.2f} s, "
          f"cached {cached:.2f} s")
    l2 = logdir["big"]
    assert flow["layers"] == BIG_LAYERS and flow["windows"] == BIG_WINDOWS
    assert len(flow["steps"]) == 500
    first, last = np.array(flow["first_steps"]), np.array(flow["steps"])
    assert first[0] == 1 and last[-1] == BIG_WINDOWS and np.all(first[1:] == last[:-1] + 1)
    expected = np.stack([np.log10(l2[:, a - 1:b]).max(axis=1) for a, b in zip(first, last)], axis=1)
    assert np.allclose(np.array(flow["values"], dtype=float), expected, atol=6e-4)
    for layer, window in BIG_SPIKES:
        col = int(np.searchsorted(last, window + 1))
        assert flow["values"][layer][col] == 3.0
    layer, step = BIG_ALERT
    col = int(np.searchsorted(last, step))
    assert flow["markers"] == [[layer, col, SEVERITIES.index("error"), 1, ["exploding_gradient"]]]


# -- the page, in TensorBoard's real UI ---------------------------------------------------------------


def test_page_in_headless_chromium(server, logdir, tmp_path):
    from _chromium import chromium_driver, require_chromium

    require_chromium()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = chromium_driver(1400, 900)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/#gradwatch")
        frame = WebDriverWait(driver, 60).until(
            lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "iframe[src*='name=gradwatch']")), None)
        )
        driver.switch_to.frame(frame)

        def ready(run: str) -> Any:
            return WebDriverWait(driver, 60).until(
                lambda d: d.execute_script(
                    "const r = document.getElementById('gw-root');"
                    "return r && r.dataset.state === 'ready' && r.dataset.run === arguments[0];", run)
            )

        ready("big")  # the first run: 10,000 windows drawn on one canvas
        canvas = driver.find_element(By.ID, "gw-heatmap")
        assert canvas.get_attribute("data-rows") == str(len(BIG_LAYERS))
        assert 50 <= int(canvas.get_attribute("data-cols")) <= 1000
        notices = driver.find_element(By.ID, "gw-notices").text
        assert "10000 windows shown in" in notices
        # the one NaN window of 10,000 shares a 1-px column with 9 others: still >= 3 px of magenta
        cols = int(canvas.get_attribute("data-cols"))
        flow = server.json("/data/plugin/gradwatch/flow", run="big", max_cols=cols)
        (cell,) = flow["nonfinite"]
        assert cell[0] == BIG_NAN[0]
        magenta = driver.execute_script(
            "const c = document.getElementById('gw-heatmap'); const h = +c.dataset.rowHeight;"
            "const e = c.dataset.colEdges.split(',').map(Number); const [row, col] = arguments;"
            "const d = c.getContext('2d').getImageData(e[col] - 4, row * h + (h >> 1), 9, 1).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4)"
            " if (d[i] === 213 && d[i + 1] === 0 && d[i + 2] === 249) n++;"
            "return [n, e[col + 1] - e[col]];", *cell)
        assert magenta[1] <= 2 and magenta[0] >= 3, magenta

        Select(driver.find_element(By.ID, "gw-run")).select_by_value("mlp")
        ready("mlp")
        canvas = driver.find_element(By.ID, "gw-heatmap")
        assert canvas.get_attribute("data-rows") == str(len(MLP_LAYERS))
        assert canvas.get_attribute("data-markers") == "2"
        labels = [e.get_attribute("textContent")
                  for e in driver.find_elements(By.CSS_SELECTOR, ".gw-row-label")]
        assert labels == MLP_LAYERS  # one label per layer, input at the top, the markup shown as text
        assert driver.find_elements(By.CSS_SELECTOR, "#gw-root b, #gw-root img") == []

        table_rows = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts tbody tr")
        cells = [{td.get_attribute("data-col"): td.text for td in tr.find_elements(By.TAG_NAME, "td")}
                 for tr in table_rows]
        assert [(c["step"], c["layer"], c["kind"], c["hint"]) for c in cells] == [
            ("20", HOSTILE, "vanishing_gradient", HOSTILE_HINT),
            ("35", "output", "nonfinite_gradient", "Lower the learning rate"),
        ]
        # The warning marker is drawn on the canvas: sample the outline pixel of (HOSTILE, step 20).
        row, col = 1, MLP_STEPS.index(20)
        pixel = driver.execute_script(
            "const c = document.getElementById('gw-heatmap'); const h = +c.dataset.rowHeight;"
            "const e = c.dataset.colEdges.split(',').map(Number);"
            "const [row, col] = arguments;"
            "const p = (x, y) => Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data);"
            "const y = row * h + (h >> 1);"
            "return {edge: p(e[col] + 1, y), inside: p((e[col] + e[col + 1]) >> 1, y),"
            " plain: p(e[0] + 1, 0 * h + (h >> 1)), x: (e[col] + e[col + 1]) / 2, y: row * h + h / 2,"
            " w: c.width, h: c.height};", row, col)
        assert pixel["edge"] == [251, 140, 0, 255]  # SEVERITY_COLOURS.warning
        assert pixel["inside"] != pixel["edge"] and pixel["plain"] != pixel["edge"]

        rect = canvas.rect
        ActionChains(driver).move_to_element_with_offset(
            canvas, int(pixel["x"] * rect["width"] / pixel["w"] - rect["width"] / 2),
            int(pixel["y"] * rect["height"] / pixel["h"] - rect["height"] / 2),
        ).perform()
        tooltip = driver.find_element(By.ID, "gw-tooltip")
        WebDriverWait(driver, 10).until(lambda d: tooltip.is_displayed())
        assert f"layer: {HOSTILE}" in tooltip.text and "steps: 16–20" in tooltip.text
        assert "vanishing_gradient" in tooltip.text
        assert f"log10 {math.log10(logdir['mlp']['l2'][1, 3]):.3f}" in tooltip.text
        shot = tmp_path / "gradient_flow.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        Select(driver.find_element(By.ID, "gw-run")).select_by_value("gapped")
        ready("gapped")
        dropped = driver.find_element(By.ID, "gw-dropped")
        assert dropped.is_displayed() and "--samples_per_plugin=gradwatch=0" in dropped.text

        Select(driver.find_element(By.ID, "gw-run")).select_by_value("empty_gw")
        ready("empty_gw")
        message = driver.find_element(By.ID, "gw-message")
        assert message.is_displayed() and "no gradwatch windows yet" in message.text
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def default_servers(tmp_path_factory):
    """Two TensorBoards with TensorBoard's default sampling, started side by side: a 40-window run; empty."""
    from gradwatch._sinks.tb_sink import TensorBoardSink

    sampled = tmp_path_factory.mktemp("sampled")
    sink = TensorBoardSink(str(sampled / "long"), _run_info(["a", "b"]), ["a", "b"])
    for step in range(1, 41):
        sink.write_window({"step": step, "steps": 1}, [], [_layer_row(step, n, 0.25) for n in "ab"], [], step)
    sink.close()
    empty = tmp_path_factory.mktemp("empty")
    launched = [  # the python loader (its default keeps 10 tensor samples per tag) and the Rust one
        _launch_tensorboard(str(d), fast, str(tmp_path_factory.mktemp("tb") / "err.txt"), keep_all=False)
        for d, fast in ((sampled, "false"), (empty, "true"))
    ]
    servers: list[Server] = []
    try:
        for item in launched:
            servers.append(_await_port(item))
        deadline = time.monotonic() + 60
        runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (runs and runs[0]["last_step"] == 40):
            try:
                runs = servers[0].json("/data/plugin/gradwatch/runs")["runs"]
            except (OSError, AssertionError, ValueError):
                runs = []
            time.sleep(0.3)
        assert runs and runs[0]["last_step"] == 40, f"the sampled run never loaded: {runs}"
        yield {"sampled": servers[0], "empty": servers[1]}
    finally:
        for proc, *_ in launched[len(servers):]:  # launched, never reported its port
            proc.kill()
            proc.wait(timeout=15)
        _stop(servers)


def test_default_sampling_drops_windows_and_the_page_says_so(default_servers, tmp_path):
    from _chromium import chromium_driver, require_chromium
    from tensorboard.backend.event_processing import data_ingester, tag_types

    flow = default_servers["sampled"].json("/data/plugin/gradwatch/flow", run="long")
    print(f"default sampling kept {flow['windows']} of 40 windows; dropped: {flow['dropped']}")
    kept = data_ingester.DEFAULT_SIZE_GUIDANCE[tag_types.TENSORS]
    assert kept == 10 and flow["windows"] == kept  # TensorBoard's default reservoir for tensor summaries
    assert flow["steps"][-1] == 40  # the reservoir always keeps the latest
    dropped = flow["dropped"]
    assert dropped["gaps"] + (dropped["leading_missing_steps"] > 0) > 0
    assert dropped["missing_steps"] + dropped["leading_missing_steps"] == 30
    assert default_servers["empty"].json("/data/plugin/gradwatch/runs")["runs"] == []

    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver(1200, 800)
    try:
        for name, expected in (("sampled", "ready"), ("empty", "empty")):
            driver.get(f"http://127.0.0.1:{default_servers[name].port}/#gradwatch")
            frame = WebDriverWait(driver, 60).until(
                lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "iframe[src*='name=gradwatch']")), None)
            )
            driver.switch_to.frame(frame)
            WebDriverWait(driver, 60).until(lambda d, state=expected: d.execute_script(
                "const r = document.getElementById('gw-root'); return r && r.dataset.state === arguments[0];",
                state))
            if name == "sampled":
                notice = driver.find_element(By.ID, "gw-dropped")
                assert notice.is_displayed() and "Samples were dropped" in notice.text
                assert "--samples_per_plugin=gradwatch=0" in notice.text
            else:
                message = driver.find_element(By.ID, "gw-message")
                assert message.is_displayed()
                assert "No run in this log directory has gradwatch data" in message.text
                assert not driver.find_element(By.ID, "gw-heatmap-section").is_displayed()
            driver.save_screenshot(str(tmp_path / f"{name}.png"))
            driver.switch_to.default_content()
    finally:
        driver.quit()


def _window_payload(step: int, l2: dict[str, float], alerts: list[dict[str, Any]] = ()) -> bytes:
    rows = [{"layer": n, "variable": "*", "l2": v, "nonfinite": 0.0} for n, v in l2.items()]
    return tb_format.encode_window({"step": step, "steps": 10}, [], rows, list(alerts), step - 9)


@pytest.mark.fast
def test_flow_tells_exact_zero_norms_from_missing_ones_and_zooms_to_a_step_range():
    from gradwatch.tb_plugin.plugin import SCALE_LOG10, build_run, flow_json

    payloads = [(s, _window_payload(s, {"a": 0.5, "dead": 0.0} if s != 30 else {"a": 0.5}))
                for s in (10, 20, 30, 40)]
    data = build_run(_run_info(["a", "dead"]), payloads)
    flow = flow_json("r", data, 1000)
    assert flow["zeros"] == [[1, 0], [1, 1], [1, 3]]  # step 30 has no row for "dead": no data, not zero
    assert flow["values"][1] == [None] * 4 and flow["values"][0] == [round(math.log10(0.5), 3)] * 4
    assert flow["scale"] == {"min": SCALE_LOG10[0], "max": SCALE_LOG10[1]}  # the same for every run
    wide = flow_json("r", data, 2)  # two columns: a column with any zero and no norm is zero
    assert wide["zeros"] == [[1, 0], [1, 1]]
    zoomed = flow_json("r", data, 1000, 15, 30)  # the windows holding a step of 15..30
    assert zoomed["steps"] == [20, 30] and zoomed["first_steps"] == [11, 21] and zoomed["windows"] == 2
    assert zoomed["zoom"] == {"start": 15, "end": 30} and zoomed["range"] == {"first": 1, "last": 40}
    assert flow_json("r", data, 1000, 41, None)["windows"] == 0


@pytest.mark.fast
def test_alerts_come_whole_from_alerts_csv_when_tensorboard_kept_a_sample(tmp_path):
    """TensorBoard keeps 3 of 40 windows; the tab still has each of the 40 alerts (from alerts.csv)."""
    import csv

    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from gradwatch._io.schema import ALERT_COLUMNS
    from gradwatch._sinks.tb_sink import TensorBoardSink
    from gradwatch.tb_plugin.plugin import GradientFlowPlugin

    run_dir = tmp_path / "run"
    sink = TensorBoardSink(str(run_dir), _run_info(["a"]), ["a"])
    alerts = [{"step": s, "layer": "a", "variable": "*", "kind": "exploding_gradient", "severity": "warning",
               "value": 1e5, "threshold": 1e4, "message": f"big at {s}", "hint": "clip"}
              for s in range(1, 41)]
    for s in range(1, 41):
        sink.write_window({"step": s, "steps": 1}, [], [_layer_row(s, "a", 0.5)], [alerts[s - 1]], s)
    sink.close()
    with open(run_dir / "alerts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ALERT_COLUMNS))
        writer.writeheader()
        writer.writerows(alerts)
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradwatch": 3})
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    plugin = GradientFlowPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(tmp_path)))
    status, flow = get_json_local(plugin, "/flow", run="run")
    assert status == 200 and flow["windows"] == 3  # the sample ...
    assert flow["alerts"] == 40 and flow["alerts_source"] == "alerts.csv"  # ... and every alert
    assert flow["dropped"]["kept_windows"] == 3 and flow["dropped"]["expected_windows"] == 40
    status, table = get_json_local(plugin, "/alerts", run="run")
    steps = [row[table["columns"].index("step")] for row in table["rows"]]
    assert steps == list(range(1, 41))  # first one first
    os.remove(run_dir / "alerts.csv")  # no CSV: gradwatch reads the event files whole itself
    status, flow = get_json_local(plugin, "/flow", run="run")
    assert flow["alerts"] == 40 and flow["alerts_source"] == "event files"
