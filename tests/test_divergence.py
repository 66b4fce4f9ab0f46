"""The truth after divergence (issue 26): a norm over no finite entries is NaN, a run
that stays non-finite is "diverged, never recovered" in the files, the detectors, the
summary, its exit status and the report; a skipped NaN step recovers; clipping on
every step is a finding."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from _plugin import get_json, plugin_over

import gradwatch as gw
from gradwatch.cli import main

NORMS = ["l2", "l2_max", "l2_min", "l2_mean", "max_abs", "mean_abs", "global_l2", "global_l2_max"]
SHAPES = {"hidden/kernel": (8, 4), "hidden/bias": (4,), "out/kernel": (4, 1)}


def _variables():
    return [tf.Variable(tf.zeros(shape), name=name.replace("/", "_")) for name, shape in SHAPES.items()]


def _patterns() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=shape).astype("float32") for shape in SHAPES.values()]


def _feed(log_dir: str, schedule, log_every: int = 2, **options) -> list[list[np.ndarray]]:
    """Runs a ``Watch`` over raw variables on the gradients ``schedule(step) -> (scale, loss)``
    gives (every entry of every gradient is ``scale`` times a fixed random pattern; NaN scale:
    all entries NaN). Returns the gradients fed, per step."""
    variables = _variables()
    patterns = _patterns()
    watch = gw.Watch(log_dir=log_dir, log_every=log_every, names=list(SHAPES), **options)

    @tf.function
    def step(grads, loss):
        return watch.observe(list(grads), variables, loss=loss)

    fed = []
    with watch:
        for number in range(1, 41):
            scale, loss = schedule(number)
            grads = [np.float32(scale) * p for p in patterns]
            fed.append(grads)
            step([tf.constant(g) for g in grads], tf.constant(loss, tf.float32))
            watch.step_end()
    return fed


def _diverging(step: int) -> tuple[float, float]:
    """Healthy for 3 steps, exploding for 3, then NaN to the end (loss too)."""
    if step <= 3:
        return 1.0, 1.0
    if step <= 6:
        return 1e6, 1e6
    return float("nan"), float("nan")


def _one_nan_step(step: int) -> tuple[float, float]:
    return (float("nan"), float("nan")) if step == 11 else (1.0, 1.0)


def _alert_texts(log_dir: str) -> dict[int, str]:
    """The Text tab's alert tables by step, from the event files."""
    from tensorboard.compat.proto import event_pb2

    from gradwatch._io.readers import event_files, iter_records

    texts = {}
    for path in event_files(log_dir):
        for record in iter_records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.tag == "gradwatch/alerts":
                    texts[event.step] = value.tensor.string_val[0].decode()
    return texts


def _summary(capsys, *args: str) -> tuple[int, str]:
    code = main(["summary", *args])
    return code, " ".join(capsys.readouterr().out.split())


def test_a_run_that_stays_nan_is_diverged_never_recovered(tmp_path, capsys):
    log_dir = str(tmp_path / "diverged")
    fed = _feed(log_dir, _diverging)
    layers = gw.read_stats(log_dir, level="layer")
    for row in layers.itertuples():
        # the layer's gradients over the window's steps, by numpy: NaN when no entry is finite
        window = range(row.step - row.steps, row.step)
        parts = [np.concatenate([fed[s][i].ravel() for i, name in enumerate(SHAPES)
                                 if name.startswith(row.layer + "/")]) for s in window]
        norms = [math.sqrt(float(np.sum(p.astype(np.float64) ** 2))) for p in parts]
        expected = max(norms)
        if math.isnan(expected):
            assert math.isnan(row.l2) and math.isnan(row.l2_max) and math.isnan(row.l2_mean), row
        else:
            assert row.l2_max == pytest.approx(expected, rel=1e-5), row
    windows = gw.read_windows(log_dir)
    assert windows["global_l2"].iloc[4:].isna().all()  # steps 9.. are NaN, never 0.0
    alerts = gw.read_alerts(log_dir)
    assert set(alerts["kind"]) == {"exploding_gradient", "nonfinite_gradient"}
    assert (alerts["severity"] != "info").all(), alerts[["step", "kind", "message"]]
    # the run's last word, in alerts.csv, the event files and the Text tab
    last = alerts.iloc[-1]
    assert (last.step, last.severity) == (40, "error")
    assert last.message.startswith("Diverged at step 7, never recovered")
    pd.testing.assert_frame_equal(gw.read_alerts(log_dir, source="events"), alerts)
    assert "Diverged at step 7, never recovered" in _alert_texts(log_dir)[41]
    plugin, _ = plugin_over(log_dir)
    status, flow = get_json(plugin, "/flow", run=".")
    assert status == 200 and flow["divergence"] == {"step": 7, "last_step": 40}
    assert flow["windows"] == 20 and len(flow["values"][0]) == 20
    code, text = _summary(capsys, log_dir)
    assert code == 1
    assert "diverged: exploding at 'hidden' step 4 → NaN at step 7, diverged (never recovered" in text
    assert "diverged at step 7, never" in text and "recovered at step" not in text


