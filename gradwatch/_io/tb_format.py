"""The structured ``gradwatch`` TensorBoard summary: one per window, same rows as the CSV files.

This module imports no TensorFlow (only the standard library and the schema),
so the TensorBoard plugin, the readers and the report can all decode it.  It
holds the format's one encoder (:func:`encode_window`) and its one decoder
(:class:`WindowPayload`, and :func:`decode_window` built on it).

Each window is one summary value with tag :data:`WINDOW_TAG`, plugin name
:data:`PLUGIN_NAME`, data class ``DATA_CLASS_TENSOR``, at ``step`` = the
window's last step.  Its tensor is a scalar ``DT_STRING`` holding UTF-8 JSON,
compact (no spaces), its top-level keys in this order (:data:`PAYLOAD_KEYS`)::

    {"v": 1,
     "window": {<WINDOW_COLUMNS>: value, ...},
     "stats":  {"columns": [<STATS_COLUMNS>], "rows": [[...], ...]},
     "layers": {"columns": [<STATS_COLUMNS>], "rows": [[...], ...]},
     "alerts": {"columns": [<ALERT_COLUMNS>], "rows": [[...], ...]},
     "first_step": int}

Non-finite floats are encoded as strings ("nan", "inf", "-inf") because JSON
has no spelling for them; :func:`decode_window` turns them back into floats.
The run's ``run.json`` content is written once, at step 0, under
:data:`RUN_TAG` with the same plugin name (a JSON object, with its
``schema_version``: see :mod:`gradwatch._io.schema`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gradwatch._io.schema import ALERT_COLUMNS, STATS_COLUMNS, TEXT_COLUMNS, WINDOW_COLUMNS

PLUGIN_NAME = "gradwatch"
WINDOW_TAG = "gradwatch/window"
RUN_TAG = "gradwatch/run"
FORMAT_VERSION = 1

#: The payload's top-level keys, in the order :func:`encode_window` writes them.
PAYLOAD_KEYS: tuple[str, ...] = ("v", "window", "stats", "layers", "alerts", "first_step")
#: The row tables of a payload and their columns.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "stats": STATS_COLUMNS, "layers": STATS_COLUMNS, "alerts": ALERT_COLUMNS,
}


def _plain(value: Any) -> Any:
    kind = type(value)
    if (kind is float and math.isfinite(value)) or kind is int or kind is str or value is None:
        return value  # most cells, with no further check
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


def decode_number(value: Any) -> float:
    """A numeric cell as a float: "nan", "inf", "-inf" as those floats; missing or other text as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _SPECIAL.get(value, math.nan)
    return float(value)


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
    tables = {"stats": stats_rows, "layers": layer_rows, "alerts": alert_rows}
    payload = {
        "v": FORMAT_VERSION,
        "window": {c: _plain(window_row.get(c)) for c in WINDOW_COLUMNS},
        **{name: _table(tables[name], TABLE_COLUMNS[name]) for name in TABLE_COLUMNS},
        "first_step": int(first_step),
    }
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


# The keys up to the big "stats" table are searched from the payload's start, the later ones from its end.
_FROM_START = PAYLOAD_KEYS[: PAYLOAD_KEYS.index("stats") + 1]
_NEEDLES = {key: f'"{key}":'.encode() for key in PAYLOAD_KEYS}


