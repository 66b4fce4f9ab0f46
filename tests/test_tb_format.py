"""The ``gradwatch`` window summary: the one encoder and the one decoder (``tb_format.WindowPayload``),
its part-by-part fast path against a whole parse, and what it refuses."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch._io import tb_format
from gradwatch._io.schema import ALERT_COLUMNS, STATS_COLUMNS, WINDOW_COLUMNS

pytestmark = pytest.mark.fast

# Names that spell the payload's keys, quotes, escapes and non-ASCII: the fast path must not be fooled.
TRICKY = ['"layers":{"columns":["layer"]', '"v":2', 'a\\"alerts\\":', "ünï/çødé", '"first_step":9', "plain"]


def _stats_row(step, layer, variable, l2):
    row = {c: 0.5 for c in STATS_COLUMNS}
    row.update(step=step, steps=2, layer=layer, variable=variable, l2=l2, nonfinite=0, grad_steps=2)
    return row


def _payload(step=4, names=TRICKY):
    window = {c: 1.25 for c in WINDOW_COLUMNS}
    window.update(step=step, steps=2, loss=math.inf, first_nonfinite_step=None)
    stats = [_stats_row(step, n, f"{n}/kernel", float(i)) for i, n in enumerate(names)]
    layers = [_stats_row(step, n, "*", math.nan if i == 1 else 10.0 ** -i) for i, n in enumerate(names)]
    alerts = [{"step": step, "layer": names[0], "variable": "*", "kind": "dead_relu", "severity": "warning",
               "value": math.nan, "threshold": 0.5, "message": '"stats":[]', "hint": "nan"}]
    return tb_format.encode_window(window, stats, layers, alerts, step - 1), (window, stats, layers, alerts)


def _same(got, want):
    return got == want or (isinstance(want, float) and math.isnan(want) and math.isnan(got))


def test_the_payload_keys_are_in_the_documented_order():
    payload, _ = _payload()
    assert tuple(json.loads(payload)) == tb_format.PAYLOAD_KEYS
    assert payload.startswith(b'{"v":1,"window":{"step":4,"steps":2,')  # compact JSON


def test_decode_window_inverts_encode_window():
    payload, (window, stats, layers, alerts) = _payload()
    decoded = tb_format.decode_window(payload)
    assert decoded["first_step"] == 3
    assert all(_same(decoded["window"][c], v) for c, v in window.items())
    for name, rows in (("stats", stats), ("layers", layers), ("alerts", alerts)):
        assert len(decoded[name]) == len(rows)
        for got, want in zip(decoded[name], rows):
            assert all(_same(got[c], want.get(c)) for c in tb_format.TABLE_COLUMNS[name]), name
    assert decoded["alerts"][0]["hint"] == "nan"  # a text column is never turned into a float


@pytest.mark.parametrize("relayout", [
    lambda p: json.dumps(json.loads(p)).encode(),  # spaces after ':' and ','
    lambda p: json.dumps(dict(reversed(list(json.loads(p).items())))).encode(),  # other key order
    lambda p: json.dumps(json.loads(p), indent=1).encode(),
])
def test_a_payload_laid_out_otherwise_is_parsed_whole_with_the_same_result(relayout):
    payload, _ = _payload()
    other = relayout(payload)
    fast, whole = tb_format.WindowPayload(payload), tb_format.WindowPayload(other)
    assert fast._spans is not None and whole._spans is None
    assert fast.window == whole.window and fast.first_step == whole.first_step
    for name in tb_format.TABLE_COLUMNS:
        assert json.dumps(fast.table(name)) == json.dumps(whole.table(name))
    assert whole.table_rows_text("layers", STATS_COLUMNS) is None  # the bulk text needs the layout
    assert json.dumps(tb_format.decode_window(other)) == json.dumps(tb_format.decode_window(payload))


def test_table_picks_columns_by_name_and_fills_missing_ones():
    payload, (_, _, layers, _) = _payload()
    columns, rows = tb_format.WindowPayload(payload).table("layers", ("l2", "layer", "not_yet_a_column"))
    assert columns == ["l2", "layer", "not_yet_a_column"]
    assert [r[1] for r in rows] == TRICKY and all(r[2] is None for r in rows)
    assert rows[0][0] == 1.0 and rows[1][0] == "nan"  # values as the JSON holds them


def test_table_rows_text_is_the_rows_json_or_none():
    plain, _ = _payload(names=["a", "b"])
    decoded = tb_format.WindowPayload(plain)
    text = decoded.table_rows_text("stats", STATS_COLUMNS)
    assert json.loads(b"[[" + text + b"]]") == decoded.table("stats")[1]
    assert decoded.table_rows_text("stats", STATS_COLUMNS[:-1]) is None  # other columns
    assert tb_format.WindowPayload(_payload()[0]).table_rows_text("stats", STATS_COLUMNS) is None  # escapes
    empty = tb_format.encode_window({"step": 1}, [], [], [], 1)
    assert tb_format.WindowPayload(empty).table_rows_text("layers", STATS_COLUMNS) == b""
    assert tb_format.WindowPayload(empty).table("alerts") == (list(ALERT_COLUMNS), [])


@pytest.mark.parametrize("data, message", [
    (b'{"v":1,"window":{"step":2', "Expecting|Unterminated|delimiter"),  # torn
    (b"[]", "a JSON list"),
    (b"\xff\xfe not utf-8", None),
    (b'{"window":{"step":2}}', "no 'v' entry"),
])
def test_unreadable_payloads_raise_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        tb_format.decode_window(data)


def test_a_payload_of_a_newer_format_says_upgrade():
    payload, _ = _payload()
    newer = payload.replace(b'"v":1', b'"v":2', 1)
    with pytest.raises(ValueError, match="v=2; it was written by a newer gradwatch: upgrade"):
        tb_format.WindowPayload(newer)
    with pytest.raises(ValueError, match="format 1: v='1'$"):
        tb_format.WindowPayload(payload.replace(b'"v":1', b'"v":"1"', 1))