def test_one_skipped_nan_step_recovers(tmp_path, capsys):
    log_dir = str(tmp_path / "recovered")
    _feed(log_dir, _one_nan_step, on_nonfinite="skip_step")
    alerts = gw.read_alerts(log_dir)
    error = alerts[alerts["severity"] == "error"]
    cleared = alerts[alerts["severity"] == "info"]
    assert error["step"].tolist() == [11] and error["kind"].tolist() == ["nonfinite_gradient"]
    # cleared by the first clean window (steps 13-14)
    assert cleared["step"].tolist() == [14]
    assert not alerts["message"].str.startswith("Diverged").any()
    plugin, _ = plugin_over(log_dir)
    assert get_json(plugin, "/flow", run=".")[1]["divergence"] is None
    code, text = _summary(capsys, log_dir)
    assert code == 1  # an error was raised, even though it recovered
    assert "recovered: errors: NaN/Inf at step 11, recovered at step 14" in text
    assert "never recovered" not in text and ": diverged" not in text


def test_an_overflowing_variable_makes_the_global_norm_inf(tmp_path):
    log_dir = str(tmp_path / "overflow")
    # every entry finite (the largest 3e38), but the 32 entries' norm is past float32's 3.4e38
    scale = 3e38 / max(float(np.abs(p).max()) for p in _patterns())
    kernel = _patterns()[0].astype(np.float64) * np.float32(scale)
    assert np.isfinite(kernel.astype(np.float32)).all() and np.sqrt((kernel ** 2).sum()) > 3.5e38
    _feed(log_dir, lambda step: (scale if step == 2 else 1.0, 1.0), log_every=1)
    windows = gw.read_windows(log_dir).set_index("step")
    stats = gw.read_stats(log_dir).set_index(["step", "variable"])
    assert math.isinf(stats.loc[(2, "hidden/kernel"), "l2"])
    layers = gw.read_stats(log_dir, level="layer").set_index(["step", "layer"])
    assert math.isinf(layers.loc[(2, "hidden"), "l2"]) and math.isfinite(layers.loc[(2, "out"), "l2"])
    assert windows.loc[2, "nonfinite_steps"] == 0
    assert windows.loc[2, "global_l2"] == math.inf and windows.loc[2, "global_l2_max"] == math.inf


def test_clipping_on_every_step_is_a_warning(tmp_path, capsys):
    log_dir = str(tmp_path / "clipped")
    _feed(log_dir, lambda step: (1.0, 1.0), log_every=4, clip=gw.clip.GlobalNorm(0.1))
    assert gw.read_windows(log_dir)["clip_fraction"].tolist() == [1.0] * 10
    code, text = _summary(capsys, log_dir)
    assert code == 0  # warnings do not fail by default
    assert ("clipped: warnings: clipping changed the gradient on 100% of the steps from step 1, still active "
            "at the end") in text
    assert "clipped on 40 of 40 steps (100%)" in text
    assert _summary(capsys, log_dir, "--fail-on", "warning")[0] == 1
    assert _summary(capsys, log_dir, "--fail-on", "error")[0] == 0


def test_report_headlines_and_output_extension(tmp_path, capsys):
    _feed(str(tmp_path / "runs" / "diverged"), _diverging)
    _feed(str(tmp_path / "runs" / "recovered"), _one_nan_step, on_nonfinite="skip_step")
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "runs"), "-o", str(out)]) == 0
    page = out.read_text()
    headlines = re.findall(r'<p class="headline [a-z]+" data-state="([a-z ]+)">([^<]*)</p>', page)
    assert [state for state, _ in headlines] == ["diverged", "errors"]
    assert headlines[0][1].startswith("exploding at &#x27;hidden&#x27; step 4 → NaN at step 7, diverged")
    assert headlines[1][1] == "NaN/Inf at step 11, recovered at step 14"
    capsys.readouterr()
    for name in ("x.pdf", "x", "x.HTML.txt"):
        assert main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / name)]) == 2
        assert "unknown extension" in capsys.readouterr().err
        assert not (tmp_path / name).exists()


def test_a_run_written_before_version_3_reads_the_same_truth(tmp_path, capsys):
    """A version 2 run wrote 0.0 for a norm over no finite entry and "recovered" on NaN windows:
    the readers and the verdicts read it as NaN and as a divergence."""
    log_dir = tmp_path / "old"
    _feed(str(log_dir), _diverging)
    for name in ("stats.csv", "layers.csv", "windows.csv"):
        frame = pd.read_csv(log_dir / name)
        frame[frame.columns.intersection(NORMS)] = frame[frame.columns.intersection(NORMS)].fillna(0.0)
        frame.to_csv(log_dir / name, index=False, na_rep="nan")
    with open(log_dir / "alerts.csv", "a") as f:  # what version 2 wrote at the third NaN window
        f.write("12,hidden,*,exploding_gradient,info,0.0,10000.0,"
                "Layer 'hidden': exploding gradient has cleared (recovered).,\n")
    info = json.loads((log_dir / "run.json").read_text())
    (log_dir / "run.json").write_text(json.dumps({**info, "schema_version": 2}))
    layers = gw.read_stats(str(log_dir), level="layer")
    assert layers.loc[layers.step >= 8, ["l2", "l2_max", "l2_mean"]].isna().all().all()
    assert (layers.loc[layers.step <= 6, "l2"] > 0).all()
    assert gw.read_windows(str(log_dir))["global_l2"].iloc[4:].isna().all()
    code, text = _summary(capsys, str(log_dir))
    assert code == 1 and "old: diverged: exploding at 'hidden' step 4 → NaN at step 7" in text
    assert "recovered at step" not in text
