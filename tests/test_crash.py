"""A training process killed with SIGKILL at a random moment loses nothing but
the windows being written or queued for the writer thread (the latest ones: what
is on disk is a prefix of the run); every file stays readable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import gradwatch as gw

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "killable_run.py")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_leaves_readable_files(tmp_path, seed):
    log_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, SCRIPT, log_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STARTED"
        time.sleep(random.Random(seed).uniform(0.05, 1.5))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    windows = gw.read_windows(log_dir)
    stats = gw.read_stats(log_dir)
    layers = gw.read_stats(log_dir, level="layer")
    assert len(gw.read_alerts(log_dir).columns) == 9
    steps = list(windows.step)
    assert len(steps) >= 6
    assert steps == list(range(1, len(steps) + 1)), "no window lost before the last flush"
    # stats are written just before their window row: at most one window ahead
    stat_steps = sorted(set(stats.step))
    assert stat_steps[: len(steps)] == steps and len(stat_steps) - len(steps) in (0, 1)
    per_window = stats.groupby("step").size()
    assert (per_window.loc[steps] == 4).all()  # every complete window has all 4 variables
    assert set(layers.step) >= set(steps)
