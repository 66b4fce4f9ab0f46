"""Readers from TensorBoard event files: same DataFrames as from CSV, resumes, torn tails,
several runs under one directory, error messages."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from _runs import exploding_run, move_event_files, rows_by_window

import gradwatch as gw
from gradwatch._io import tb_format
from gradwatch._io.readers import GradwatchDataError, event_files, iter_records, list_runs
from gradwatch._sinks.tb_sink import TensorBoardSink

READERS = {
    "windows": lambda d, s: gw.read_windows(d, source=s),
    "stats": lambda d, s: gw.read_stats(d, source=s),
    "layers": lambda d, s: gw.read_stats(d, level="layer", source=s),
    "alerts": lambda d, s: gw.read_alerts(d, source=s),
}


def write_events(log_dir, windows, info, histograms=None):
    sink = TensorBoardSink(log_dir, info, [layer["name"] for layer in info.get("layers", [])])
    for i, window in enumerate(windows):
        sink.write_window(**window, histograms=histograms if i == 0 else None)
    sink.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run: CSV written by gradwatch, the same rows written as events into the same log_dir."""
    base = tmp_path_factory.mktemp("ev")
    log_dir, engine_dir = str(base / "run"), str(base / "engine_events")
    histograms = exploding_run(log_dir)
    engine_files = move_event_files(log_dir, engine_dir)  # what the engine wrote, tested on its own
    windows = rows_by_window(log_dir)
    info = gw.read_run(log_dir)
    write_events(log_dir, windows, info, histograms)
    return {
        "dir": log_dir,
        "windows": windows,
        "info": info,
        "engine_dir": engine_dir if engine_files else None,
    }


def events_only(run, dest):
    """A copy of the run's event files alone (no CSV, no run.json)."""
    os.makedirs(dest)
    for path in event_files(run["dir"]):
        shutil.copy(path, dest)
    return str(dest)


@pytest.mark.parametrize("name", list(READERS))
def test_events_give_the_same_frames_as_csv(run, name):
    from_csv = READERS[name](run["dir"], "csv")
    from_events = READERS[name](run["dir"], "events")
    assert len(from_csv) > 0
    pd.testing.assert_frame_equal(from_events, from_csv)
    assert READERS[name](run["dir"], "auto").equals(from_csv)


@pytest.mark.parametrize("name", list(READERS))
def test_events_written_by_the_engine_read_like_its_csv(run, name):
    """End to end: GradientMonitor's own TensorBoard events give the frames of its own CSV files."""
    if run["engine_dir"] is None:
        pytest.skip("this engine writes no TensorBoard events")
    pd.testing.assert_frame_equal(
        READERS[name](run["engine_dir"], "events"), READERS[name](run["dir"], "csv")
    )


def test_events_only_run_reads_like_csv_including_run_info(run, tmp_path):
    only = events_only(run, tmp_path / "only")
    for name, read in READERS.items():
        pd.testing.assert_frame_equal(read(only, "auto"), read(run["dir"], "csv"), obj=name)
    assert gw.read_run(only) == run["info"] == gw.read_run(run["dir"], source="events")
    layers = gw.read_stats(only, level="layer")
    assert list(layers.layer.unique()) == [layer["name"] for layer in run["info"]["layers"]]
    assert (layers.variable == "*").all()


@pytest.mark.fast
def test_the_fast_decoder_agrees_with_tb_format_on_non_finite_values(tmp_path):
    """NaN, +-Inf, null and text that reads "nan" come back as tb_format.decode_window gives them."""
    from gradwatch._io.schema import STATS_COLUMNS, WINDOW_COLUMNS

    window = {c: 1.5 for c in WINDOW_COLUMNS}
    window.update(step=4, steps=2, loss=float("inf"), global_l2=-float("inf"), first_nonfinite_step=None)
    row = {c: float("nan") for c in STATS_COLUMNS}
    row.update(step=4, steps=2, layer="nan", variable="inf", nonfinite=3, grad_steps=2, l2=float("inf"))
    alert = {
        "step": 4,
        "layer": "nan",
        "variable": "",
        "kind": "nonfinite_gradient",
        "severity": "error",
        "value": float("inf"),
        "threshold": float("nan"),
        "message": "m",
        "hint": "h",
    }
    TensorBoardSink(str(tmp_path), {}, []).write_window(window, [row], [row], [alert], 3)
    (path,) = event_files(str(tmp_path))
    payload = [r for r in iter_records(path) if b"gradwatch/window" in r][0]
    from tensorboard.compat.proto import event_pb2

    (value,) = [v for v in event_pb2.Event.FromString(payload).summary.value if v.tag == "gradwatch/window"]
    decoded = tb_format.decode_window(value.tensor.string_val[0])
    frames = {
        "window": (gw.read_windows(str(tmp_path)), [decoded["window"]]),
        "stats": (gw.read_stats(str(tmp_path)), decoded["stats"]),
        "alerts": (gw.read_alerts(str(tmp_path)), decoded["alerts"]),
    }
    for name, (frame, rows) in frames.items():
        for column, value in rows[0].items():
            got = frame[column].iloc[0]
            if value is None:
                assert math.isnan(got), (name, column)
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(got), (name, column)
            else:
                assert got == value, (name, column, got, value)
    assert gw.read_stats(str(tmp_path)).layer.iloc[0] == "nan"  # a text column is never a float