class WindowPayload:
    """One window summary, decoded part by part: the format's one decoder.

    A large model's ``stats`` table holds thousands of rows; a reader of the layers
    (the TensorBoard tab) or of the window row should not parse it.  So each
    top-level value is located by its key and parsed on its own.  This relies on the
    layout :func:`encode_window` writes: compact JSON, keys in :data:`PAYLOAD_KEYS`
    order, and ``"<key>":`` occurring once: only the top-level object and the window
    row have keys, no window column is a top-level key, and inside a string every
    quote is escaped.  A payload laid out otherwise (but still a gradwatch window
    summary) is parsed whole instead.

    Values are as the JSON holds them: non-finite floats are the strings "nan",
    "inf", "-inf" (:func:`decode_number`, :func:`decode_window` convert them).

    Raises:
        ValueError: the payload is not a window summary of :data:`FORMAT_VERSION` (a torn
            or foreign payload, or one written by a newer gradwatch).
    """

    def __init__(self, data: bytes | str):
        self._data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._whole: dict[str, Any] | None = None
        self._spans = self._locate()
        if self._spans is None:
            try:
                whole = json.loads(self._data)
            except RecursionError as error:
                raise ValueError(f"not a gradwatch window summary ({error})") from error
            if not isinstance(whole, dict):
                raise ValueError(f"not a gradwatch window summary: a JSON {type(whole).__name__}")
            self._whole = whole
        version = self._part("v")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
            raise ValueError(
                f"not a gradwatch window summary of format {FORMAT_VERSION}: v={version!r}"
                + ("; it was written by a newer gradwatch: upgrade gradwatch to read it" if newer else "")
            )

    def _locate(self) -> dict[str, tuple[int, int]] | None:
        """Each top-level key's value as ``(start, end)`` byte offsets; None if not laid out as encoded."""
        data = self._data
        if not (data.startswith(b"{") and data.endswith(b"}")):
            return None
        starts = []
        for key in PAYLOAD_KEYS:
            needle = _NEEDLES[key]
            at = data.find(needle) if key in _FROM_START else data.rfind(needle)
            if at < 1 or data[at - 1] not in b"{," or (starts and at <= starts[-1]):
                return None
            starts.append(at + len(needle))
        ends = [starts[k + 1] - len(_NEEDLES[PAYLOAD_KEYS[k + 1]]) - 1 for k in range(len(starts) - 1)]
        ends.append(len(data) - 1)
        return {key: (start, end) for key, start, end in zip(PAYLOAD_KEYS, starts, ends)}

    def _part(self, key: str) -> Any:
        if self._whole is not None:
            if key not in self._whole:
                raise ValueError(f"the window summary has no {key!r} entry")
            return self._whole[key]
        start, end = self._spans[key]
        return json.loads(self._data[start:end])

    @property
    def window(self) -> dict[str, Any]:
        """The window row: ``{column: value}``."""
        window = self._part("window")
        if not isinstance(window, dict):
            raise ValueError(f"the window row is a JSON {type(window).__name__}, not an object")
        return window

    @property
    def first_step(self) -> int:
        return int(self._part("first_step"))

    def table(self, name: str, columns: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
        """Table ``name`` ("stats", "layers" or "alerts") as ``(columns, rows)``.

        With ``columns``, each row holds those columns in that order (None where the
        payload has no such column: one written before the column was added).
        """
        table = self._part(name)
        if not isinstance(table, dict):
            raise ValueError(f"the {name!r} table is a JSON {type(table).__name__}, not an object")
        have, rows = list(table["columns"]), table["rows"]
        if columns is None or list(columns) == have:
            return have, rows
        index = {c: i for i, c in enumerate(have)}
        picks = [index.get(c) for c in columns]
        return list(columns), [[row[i] if i is not None else None for i in picks] for row in rows]

    def table_rows_text(self, name: str, columns: Sequence[str]) -> bytes | None:
        """The JSON text of table ``name``'s rows, unparsed, for a bulk parser: the rows
        ``[a,b],[c,d]`` as ``a,b],[c,d`` (``b""`` when there are none).

        None when the table's columns are not ``columns`` or its text holds a JSON
        escape (then :meth:`table` must parse it).
        """
        if self._spans is None:
            return None
        start, end = self._spans[name]
        head = b'{"columns":' + json.dumps(list(columns), separators=(",", ":")).encode() + b',"rows":'
        if not self._data.startswith(head, start) or self._data[end - 1 : end] != b"}":
            return None
        rows = self._data[start + len(head) : end - 1]
        if b"\\" in rows:
            return None
        if rows == b"[]":
            return b""
        if not (rows.startswith(b"[[") and rows.endswith(b"]]")):
            return None
        return rows[2:-2]


def _rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    text = [c in TEXT_COLUMNS for c in columns]
    return [{c: _unplain(v, t) for c, v, t in zip(columns, row, text)} for row in rows]


def decode_window(data: bytes | str) -> dict[str, Any]:
    """Inverse of :func:`encode_window`: ``{"window": row, "stats": [rows], "layers": [rows],
    "alerts": [rows], "first_step": int}``, non-finite floats as floats.  Raises ``ValueError``
    on a payload it cannot read."""
    payload = WindowPayload(data)
    try:
        return {
            "window": {c: _unplain(v) for c, v in payload.window.items()},
            **{name: _rows(*payload.table(name)) for name in TABLE_COLUMNS},
            "first_step": payload.first_step,
        }
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a readable gradwatch window summary ({error!r})") from error


def encode_run(run_info: Mapping[str, Any]) -> bytes:
    return json.dumps(run_info, default=str, allow_nan=True).encode("utf-8")


def decode_run(data: bytes | str) -> dict[str, Any]:
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    return json.loads(data)
