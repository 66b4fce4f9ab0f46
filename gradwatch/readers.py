"""Read a run back into pandas (no TensorFlow needed).

Readers tolerate a torn last line (a process killed mid-write) and keep the
later row when a resumed run wrote the same step twice.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pandas as pd

from gradwatch.schema import (
    ALERT_COLUMNS,
    ALERTS_FILE,
    LAYERS_FILE,
    RUN_FILE,
    STATS_COLUMNS,
    STATS_FILE,
    WINDOW_COLUMNS,
    WINDOWS_FILE,
)


class GradwatchDataError(ValueError):
    """A log directory holds no gradwatch data, or data that cannot be read."""


def _complete_lines(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    return data


def _read_csv(path: str, columns: tuple[str, ...], keys: list[str]) -> pd.DataFrame:
    data = _complete_lines(path)
    if not data.strip():
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    text = data.decode("utf-8", errors="replace")
    try:
        frame = pd.read_csv(io.StringIO(text), keep_default_na=True)
    except (pd.errors.ParserError, ValueError) as error:
        raise GradwatchDataError(f"{path} is not a readable CSV file: {error}") from error
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise GradwatchDataError(
            f"{path} is not a gradwatch file: columns {missing} are missing "
            f"(found {list(frame.columns)[:12]})."
        )
    if keys and len(frame):
        frame = frame.drop_duplicates(subset=keys, keep="last")
        frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    return frame


def _require_dir(log_dir: str | os.PathLike[str]) -> str:
    log_dir = os.fspath(log_dir)
    if not os.path.isdir(log_dir):
        raise GradwatchDataError(f"{log_dir!r} is not a directory.")
    return log_dir


LEVELS = ("variable", "layer")


def read_stats(log_dir: str | os.PathLike[str], level: str = "variable") -> pd.DataFrame:
    """Per-window gradient statistics of a run, one row per (window, variable) or layer.

    Args:
        log_dir: the ``log_dir`` given to ``GradientMonitor`` or ``Watch``.
        level: ``"variable"`` (``stats.csv``) or ``"layer"`` (``layers.csv``:
            the same columns, aggregated in-graph over each layer's variables,
            with ``variable == "*"``).

    Returns:
        A DataFrame with the ``stats.csv`` columns, sorted by step and model order.

    Raises:
        GradwatchDataError: the file is missing from ``log_dir`` or is not gradwatch's.
        ValueError: an unknown ``level``.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}; received {level!r}.")
    log_dir = _require_dir(log_dir)
    name = STATS_FILE if level == "variable" else LAYERS_FILE
    path = os.path.join(log_dir, name)
    if not os.path.exists(path):
        raise GradwatchDataError(f"No gradwatch statistics in {log_dir!r}: {name} is missing.")
    key = "variable" if level == "variable" else "layer"
    frame = _read_csv(path, STATS_COLUMNS, keys=["step", key])
    order = {name: i for i, name in enumerate(_model_order(log_dir, level))}
    if order and len(frame):
        frame = frame.assign(_order=frame[key].map(order).fillna(len(order)))
        frame = frame.sort_values(["step", "_order"], kind="stable").drop(columns="_order")
        frame = frame.reset_index(drop=True)
    return frame


def read_windows(log_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-window globals of a run (``windows.csv``) as a DataFrame."""
    log_dir = _require_dir(log_dir)
    path = os.path.join(log_dir, WINDOWS_FILE)
    if not os.path.exists(path):
        raise GradwatchDataError(f"No gradwatch windows in {log_dir!r}: {WINDOWS_FILE} is missing.")
    return _read_csv(path, WINDOW_COLUMNS, keys=["step"])


def read_alerts(log_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The alerts of a run, one row per alert, in the ``alerts.csv`` column order."""
    log_dir = _require_dir(log_dir)
    path = os.path.join(log_dir, ALERTS_FILE)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(log_dir, STATS_FILE)):
            return pd.DataFrame({c: pd.Series(dtype="object") for c in ALERT_COLUMNS})
        raise GradwatchDataError(f"No gradwatch alerts in {log_dir!r}: {ALERTS_FILE} is missing.")
    frame = _read_csv(path, ALERT_COLUMNS, keys=[])
    text_columns = ["layer", "variable", "kind", "severity", "message", "hint"]
    frame[text_columns] = frame[text_columns].fillna("").astype(str)
    return frame[list(ALERT_COLUMNS)]


def read_run(log_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``run.json`` metadata."""
    path = os.path.join(_require_dir(log_dir), RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise GradwatchDataError(f"No {RUN_FILE} in {os.fspath(log_dir)!r}.") from error
    except ValueError as error:
        raise GradwatchDataError(f"{path} is not valid JSON: {error}") from error


def _model_order(log_dir: str, level: str) -> list[str]:
    try:
        run = read_run(log_dir)
    except GradwatchDataError:
        return []
    entries = run.get("variables" if level == "variable" else "layers", [])
    return [entry["name"] for entry in entries]
