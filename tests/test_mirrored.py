"""MirroredStrategy over 2 logical CPU devices (own process: devices are set before TF starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "mirrored_check.py")


def _run(*args):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_mirrored_strategy_reports_the_global_gradient(tmp_path):
    result = _run(str(tmp_path / "run"))
    assert result["replicas"] == 2
    for got, expected in zip(result["got"], result["expected"]):
        assert got == pytest.approx(expected, rel=1e-5)
    # what one replica alone sees differs: the stats really are of the global gradient
    assert result["one_replica"] != pytest.approx(result["expected"][1], rel=1e-2)
    assert result["window_losses"] == pytest.approx(result["losses"], rel=1e-5)
    assert result["weights_match"]


@pytest.mark.slow
def test_mirrored_clipping_clips_the_global_gradient(tmp_path):
    result = _run(str(tmp_path / "run"), "clip")
    assert result["weights_match"], "same update as Keras global_clipnorm on one device"
    assert result["replicas_agree"]
    assert result["clip_global_l2"] == pytest.approx([0.5, 0.5], rel=1e-5)
    assert min(result["clip_fraction"]) > 0


@pytest.mark.slow
def test_mirrored_mixed_precision_inf_in_one_replica_is_skipped_everywhere(tmp_path):
    result = _run(str(tmp_path / "run"), "mixed_inf")
    assert result["finite_everywhere"], "no replica's weights became non-finite"
    assert result["nonfinite_steps"][1] == 1 and sum(result["nonfinite_steps"]) == 1
    # the error at step 2, then the info row saying it cleared
    assert result["alert_steps"] == [2, 3]
    assert result["alert_kinds"] == ["nonfinite_gradient"] * 2
    assert result["alert_severities"] == ["error", "info"]
    assert result["iterations"] == 2  # the bad step was not applied
