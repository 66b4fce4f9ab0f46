"""``schema_version``: the sinks stamp it, every reader takes each version up to ``SCHEMA_VERSION``
(no key: 1) and refuses a newer one, with one message, from one function."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from _plugin import get_json, plugin_over

import gradwatch as gw
from gradwatch._io import tb_format
from gradwatch._io.readers import event_files
from gradwatch._io.schema import (
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    GradwatchDataError,
    SchemaVersionError,
    check_schema_version,
    with_schema_version,
)
from gradwatch._report.report import build_report
from gradwatch._sinks.csv_sink import CsvSink
from gradwatch._sinks.tb_sink import EventFile, TensorBoardSink
from gradwatch.cli import main

pytestmark = pytest.mark.fast

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
NEWER = SCHEMA_VERSION + 1
REFUSAL = (
    rf"written by a newer gradwatch \({SCHEMA_VERSION_KEY} {NEWER}; "
    rf"gradwatch \S+ reads versions 1 to {SCHEMA_VERSION}\); upgrade gradwatch to read it\.$"
)


def test_check_schema_version():
    assert SCHEMA_VERSION == 4
    assert check_schema_version(None, "x") == check_schema_version({"layers": []}, "x") == 1
    assert check_schema_version({SCHEMA_VERSION_KEY: 1}, "x") == 1
    assert check_schema_version({SCHEMA_VERSION_KEY: SCHEMA_VERSION}, "x") == SCHEMA_VERSION
    with pytest.raises(SchemaVersionError, match="^runs/a/run.json was " + REFUSAL):
        check_schema_version({SCHEMA_VERSION_KEY: NEWER}, "runs/a/run.json")
    for bad in ("2", 2.0, True, 0, None):
        with pytest.raises(SchemaVersionError, match=f"must be an integer >= 1; received {bad!r}"):
            check_schema_version({SCHEMA_VERSION_KEY: bad}, "x")
    assert issubclass(SchemaVersionError, GradwatchDataError) and gw.GradwatchDataError is GradwatchDataError


def test_with_schema_version_puts_this_version_first():
    stamped = with_schema_version({"a": 1, SCHEMA_VERSION_KEY: 1})
    assert list(stamped) == [SCHEMA_VERSION_KEY, "a"] and stamped[SCHEMA_VERSION_KEY] == SCHEMA_VERSION


def test_the_sinks_write_the_version(tmp_path):
    log_dir = str(tmp_path)
    info = {"model_name": "m", "layers": [{"name": "a"}], "variables": [{"name": "a/w"}]}
    sink = CsvSink(log_dir)
    sink.open(info)
    sink.close()
    with open(os.path.join(log_dir, "run.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert list(written)[0] == SCHEMA_VERSION_KEY and written == {SCHEMA_VERSION_KEY: SCHEMA_VERSION, **info}
    assert "schema_version" not in info  # the caller's dict is left as it was
    tb = TensorBoardSink(log_dir, info, ["a"])
    tb.write_window({"step": 1}, [], [], [], 1)
    tb.close()
    assert gw.read_run(log_dir, source="events") == gw.read_run(log_dir) == written


def newer_run(root) -> str:
    """run_v1 with its run.json claiming the next schema version."""
    run = os.path.join(root, "newer")
    shutil.copytree(os.path.join(DATA, "run_v1"), run)
    with open(os.path.join(run, "run.json"), encoding="utf-8") as f:
        info = json.load(f)
    with open(os.path.join(run, "run.json"), "w", encoding="utf-8") as f:
        json.dump({SCHEMA_VERSION_KEY: NEWER, **info}, f)
    return run


def newer_events_run(root) -> str:
    """An events-only run whose run summary claims the next schema version."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

    run = os.path.join(root, "newer_events")
    events = EventFile(run)
    run_info = {SCHEMA_VERSION_KEY: NEWER, "layers": [{"name": "a"}]}
    window = tb_format.encode_window({"step": 5}, [], [{"layer": "a", "l2": 1.0}], [], 1)
    for tag, step, payload in ((tb_format.RUN_TAG, 0, tb_format.encode_run(run_info)),
                               (tb_format.WINDOW_TAG, 5, window)):
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=tb_format.PLUGIN_NAME),
            data_class=summary_pb2.DATA_CLASS_TENSOR,
        )
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[payload])
        value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        summary = summary_pb2.Summary(value=[value])
        events.add(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    events.close()
    return run


READERS = {
    "read_run": gw.read_run,
    "read_windows": gw.read_windows,
    "read_stats": gw.read_stats,
    "read_layers": lambda d: gw.read_stats(d, level="layer"),
    "read_alerts": gw.read_alerts,
}


@pytest.mark.parametrize("reader", READERS)
def test_readers_refuse_a_newer_run(tmp_path, reader):
    csv_run, events_run = newer_run(tmp_path), newer_events_run(tmp_path)
    run_json = re.escape(os.path.join(csv_run, "run.json"))
    with pytest.raises(SchemaVersionError, match=f"^{run_json} was {REFUSAL}"):
        READERS[reader](csv_run)
    (events_file,) = event_files(events_run)
    summary = f"^the 'gradwatch/run' summary of {re.escape(events_file)}"
    with pytest.raises(SchemaVersionError, match=f"{summary} was {REFUSAL}"):
        READERS[reader](events_run)
    if reader != "read_run":
        with pytest.raises(SchemaVersionError, match=REFUSAL):  # a directory of runs: one is newer
            READERS[reader](str(tmp_path))


def test_report_and_summary_refuse_a_newer_run(tmp_path, capsys):
    run = newer_run(tmp_path)
    with pytest.raises(SchemaVersionError, match=REFUSAL):
        build_report(run, str(tmp_path / "report.html"))
    assert not (tmp_path / "report.html").exists()
    commands = (["report", run, "-o", str(tmp_path / "r.html")], ["summary", run], ["summary", str(tmp_path)])
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("gradwatch: error: ") and len(err.strip().splitlines()) == 1
        assert re.search(REFUSAL[:-1], err.strip()), err


def test_the_plugin_refuses_a_newer_run_and_shows_the_others(tmp_path):
    newer_events_run(tmp_path)
    shutil.copytree(os.path.join(DATA, "watch_v1"), tmp_path / "watch_v1")
    plugin, _ = plugin_over(str(tmp_path))
    for route in ("/flow", "/alerts"):
        status, body = get_json(plugin, route, run="newer_events")
        assert status == 422, route
        assert re.match("run 'newer_events': its 'gradwatch/run' summary was " + REFUSAL, body["error"])
    status, body = get_json(plugin, "/flow", run="watch_v1")
    assert status == 200 and body["windows"] == 4


def test_append_refuses_a_newer_run(tmp_path):
    run = newer_run(tmp_path)
    with pytest.raises(SchemaVersionError, match=REFUSAL):
        CsvSink(run, append=True).open({"variables": []})
    with open(os.path.join(run, "run.json"), encoding="utf-8") as f:
        assert json.load(f)[SCHEMA_VERSION_KEY] == NEWER  # left as it was
