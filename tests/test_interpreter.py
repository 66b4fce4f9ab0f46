"""The interpreter through its seam: a hand-built FetchedWindow in, a WindowResult out
(no TensorFlow), and the parts' import boundaries."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from gradwatch._interpret.detectors import Thresholds
from gradwatch._interpret.interpreter import Interpreter
from gradwatch._interpret.probe_layout import unit_tracks
from gradwatch._interpret.results import FetchedWindow
from gradwatch._io.schema import GLOBAL_ACCUMULATORS, STATS_COLUMNS, VAR_ACCUMULATORS, WINDOW_COLUMNS
from gradwatch._topology import LayerInfo, Topology, VariableInfo

pytestmark = pytest.mark.fast

TOPOLOGY = Topology(
    layers=[LayerInfo("hidden", 0, "Dense", "relu", ["hidden/kernel", "hidden/bias"]),
            LayerInfo("out", 1, "Dense", "linear", ["out/kernel", "out/bias"])],
    variables=[VariableInfo("hidden/kernel", "hidden", [3, 4], "float32", 0),
               VariableInfo("hidden/bias", "hidden", [4], "float32", 0),
               VariableInfo("out/kernel", "out", [4, 1], "float32", 1),
               VariableInfo("out/bias", "out", [1], "float32", 1)],
)
STEPS = 5


def fetched(window: int, l2: list[float], grad_steps: list[int], nonfinite: list[float] | None = None,
            loss: float = 0.5, skipped: int = 0) -> FetchedWindow:
    """A window of STEPS steps as the recorder would fetch it: columns are the four
    variables, then the two layers."""
    l2 = np.array(l2, np.float64)
    has = np.array(grad_steps, np.float64)
    bad = np.zeros(6) if nonfinite is None else np.array(nonfinite, np.float64)
    columns = {name: np.zeros(6) for name in VAR_ACCUMULATORS}
    columns.update(l2_last=l2, l2_max=l2, l2_min=l2, l2_sum=l2 * has, l2_steps=has, grad_steps=has,
                   nonfinite_sum=bad, max_abs=l2, mean_abs=l2 / 10, zero_frac=np.zeros(6),
                   clip_scale_min=np.ones(6), nonfinite_at_first=bad)
    last = window * STEPS
    first_bad = last - STEPS + 1 if bad.any() else -1
    glob = dict.fromkeys(GLOBAL_ACCUMULATORS, 0.0)
    glob.update(steps=STEPS, last_step=last, global_l2_last=float(np.sqrt((l2[:4] ** 2).sum())),
                global_l2_max=1.0, global_l2_min=1.0, nonfinite_steps=float(bad.any()),
                first_nonfinite_step=first_bad, skipped_steps=skipped, loss_sum=loss * STEPS,
                loss_count=STEPS,
                learning_rate_last=0.01, loss_scale_last=float("nan"), clip_l2_last=float("nan"),
                clip_l2_max=float("nan"), clip_scale_min=float("nan"), clip_threshold_last=float("nan"),
                loss_nonfinite_at_first=0.0 if bad.any() else -1.0)
    units = sum(t.units for t in unit_tracks(TOPOLOGY))
    return FetchedWindow(columns, glob, (np.zeros(units, np.int32), np.zeros(units, np.float32)))


def test_rows_carry_the_fetched_values_in_schema_order():
    result = Interpreter(TOPOLOGY, Thresholds(), clipping=False).interpret(
        fetched(1, [0.3, 0.1, 0.2, 0.05, 0.32, 0.21], [5, 5, 5, 5, 5, 5]))
    assert tuple(result.window_row) == WINDOW_COLUMNS
    assert tuple(result.stats_rows[0]) == STATS_COLUMNS
    assert result.first_step == 1 and result.window_row["step"] == 5
    assert [r["variable"] for r in result.stats_rows] == TOPOLOGY.variable_names
    assert [(r["layer"], r["l2"]) for r in result.layer_rows] == [("hidden", 0.32), ("out", 0.21)]
    assert result.window_row["loss"] == pytest.approx(0.5)
    assert result.alerts == []


def test_no_gradient_is_reported_once_per_variable():
    interpreter = Interpreter(TOPOLOGY, Thresholds(), clipping=False)
    grad_steps = [5, 0, 5, 5, 5, 5]  # hidden/bias disconnected from the loss
    first = interpreter.interpret(fetched(1, [0.3, 0.0, 0.2, 0.05, 0.3, 0.21], grad_steps))
    second = interpreter.interpret(fetched(2, [0.3, 0.0, 0.2, 0.05, 0.3, 0.21], grad_steps))
    assert [(a.kind, a.variable, a.severity, a.step) for a in first.alerts] == [
        ("no_gradient", "hidden/bias", "warning", 5)]
    assert second.alerts == []


def test_nonfinite_error_then_info_when_it_clears_a_window_later():
    interpreter = Interpreter(TOPOLOGY, Thresholds(), clipping=False)
    healthy = [0.3, 0.1, 0.2, 0.05, 0.32, 0.21]
    bad = interpreter.interpret(fetched(1, healthy, [5] * 6, nonfinite=[3, 0, 0, 0, 3, 0]))
    cleared = interpreter.interpret(fetched(2, healthy, [5] * 6))
    kinds = [(a.kind, a.severity, a.step, a.layer) for a in bad.alerts]
    assert kinds == [("nonfinite_gradient", "error", 1, "hidden")]
    assert [(a.kind, a.severity, a.step) for a in cleared.alerts] == [("nonfinite_gradient", "info", 10)]


@pytest.mark.parametrize("skipped", [0, 1])
def test_an_overflow_skip_under_a_loss_scale_optimizer_is_info_only_when_skipped(skipped):
    interpreter = Interpreter(TOPOLOGY, Thresholds(), clipping=False, loss_scale_optimizer=True)
    result = interpreter.interpret(fetched(1, [0.3, 0.1, 0.2, 0.05, 0.32, 0.21], [5] * 6,
                                           nonfinite=[3, 0, 0, 0, 3, 0], skipped=skipped))
    severity = "info" if skipped else "error"
    assert [(a.kind, a.severity) for a in result.alerts] == [("nonfinite_gradient", severity)]


PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gradwatch"
TENSORFLOW_FREE = ["_interpret", "_io", "_sinks", "_report", "tb_plugin", "_topology.py"]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", TENSORFLOW_FREE)
def test_host_parts_import_no_tensorflow_and_no_capture_code(part):
    target = PACKAGE / part
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    assert files
    for path in files:
        bad = {name for name in _imports(path)
               if name.split(".")[0] in ("tensorflow", "keras")
               or name.startswith(("gradwatch._capture", "gradwatch.monitor", "gradwatch.watch",
                                   "gradwatch.clip", "gradwatch._pipeline"))}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
