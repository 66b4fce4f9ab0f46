"""TensorBoard sink: tags, values against the CSV rows, alert text, histograms, NaN/Inf inputs,
plugin metadata, and what TensorBoard's own loaders keep."""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import pytest
from _runs import exploding_run, rows_by_window
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2

import gradwatch as gw
from gradwatch._io import tb_format
from gradwatch._io.readers import event_files, iter_records
from gradwatch._sinks.tb_sink import TensorBoardSink, dashboards_layout


def tagged(family, layers, layer):
    """The per-layer tag: the layer's zero-padded model index, then its name."""
    return f"gradwatch/{family}/{layers.index(layer):02d}_{layer}"

WINDOW_TAGS = {
    "loss": "gradwatch/loss",
    "learning_rate": "gradwatch/learning_rate",
    "global_l2": "gradwatch/global_norm",
    "global_l2_max": "gradwatch/global_norm_max",
    "nonfinite_steps": "gradwatch/nonfinite_steps",
    "skipped_steps": "gradwatch/skipped_steps",
    "clip_fraction": "gradwatch/clip_fraction",
}
LAYER_TAGS = {
    "l2": "grad_norm",
    "l2_max": "grad_norm_max",
    "update_ratio": "update_ratio",
    "dead_frac": "dead_fraction",
    "nonfinite": "nonfinite",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 30-step gradwatch run (CSV), re-written by the sink into its own event directory."""
    base = tmp_path_factory.mktemp("tb")
    csv_dir, tb_dir = str(base / "csv"), str(base / "tb")
    histograms = exploding_run(csv_dir)
    windows = rows_by_window(csv_dir)
    info = gw.read_run(csv_dir)
    layers = [layer["name"] for layer in info["layers"]]
    sink = TensorBoardSink(tb_dir, info, layers)
    assert not os.path.exists(tb_dir)  # the writer is created lazily
    for i, window in enumerate(windows):
        sink.write_window(**window, histograms=histograms if i == 0 else None)
    sink.close()
    return {
        "csv": csv_dir,
        "tb": tb_dir,
        "windows": windows,
        "histograms": histograms,
        "info": info,
        "layers": layers,
    }


def events_of(log_dir):
    """[(step, Summary.Value)] of every event file of log_dir, parsed with the record reader."""
    out = []
    for path in event_files(log_dir):
        for record in iter_records(path):
            event = event_pb2.Event.FromString(record)
            out += [(event.step, value) for value in event.summary.value]
    return out


def scalars_of(log_dir):
    return {
        (v.tag, step): v.tensor.float_val[0]
        for step, v in events_of(log_dir)
        if v.tensor.dtype == 1 and not v.tensor.tensor_shape.dim
    }


def expected_scalars(windows, layers):
    """{(tag, step): value} the sink must write: every finite window/layer value, nothing else."""
    out = {}
    for w in windows:
        step = w["window_row"]["step"]
        for column, tag in WINDOW_TAGS.items():
            out[(tag, step)] = w["window_row"][column]
        for row in w["layer_rows"]:
            for column, name in LAYER_TAGS.items():
                out[(tagged(name, layers, row["layer"]), step)] = row[column]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def test_the_tags_are_exactly_the_documented_ones(run):
    tags = {v.tag for _, v in events_of(run["tb"])}
    expected = {tag for tag, _ in expected_scalars(run["windows"], run["layers"])}
    expected |= {"gradwatch/alerts", "gradwatch/window", "gradwatch/run", "custom_scalars__config__"}
    for layer in run["layers"]:
        expected |= {tagged(f, run["layers"], layer) for f in ("grad_log10_abs", "grad_values", "zero_count")}
    assert tags == expected
    assert "gradwatch/clip_fraction" not in tags  # no clipping: NaN, never written
    assert {tagged("grad_norm", run["layers"], layer) for layer in run["layers"]} <= tags
    # 7 window scalars + 5 families x 2 layers + zero counts = 19 cards; hist_nonfinite would be 21
    scalar_tags = {v.tag for _, v in events_of(run["tb"]) if v.metadata.plugin_data.plugin_name == "scalars"}
    assert len(scalar_tags) <= 20


def test_every_scalar_equals_the_csv_value_and_nan_values_are_not_written(run):
    written = scalars_of(run["tb"])
    written = {
        k: v for k, v in written.items() if not k[0].startswith(("gradwatch/hist_", "gradwatch/zero_"))
    }
    expected = expected_scalars(run["windows"], run["layers"])
    assert set(written) == set(expected)  # same (tag, step) pairs: NaN rows (loss after step 10) skipped
    for key, value in expected.items():
        assert written[key] == pytest.approx(value, rel=1e-6), key
    losses = {step for (tag, step) in written if tag == "gradwatch/loss"}
    nan_loss_steps = {w["window_row"]["step"] for w in run["windows"] if math.isnan(w["window_row"]["loss"])}
    assert nan_loss_steps and not losses & nan_loss_steps
    assert written[("gradwatch/nonfinite_steps", 30)] == 5.0


def test_the_alert_text_lists_the_problems_so_far_first_one_first(run):
    texts = {
        step: v.tensor.string_val[0].decode()
        for step, v in events_of(run["tb"])
        if v.tag == "gradwatch/alerts"
    }
    expected = {w["window_row"]["step"]: w["alert_rows"] for w in run["windows"] if w["alert_rows"]}
    assert set(texts) == set(expected) and len(expected) >= 2
    seen = []  # (layer, variable, kind) of the warnings and errors so far, in order of first step
    firsts = {}
    for step in sorted(expected):
        for alert in expected[step]:
            key = (alert["layer"], alert["variable"], alert["kind"])
            if alert["severity"] != "info" and key not in firsts:
                firsts[key] = alert["step"]
                seen.append(key)
        lines = texts[step].splitlines()
        assert lines[0] == "| first step | layer | problem | now |"
        body = [line for line in lines[2:] if line.startswith("|")]
        assert len(body) == len(seen) <= 10
        for line, key in zip(body, sorted(seen, key=lambda k: firsts[k])):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert cells[0] == str(firsts[key])
            assert cells[1] == (key[0] or "whole model").replace("_", r"\_")
            assert cells[2].endswith(key[2].replace("_", " "))
        assert "**What to try**" in texts[step]
    last = texts[max(texts)].splitlines()[2]
    assert "exploding gradient" in last  # the run's first problem opens its last table, not its last word


@pytest.mark.fast
def test_alert_names_are_escaped_for_markdown_and_html(tmp_path):
    from tensorboard.plugin_util import markdown_to_safe_html

    sink = TensorBoardSink(str(tmp_path), {}, ["a|b"])
    alert = {
        "step": 3,
        "layer": "a|b<script>alert(1)</script>",
        "kind": "dead_relu",
        "severity": "error",
        "message": "*not bold* [link](http://x)\nsecond ~1e-3 line",
        "hint": "use `Leaky ReLU`",
    }
    sink.write_window({"step": 3, "steps": 1}, [], [], [alert], 3)
    sink.close()
    (text,) = [
        v.tensor.string_val[0].decode() for _, v in events_of(str(tmp_path)) if v.tag == "gradwatch/alerts"
    ]
    html = markdown_to_safe_html(text)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<td>") == 4  # the | in the layer name did not split the cell
    assert "<em>" not in html and "<a " not in html and "<code>" not in html
    assert "*not bold* [link](http://x) second ~1e-3 line" in html
    assert "`Leaky ReLU`" in html


def test_histograms_are_k_by_3_with_the_given_edges_and_counts(run):
    values = {
        v.tag: (step, v)
        for step, v in events_of(run["tb"])
        if "grad_log10_abs" in v.tag or "grad_values" in v.tag
    }
    scalars = scalars_of(run["tb"])
    assert len(values) == len(run["histograms"])
    for h in run["histograms"]:
        family = "grad_log10_abs" if h["kind"] == "log10_abs" else "grad_values"
        step, value = values[tagged(family, run["layers"], h["layer"])]
        assert step == h["step"] == 1
        dims = [d.size for d in value.tensor.tensor_shape.dim]
        buckets = np.frombuffer(value.tensor.tensor_content, "<f8").reshape(dims)
        assert dims == [len(h["counts"]), 3]
        np.testing.assert_array_equal(buckets[:, 2], h["counts"])
        np.testing.assert_array_equal(buckets[:, 0], h["edges"][:-1])
        np.testing.assert_array_equal(buckets[:, 1], h["edges"][1:])
        assert scalars[(tagged("zero_count", run["layers"], h["layer"]), 1)] == h["zeros"]


@pytest.mark.fast
def test_nan_and_inf_everywhere_are_written_without_crashing(tmp_path, caplog):
    from gradwatch._io.schema import STATS_COLUMNS, WINDOW_COLUMNS

    bad = [float("nan"), float("inf"), -float("inf"), 1e300]
    window = {c: bad[i % 4] for i, c in enumerate(WINDOW_COLUMNS)}
    window.update(step=7, steps=1)
    layer = {c: bad[i % 4] for i, c in enumerate(STATS_COLUMNS)}
    layer.update(step=7, layer="L", variable="*")
    histograms = [
        {
            "step": 7,
            "layer": "L",
            "kind": "log10_abs",
            "edges": np.array([0.0, 1.0, 2.0, np.nan, np.inf, 5.0]),
            "counts": np.array([1.0, 2.0, np.nan, 4.0, 5.0]),
            "zeros": float("nan"),
            "nonfinite": np.inf,
        },
        {
            "step": 7,
            "layer": "L",
            "kind": "signed",
            "edges": np.array([0.0, 1.0]),
            "counts": np.array([1.0, 2.0]),
        },
        {"step": 7, "layer": "L", "kind": "other", "edges": [0, 1], "counts": [1]},
    ]
    sink = TensorBoardSink(str(tmp_path), {"x": float("nan")}, ["L"])
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        sink.write_window(window, [dict(layer, variable="L/w")], [layer], [], 7, histograms=histograms)
    sink.close()
    values = {v.tag: v for _, v in events_of(str(tmp_path))}
    scalar_tags = {t for t, v in values.items() if v.tensor.float_val}
    assert scalar_tags == set()  # every scalar input was NaN, +-Inf or beyond float32
    hist = values["gradwatch/grad_log10_abs/00_L"].tensor
    buckets = np.frombuffer(hist.tensor_content, "<f8").reshape(-1, 3)
    np.testing.assert_array_equal(buckets, [[0.0, 1.0, 1.0], [1.0, 2.0, 2.0]])  # the finite buckets
    assert "gradwatch/grad_values/00_L" not in values  # 2 edges for 2 counts
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 3 of 5 buckets" in messages and "2 edges for 2 counts" in messages
    assert "unknown kind 'other'" in messages
    decoded = tb_format.decode_window(values["gradwatch/window"].tensor.string_val[0])
    for column, value in window.items():  # the structured summary keeps them as they are
        assert (
            decoded["window"][column] == value or math.isnan(value) and math.isnan(decoded["window"][column])
        )


def test_plugin_names_and_data_classes(run):
    first = {}
    for _, v in events_of(run["tb"]):
        first.setdefault(v.tag, v)
    kinds = {
        "gradwatch/loss": ("scalars", summary_pb2.DATA_CLASS_SCALAR),
        tagged("grad_norm", run["layers"], run["layers"][0]): ("scalars", summary_pb2.DATA_CLASS_SCALAR),
        tagged("grad_log10_abs", run["layers"], run["layers"][0]): ("histograms",
                                                                    summary_pb2.DATA_CLASS_TENSOR),
        "gradwatch/alerts": ("text", summary_pb2.DATA_CLASS_TENSOR),
        "gradwatch/window": ("gradwatch", summary_pb2.DATA_CLASS_TENSOR),
        "gradwatch/run": ("gradwatch", summary_pb2.DATA_CLASS_TENSOR),
        "custom_scalars__config__": ("custom_scalars", summary_pb2.DATA_CLASS_TENSOR),
    }
    for tag, (plugin, data_class) in kinds.items():
        assert (first[tag].metadata.plugin_data.plugin_name, first[tag].metadata.data_class) == (
            plugin,
            data_class,
        )
    window = first["gradwatch/window"].tensor
    assert window.dtype == 7 and not window.tensor_shape.dim  # DT_STRING scalar


def test_structured_summary_holds_the_csv_rows(run):
    payloads = {
        step: v.tensor.string_val[0] for step, v in events_of(run["tb"]) if v.tag == "gradwatch/window"
    }
    assert sorted(payloads) == [w["window_row"]["step"] for w in run["windows"]]
    for w in run["windows"]:
        decoded = tb_format.decode_window(payloads[w["window_row"]["step"]])
        assert decoded["first_step"] == w["first_step"]
        for got, want in zip(decoded["stats"] + decoded["layers"], w["stats_rows"] + w["layer_rows"]):
            for column, value in want.items():
                if column == "group":
                    continue  # the readers add it from run.json (the optimizer of the variable)
                assert got[column] == value or (
                    isinstance(value, float) and math.isnan(value) and math.isnan(got[column])
                ), column
    (run_payload,) = [v.tensor.string_val[0] for _, v in events_of(run["tb"]) if v.tag == "gradwatch/run"]
    assert tb_format.decode_run(run_payload) == run["info"]


def test_the_layout_covers_the_written_tags(run):
    (value,) = [v for _, v in events_of(run["tb"]) if v.tag == "custom_scalars__config__"]
    layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
    assert layout == dashboards_layout(run["layers"])
    titles = [c.title for c in layout.category]
    assert titles[:5] == [
        "gradient norm",
        "update/weight ratio",
        "dead units",
        "clipping & non-finite",
        "global norm & loss",
    ]
    tags = {v.tag for _, v in events_of(run["tb"]) if v.tensor.float_val}
    (norm_chart,) = [c for c in layout.category[0].chart if c.multiline.tag == ["gradwatch/grad_norm/.*"]]
    matched = {t for t in tags if re.match(norm_chart.multiline.tag[0], t)}  # TensorBoard uses re.match
    assert matched == {tagged("grad_norm", run["layers"], layer) for layer in run["layers"]}  # one chart
    per_layer = layout.category[-1]
    assert per_layer.closed and [c.title.split(":")[0] for c in per_layer.chart] == run["layers"]


def test_every_window_is_flushed_before_write_window_returns(tmp_path, run):
    sink = TensorBoardSink(str(tmp_path), run["info"], run["layers"])
    for window in run["windows"][:2]:
        sink.write_window(**window)
        steps = [s for s, v in events_of(str(tmp_path)) if v.tag == "gradwatch/window"]
        assert steps[-1] == window["window_row"]["step"]
    sink.close()


def test_tensorflow_summary_iterator_reads_the_same_values(run):
    import tensorflow as tf

    ours = [(step, v.tag, v.SerializeToString()) for step, v in events_of(run["tb"])]
    theirs = []
    for path in event_files(run["tb"]):
        for event in tf.compat.v1.train.summary_iterator(path):
            theirs += [(event.step, v.tag, v.SerializeToString()) for v in event.summary.value]
    assert theirs == ours and len(ours) > 50


def test_tensorboard_multiplexer_keeps_scalars_histograms_text_and_windows(run):
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradwatch": 0})
    multiplexer.AddRunsFromDirectory(os.path.dirname(run["tb"]))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, os.path.dirname(run["tb"]))
    ctx, eid, name = context.RequestContext(), "", "tb"
    scalars = provider.read_scalars(ctx, experiment_id=eid, plugin_name="scalars", downsample=10_000)[name]
    expected = expected_scalars(run["windows"], run["layers"])
    for (tag, step), value in expected.items():
        (point,) = [p for p in scalars[tag] if p.step == step]
        assert point.value == pytest.approx(value, rel=1e-6)
    hist = provider.list_tensors(ctx, experiment_id=eid, plugin_name="histograms")[name]
    assert set(hist) == {
        tagged(k, run["layers"], layer) for k in ("grad_log10_abs", "grad_values") for layer in run["layers"]
    }
    text = provider.read_tensors(ctx, experiment_id=eid, plugin_name="text", downsample=100)[name]
    assert [p.step for p in text["gradwatch/alerts"]] == [
        w["window_row"]["step"] for w in run["windows"] if w["alert_rows"]
    ]
    windows = provider.read_tensors(ctx, experiment_id=eid, plugin_name="gradwatch", downsample=10_000)[name]
    assert [p.step for p in windows["gradwatch/window"]] == [w["window_row"]["step"] for w in run["windows"]]
    decoded = tb_format.decode_window(windows["gradwatch/window"][0].numpy.item())
    assert decoded["window"]["step"] == run["windows"][0]["window_row"]["step"]
    layout = provider.read_tensors(ctx, experiment_id=eid, plugin_name="custom_scalars", downsample=1)[name]
    assert layout_pb2.Layout.FromString(layout["custom_scalars__config__"][0].numpy.item()).category


def test_gradwatch_layout_adds_the_layout_to_a_run_without_it(run, tmp_path, capsys):
    import shutil

    from gradwatch.cli import main

    csv_run = tmp_path / "runs" / "csv_only"
    shutil.copytree(run["csv"], csv_run, ignore=shutil.ignore_patterns("*tfevents*"))
    assert main(["layout", str(tmp_path / "runs")]) == 0
    (path,) = event_files(str(csv_run))
    values = [v for r in iter_records(path) for v in event_pb2.Event.FromString(r).summary.value]
    assert [v.tag for v in values] == ["custom_scalars__config__"]
    layout = layout_pb2.Layout.FromString(values[0].tensor.string_val[0])
    assert layout == dashboards_layout(run["layers"])
    per_layer = layout.category[-1].chart
    for chart, layer in zip(per_layer, run["layers"]):  # matches the tags with and without the index
        assert re.match(chart.multiline.tag[0], tagged("grad_norm", run["layers"], layer))
        assert re.match(chart.multiline.tag[0], f"gradwatch/grad_norm/{layer}")
    assert main(["layout", str(csv_run)]) == 0 and len(event_files(str(csv_run))) == 1  # not twice
    assert "already has a Custom Scalars layout" in capsys.readouterr().out
    assert main(["layout", str(tmp_path / "missing")]) == 2


@pytest.mark.fast
def test_twenty_layers_give_at_most_twenty_cards_in_model_order(tmp_path):
    layers = [f"sigmoid_{i}" for i in range(20)]  # sigmoid_10 sorts after sigmoid_1 by name
    sink = TensorBoardSink(str(tmp_path), {}, layers)
    rows = [{"layer": n, "l2": 0.5 + i, "l2_max": 1.0, "update_ratio": 1e-3, "dead_frac": 0.0,
             "nonfinite": 0.0} for i, n in enumerate(layers)]
    window = {"step": 10, "steps": 10, "loss": 1.0, "learning_rate": 0.1, "global_l2": 1.0,
              "global_l2_max": 1.0, "nonfinite_steps": 0, "skipped_steps": 0}
    sink.write_window(window, [], rows, [], 1)
    sink.close()
    written = scalars_of(str(tmp_path))
    tags = sorted({tag for tag, _ in written})
    assert len(tags) <= 20
    norms = [t for t in tags if t.startswith("gradwatch/grad_norm/")]
    names = [t.split("/", 2)[2].split("_", 1)[1] for t in norms]
    assert names == sorted(names, key=layers.index)  # TensorBoard's sort by tag is the model order
    assert names[0] == "sigmoid_0" and names[-1] == "sigmoid_19"  # the input and the output layer
    for tag in norms:  # each is its layer's value
        layer = tag.split("/", 2)[2].split("_", 1)[1]
        assert written[(tag, 10)] == pytest.approx(0.5 + layers.index(layer))


@pytest.mark.fast
def test_a_dead_layer_histogram_is_its_zeros_at_zero(tmp_path):
    sink = TensorBoardSink(str(tmp_path), {}, ["live", "dead"])
    edges = np.array([-3.0, -2.9, -2.8])
    histograms = [
        {"step": 1, "layer": "live", "kind": "log10_abs", "edges": edges, "counts": np.array([3.0, 4.0]),
         "zeros": 1, "nonfinite": 0},
        # what the probe decodes for a layer whose gradient is all zeros: one empty bucket at 1e-16
        {"step": 1, "layer": "dead", "kind": "log10_abs", "edges": np.array([-16.0, -15.9]),
         "counts": np.array([0.0]), "zeros": 12, "nonfinite": 0},
    ]
    sink.write_window({"step": 1, "steps": 1}, [], [], [], 1, histograms=histograms)
    sink.close()
    values = {v.tag: v for _, v in events_of(str(tmp_path))}
    assert "gradwatch/grad_log10_abs/01_dead" not in values  # no empty chart on a log10 axis near -16
    dead = values["gradwatch/grad_values/01_dead"].tensor
    np.testing.assert_array_equal(np.frombuffer(dead.tensor_content, "<f8").reshape(-1, 3),
                                  [[0.0, 0.0, 12.0]])
    live = values["gradwatch/grad_log10_abs/00_live"].tensor
    np.testing.assert_array_equal(np.frombuffer(live.tensor_content, "<f8").reshape(-1, 3)[:, 2], [3.0, 4.0])


@pytest.mark.fast
def test_a_layer_seen_later_widens_every_layers_tag_index(tmp_path):
    # the plan keeps each tag once made; indices are two digits wide
    # (padded to at least two) up to the hundredth, the hundred-and-first three: the kept tags follow
    from gradwatch._sinks.tb_tags import ScalarPlan

    plan = ScalarPlan([f"d{i}" for i in range(100)], window_cards=0, max_cards=1000)
    assert plan.tag("l2", "d0") == "gradwatch/grad_norm/00_d0"
    assert plan.tag("l2", "d99") == "gradwatch/grad_norm/99_d99"
    assert plan.tag("l2", "d100") is None  # not in the plan's layers when it was made: not kept
    assert plan.layers[-1] == "d100"  # ... but added at the end
    assert plan.tag("l2", "d0") == "gradwatch/grad_norm/000_d0"
    assert plan.tag("l2", "d99") == "gradwatch/grad_norm/099_d99"
