"""The structured ``gradwatch`` TensorBoard summary: one per window, same rows as the CSV files.

This module imports no TensorFlow (only the standard library and the schema),
so the TensorBoard plugin, the readers and the report can all decode it.

Each window is one summary value with tag :data:`WINDOW_TAG`, plugin name
:data:`PLUGIN_NAME`, data class ``DATA_CLASS_TENSOR``, at ``step`` = the
window's last step.  Its tensor is a scalar ``DT_STRING`` holding UTF-8 JSON::

    {"v": 1,
     "window": {<WINDOW_COLUMNS>: value, ...},
     "stats":  {"columns": [<STATS_COLUMNS>], "rows": [[...], ...]},
     "layers": {"columns": [<STATS_COLUMNS>], "rows": [[...], ...]},
     "alerts": {"columns": [<ALERT_COLUMNS>], "rows": [[...], ...]},
     "first_step": int}

Non-finite floats are encoded as strings ("nan", "inf", "-inf") because JSON
has no spelling for them; :func:`decode_window` turns them back into floats.
The run's ``run.json`` content is written once, at step 0, under
:data:`RUN_TAG` with the same plugin name (a JSON object).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gradwatch.schema import ALERT_COLUMNS, STATS_COLUMNS, WINDOW_COLUMNS

PLUGIN_NAME = "gradwatch"
WINDOW_TAG = "gradwatch/window"
RUN_TAG = "gradwatch/run"
FORMAT_VERSION = 1


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _plain(value.item())
    return value


_SPECIAL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _unplain(value: Any, text_column: bool = False) -> Any:
    if not text_column and isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    return value


def _table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    return {"columns": list(columns), "rows": [[_plain(row.get(c)) for c in columns] for row in rows]}


def encode_window(
    window_row: Mapping[str, Any],
    stats_rows: Sequence[Mapping[str, Any]],
    layer_rows: Sequence[Mapping[str, Any]],
    alert_rows: Sequence[Mapping[str, Any]],
    first_step: int,
) -> bytes:
    """The JSON payload of one window's structured summary."""
    payload = {
        "v": FORMAT_VERSION,
        "window": {c: _plain(window_row.get(c)) for c in WINDOW_COLUMNS},
        "stats": _table(stats_rows, STATS_COLUMNS),
        "layers": _table(layer_rows, STATS_COLUMNS),
        "alerts": _table(alert_rows, ALERT_COLUMNS),
        "first_step": int(first_step),
    }
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


_TEXT_COLUMNS = {"layer", "variable", "kind", "severity", "message", "hint"}


def _rows(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    columns = table["columns"]
    text = [c in _TEXT_COLUMNS for c in columns]
    return [
        {c: _unplain(v, t) for c, v, t in zip(columns, row, text)} for row in table["rows"]
    ]


def decode_window(data: bytes | str) -> dict[str, Any]:
    """Inverse of :func:`encode_window`: ``{"window": row, "stats": [rows], "layers": [rows],
    "alerts": [rows], "first_step": int}``.  Raises ``ValueError`` on a payload it cannot read."""
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    payload = json.loads(data)
    if not isinstance(payload, dict) or payload.get("v") != FORMAT_VERSION:
        raise ValueError(f"not a gradwatch window summary of format {FORMAT_VERSION}")
    return {
        "window": {c: _unplain(v) for c, v in payload["window"].items()},
        "stats": _rows(payload["stats"]),
        "layers": _rows(payload["layers"]),
        "alerts": _rows(payload["alerts"]),
        "first_step": int(payload["first_step"]),
    }


def encode_run(run_info: Mapping[str, Any]) -> bytes:
    return json.dumps(run_info, default=str, allow_nan=True).encode("utf-8")


def decode_run(data: bytes | str) -> dict[str, Any]:
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    return json.loads(data)
