"""The examples and the CLI run as a user runs them."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

import gradwatch as gw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _chain_rule():
    """The worked example by hand, independently of the example's own code."""
    x, target, w1, b1, w2, b2 = 2.0, 1.0, 0.5, 0.1, 0.3, -0.2
    h = max(0.0, w1 * x + b1)
    out = 1 / (1 + math.exp(-(w2 * h + b2)))
    dz = 2 * (out - target) * out * (1 - out)
    return {"w2": abs(dz * h), "b2": abs(dz), "w1": abs(dz * w2 * x), "b1": abs(dz * w2)}


def test_worked_example_writes_the_exact_gradients(tmp_path):
    out = tmp_path / "worked"
    stdout = _run([sys.executable, "examples/worked_example.py", "--out", str(out)], ROOT)
    stats = gw.read_stats(str(out)).set_index("variable")
    expected = _chain_rule()
    for name, value in expected.items():
        layer = "hidden" if name.endswith("1") else "output"
        assert stats.loc[f"{layer}/{name}"].l2 == pytest.approx(value, rel=1e-5)
    assert [round(expected[k], 4) for k in ("w2", "b2", "w1", "b1")] == [0.2561, 0.2328, 0.1397, 0.0698]
    assert "0.257" in stdout and "rounding" in stdout


@pytest.mark.parametrize("name", ["keras_fit", "custom_loop", "raw_variables"])
def test_example_runs_and_writes_a_run(tmp_path, name):
    out = tmp_path / name
    _run([sys.executable, f"examples/{name}.py", "--out", str(out)], ROOT)
    stats = gw.read_stats(str(out))
    windows = gw.read_windows(str(out))
    assert len(windows) > 0 and (windows.steps > 0).all()
    assert stats.l2.notna().all() and (stats.l2 > 0).all()
    assert windows.loss.notna().all()
    # healthy training: no alert (the detectors must not cry wolf)
    assert gw.read_alerts(str(out)).empty


def test_gan_example_watches_both_networks_as_two_groups(tmp_path):
    out = tmp_path / "gan_fit"
    _run([sys.executable, "examples/gan_fit.py", "--out", str(out)], ROOT)
    stats = gw.read_stats(str(out), level="layer")
    assert set(stats.group) == {"d_optimizer", "g_optimizer"}
    assert stats.l2.notna().all() and (stats.l2 > 0).all()
    windows = gw.read_windows(str(out))
    assert windows.step.iloc[-1] == 96 and windows.steps.sum() == 96  # 3 epochs of 32 batches
    assert gw.read_alerts(str(out)).empty


def test_cli_demo_and_module_entry(tmp_path):
    stdout = _run([sys.executable, "-m", "gradwatch", "demo", "--out", str(tmp_path / "demo")], str(tmp_path))
    assert "gradwatch demo: 6 runs written under" in stdout
    for name in ("worked_example", "keras_fit", "gan_fit", "custom_loop", "raw_variables"):
        assert os.path.exists(tmp_path / "demo" / name / "stats.csv")
    broken = tmp_path / "demo" / "broken_nets"
    kinds = {name: set(gw.read_alerts(str(broken / name)).kind)
             for name in ("vanishing", "exploding", "exploding_clipped")}
    assert "vanishing_gradient" in kinds["vanishing"]
    assert {"exploding_gradient", "nonfinite_gradient"} <= kinds["exploding"]
    assert "nonfinite_gradient" not in kinds["exploding_clipped"]
    assert "vanishing_gradient" in stdout and "exploding_gradient" in stdout
    help_text = _run([os.path.join(os.path.dirname(sys.executable), "gradwatch"), "--help"], str(tmp_path))
    assert "demo" in help_text


def test_importing_gradwatch_does_not_import_tensorflow():
    code = "import sys, gradwatch; gradwatch.read_stats; print('tensorflow' in sys.modules)"
    assert _run([sys.executable, "-c", code], ROOT).strip() == "False"