def test_a_resumed_run_keeps_the_later_rows(run, tmp_path):
    """File 1 wrote windows 5..30; a run resumed from step 15 wrote windows 20 and 25 again in a
    second file: steps 20, 25 come from it, step 30 of the first run is superseded."""
    log_dir = str(tmp_path / "resumed")
    info = run["info"]
    write_events(log_dir, run["windows"], info)
    resumed = []
    for w in run["windows"][3:5]:
        w = {
            **w,
            "window_row": {**w["window_row"], "loss": 1000.0 + w["window_row"]["step"]},
            "layer_rows": [{**r, "l2": 7.0} for r in w["layer_rows"]],
            "stats_rows": [{**r, "l2": 7.0} for r in w["stats_rows"]],
            "alert_rows": [],
        }
        resumed.append(w)
    write_events(log_dir, resumed, info)
    assert len(event_files(log_dir)) == 2
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [5, 10, 15, 20, 25]
    assert list(windows.loss.iloc[3:]) == [1020.0, 1025.0]
    pd.testing.assert_frame_equal(windows.iloc[:3], gw.read_windows(run["dir"], source="csv").iloc[:3])
    stats = gw.read_stats(log_dir)
    assert (stats[stats.step >= 20].l2 == 7.0).all() and not (stats[stats.step < 20].l2 == 7.0).any()
    assert list(stats.groupby("step").size()) == [len(run["windows"][0]["stats_rows"])] * 5
    alerts = gw.read_alerts(log_dir)
    assert alerts.step.max() < 16  # alerts of superseded windows are gone with them


def test_same_steps_written_twice_keep_the_second(run, tmp_path):
    log_dir = str(tmp_path / "twice")
    write_events(log_dir, run["windows"][:2], run["info"])
    again = [{**w, "window_row": {**w["window_row"], "learning_rate": 0.5}} for w in run["windows"][:2]]
    write_events(log_dir, again, run["info"])
    windows = gw.read_windows(log_dir)
    assert list(windows.step) == [5, 10] and list(windows.learning_rate) == [0.5, 0.5]


@pytest.mark.parametrize("cut", [3, 14, "header"])
def test_a_truncated_last_record_is_ignored(run, tmp_path, cut):
    only = events_only(run, tmp_path / "torn")
    (path,) = event_files(only)
    offsets, position = [], 0
    for record in iter_records(path):
        offsets.append(position)
        position += len(record) + 16
    size = os.path.getsize(path)
    assert position == size
    with open(path, "r+b") as f:  # a kill mid-write of the last window
        f.truncate(offsets[-1] + 5 if cut == "header" else size - cut)
    windows = gw.read_windows(only)
    expected = gw.read_windows(run["dir"], source="csv")
    pd.testing.assert_frame_equal(windows, expected.iloc[:-1])
    assert len(gw.read_stats(only)) == len(gw.read_stats(run["dir"], source="csv")) - len(
        run["windows"][-1]["stats_rows"]
    )


def test_several_runs_under_one_directory(run, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(run["dir"], root / "a")
    events_only(run, root / "b" / "c")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    assert list_runs(str(root)) == ["a", "b/c"]
    assert list_runs(str(root / "a")) == ["."]
    for name, read in READERS.items():
        both = read(str(root), "auto")
        single = read(run["dir"], "csv")
        assert list(both.columns) == ["run", *single.columns], name
        assert list(both.run.unique()) == ["a", "b/c"]
        for rel in ("a", "b/c"):
            part = both[both.run == rel].drop(columns="run").reset_index(drop=True)
            pd.testing.assert_frame_equal(part, single, obj=f"{name} {rel}")
    with pytest.raises(GradwatchDataError, match=r"holds 2 runs \(a, b/c\)"):
        gw.read_run(str(root))


def test_error_messages_say_what_was_wrong(tmp_path, run, caplog):
    with pytest.raises(GradwatchDataError, match="does not exist"):
        gw.read_stats(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(GradwatchDataError, match="is a file, not a directory"):
        gw.read_windows(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradwatchDataError, match="is empty: no gradwatch run"):
        gw.read_alerts(str(tmp_path / "empty"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.keras").write_text("x")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(other))  # TensorBoard events without gradwatch summaries are not a run
    value = summary_pb2.Summary.Value(tag="epoch_loss", simple_value=1.0)
    writer.add_event(event_pb2.Event(step=1, summary=summary_pb2.Summary(value=[value])))
    writer.close()
    with pytest.raises(
        GradwatchDataError,
        match=r"looked for windows.csv, stats.csv, layers.csv, alerts.csv, "
        r"or TensorBoard event files .* 'gradwatch/window' summaries; found 2 entries "
        r"\(events.out.tfevents.*, model.keras\)",
    ):
        gw.read_stats(str(other))
    only = events_only(run, tmp_path / "only")
    with pytest.raises(GradwatchDataError, match=r"source='csv'\): looked for windows.csv"):
        gw.read_stats(only, source="csv")
    with pytest.raises(ValueError, match="source must be one of"):
        gw.read_stats(only, source="tfevents")
    bad = tmp_path / "bad"
    shutil.copytree(run["dir"], bad)
    with open(bad / "stats.csv", "a") as f:
        f.write("1,2,3," + ",".join(["9"] * 40) + "\n")
    with open(bad / "stats.csv") as f:
        line = len(f.read().splitlines())
    # a row that does not fit the header is left out, naming its line
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        pd.testing.assert_frame_equal(gw.read_stats(str(bad)), gw.read_stats(run["dir"]))
    assert [r.getMessage() for r in caplog.records] == [
        f"gradwatch: {bad / 'stats.csv'} line {line} is not a gradwatch row (43 fields, the header has 19); "
        "it is left out."]


def test_reading_events_does_not_import_tensorflow(run):
    code = (
        "import sys, gradwatch as gw\n"
        f"frame = gw.read_stats({run['dir']!r}, source='events')\n"
        f"gw.read_alerts({run['dir']!r}, source='events')\n"
        "assert len(frame) > 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("names", [["dense", "x,y"], ["a],[b", "c"], ['ünï"q', "tab\there"], ["nan", "]]}"]])
@pytest.mark.fast
def test_odd_layer_names_read_back_exactly(tmp_path, names):
    """Names with commas, row separators, quotes, non-ASCII or JSON escapes (the reader's fast
    path must notice them and fall back to json) read back as tb_format.decode_window gives them."""
    from gradwatch._io.schema import STATS_COLUMNS, WINDOW_COLUMNS

    sink = TensorBoardSink(str(tmp_path), {}, names)
    expected = []
    for step in (2, 4, 6):
        window = {c: 0.0 for c in WINDOW_COLUMNS}
        window.update(step=step, steps=2)
        rows = []
        for i, name in enumerate(names):
            row = {c: float(step * 10 + i) + 0.25 for c in STATS_COLUMNS}
            row.update(step=step, steps=2, layer=name, variable=f"{name}/kernel", nonfinite=i, grad_steps=2)
            rows.append(row)
        sink.write_window(window, rows, rows, [], step - 1)
        expected += rows
    sink.close()
    frame = gw.read_stats(str(tmp_path))  # no run info: sorted by step, then variable name
    expected = sorted(expected, key=lambda r: (r["step"], r["variable"]))
    assert list(frame.layer) == [r["layer"] for r in expected]
    assert list(frame.variable) == [r["variable"] for r in expected]
    assert list(frame.l2) == [r["l2"] for r in expected] and frame.nonfinite.dtype == "int64"
    (path,) = event_files(str(tmp_path))
    from tensorboard.compat.proto import event_pb2

    decoded = []
    for record in iter_records(path):
        for value in event_pb2.Event.FromString(record).summary.value:
            if value.tag == "gradwatch/window":
                decoded += tb_format.decode_window(value.tensor.string_val[0])["stats"]
    assert sorted(decoded, key=lambda r: (r["step"], r["variable"])) == expected


def test_an_unreadable_window_summary_is_skipped_with_a_warning(run, tmp_path, caplog):
    import logging

    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

    from gradwatch._sinks.tb_sink import EventFile

    log_dir = str(tmp_path / "garbled")
    write_events(log_dir, run["windows"][:2], run["info"])
    events = EventFile(log_dir)
    for payload in (b"{not json", b'{"v":1,"window":{"step":"x"},"stats":{}}', b"[]"):
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[payload])
        value = summary_pb2.Summary.Value(tag="gradwatch/window", tensor=tensor)
        events.add(event_pb2.Event(step=99, summary=summary_pb2.Summary(value=[value])))
    events.close()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        windows = gw.read_windows(log_dir)
        stats = gw.read_stats(log_dir)
    assert list(windows.step) == [5, 10] and sorted(set(stats.step)) == [5, 10]
    assert sum("skipped an unreadable window summary" in r.getMessage() for r in caplog.records) == 6


def test_a_flipped_digit_in_a_window_record_drops_the_window_never_changes_it(run, tmp_path, caplog):
    # the record's data checksum catches it: before, the window read back with another number
    only = events_only(run, tmp_path / "only")
    expected = gw.read_windows(only, source="events")
    (path,) = [p for p in event_files(only) if any(b'"global_l2":' in r for r in iter_records(p))]
    with open(path, "rb") as f:
        data = f.read()
    second = data.index(b'"global_l2":', data.index(b'"global_l2":') + 1)  # the second window's
    digit = next(i for i in range(second + len(b'"global_l2":'), len(data)) if data[i:i + 1] in b"123456789")
    with open(path, "wb") as f:
        f.write(data[:digit] + bytes([data[digit] ^ 0x01]) + data[digit + 1:])
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        windows = gw.read_windows(only, source="events")
    pd.testing.assert_frame_equal(windows, expected.drop(index=1).reset_index(drop=True))
    assert any("has a corrupt record at byte" in r.getMessage() and path in r.getMessage()
               for r in caplog.records)
