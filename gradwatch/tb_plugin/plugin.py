"""The "Gradient Flow" TensorBoard tab: a layers x steps heatmap of log10 gradient norms with alerts.

TensorBoard imports every ``tensorboard_plugins`` entry point at start-up, so
this module imports no TensorFlow (only TensorBoard, numpy, werkzeug and the
TF-free ``gradwatch._io.schema`` / ``gradwatch._io.tb_format``).  It reads the
``gradwatch`` structured summaries through the data provider, which works with
both ``--load_fast=true`` (Rust data server) and ``--load_fast=false``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.context import RequestContext
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from gradwatch._interpret.alerts import divergence_since
from gradwatch._io import tb_format
from gradwatch._io.schema import (
    ALERT_COLUMNS,
    SEVERITIES,
    TEXT_COLUMNS,
    GradwatchDataError,
    check_schema_version,
    group_labels,
    segments_of_run,
)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_MAX_COLS = 1000
MAX_COLS_LIMIT = 5000
SAMPLES_ADVICE = (
    "TensorBoard keeps only a sample of each run's gradwatch summaries by default; "
    "start it with --samples_per_plugin=gradwatch=0 to keep every window."
)
#: The tab's fixed colour scale: log10 of a gradient norm, the same for every run (decades).
SCALE_LOG10 = (-8.0, 4.0)
_READ_ALL = 1 << 40  # read_tensors' "downsample": larger than any run, so nothing is dropped here
_CACHE_RUNS = 8
_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RunHeatmap:
    """One run's windows as the tab draws them: a layers x windows grid in step order, and the alerts."""

    layers: list[str]
    steps: np.ndarray  # int64 [W], each window's last step
    first_steps: np.ndarray  # int64 [W]
    log_l2: np.ndarray  # float64 [L, W]; NaN where the norm is absent, zero or non-finite
    nonfinite: np.ndarray  # bool [L, W]; the layer's gradient had NaN/Inf entries in the window
    alerts: list[dict[str, Any]] = field(default_factory=list)
    corrupt: int = 0
    divergence: dict[str, int] | None = None  # {"step", "last_step"}: NaN/Inf from step to the end
    zero: np.ndarray | None = None  # bool [L, W]; the norm was exactly zero (a dead layer)
    alerts_source: str = "windows"  # "alerts.csv", "event files" (read whole) or "windows" (sampled)
    labels: list[str] | None = None  # the rows' labels (a layer's optimizer group, where several)
    segments: list[dict[str, Any]] = field(default_factory=list)  # run.json's, schema 4 on

    def zeros(self) -> np.ndarray:
        """bool [L, W]: the layer's gradient norm was exactly zero in the window."""
        return self.zero if self.zero is not None else np.zeros(self.log_l2.shape, dtype=bool)

    def expected_windows(self) -> int:
        """About how many windows the run wrote: its last step over the median window length
        (equal to ``len(steps)`` when nothing was dropped)."""
        if len(self.steps) == 0:
            return 0
        length = max(1, int(np.median(self.steps - self.first_steps + 1)))
        return max(len(self.steps), int(round(int(self.steps[-1]) / length)))

    def missing_before(self) -> np.ndarray:
        """Steps missing before each window: window k should start right after window k-1 ends.

        Only positive counts are gaps (samples TensorBoard dropped); an overlap (a resumed
        run writing steps again) is not.
        """
        if len(self.steps) == 0:
            return np.zeros(0, dtype=np.int64)
        expected = np.concatenate([[1], self.steps[:-1] + 1])
        return np.clip(self.first_steps - expected, 0, None)

    def gaps(self) -> dict[str, int]:
        missing = self.missing_before()
        return {
            "gaps": int(np.count_nonzero(missing[1:])),
            "missing_steps": int(missing[1:].sum()),
            "leading_missing_steps": int(missing[0]) if len(missing) else 0,
        }


def downsample_columns(values: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduces ``values`` [rows, W] to at most ``max_cols`` columns by the NaN-ignoring max per bucket.

    Buckets are contiguous runs of about ``W / max_cols`` columns, so a spike in any
    window survives into its bucket.  Returns ``(reduced [rows, C], edges [C + 1])``:
    bucket ``c`` holds the original columns ``edges[c]:edges[c + 1]``.
    """
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    width = values.shape[1]
    if width <= max_cols:
        return values, np.arange(width + 1)
    edges = np.linspace(0, width, max_cols + 1).round().astype(np.int64)
    with np.errstate(invalid="ignore"):
        reduced = np.fmax.reduceat(values, edges[:-1], axis=1)
    return reduced, edges


def bucket_of(edges: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The bucket index of each original column, for ``edges`` from :func:`downsample_columns`."""
    return np.searchsorted(edges, columns, side="right") - 1


def _scalar_bytes(array: np.ndarray) -> bytes:
    """The bytes of a scalar string tensor as the data provider returns it (numpy object array)."""
    flat = np.asarray(array).reshape(-1)
    value = flat[0] if flat.size else b""
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _layer_names(run_info: Mapping[str, Any] | None) -> list[str]:
    """Layer names in input->output order from run.json's ``layers`` (Topology.to_json)."""
    names: list[str] = []
    for layer in (run_info or {}).get("layers", []) or []:
        name = layer.get("name") if isinstance(layer, Mapping) else layer
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def _float_column(rows: list[list[Any]], index: int) -> np.ndarray:
    """One numeric column as float64 (null -> NaN; "nan"/"inf"/"-inf" strings parsed by numpy)."""
    return np.array([row[index] for row in rows], dtype=np.float64)


Cells = tuple[list[str], np.ndarray, np.ndarray]  # layer names, l2, nonfinite count


_CELL_COLUMNS = ("layer", "l2", "nonfinite")


def _parse_window(payload: bytes) -> tuple[dict[str, Any], int, Cells, list[dict]]:
    """The parts of one window summary the tab needs: (window row, first_step, layer cells, alerts).

    Decoded by :class:`gradwatch._io.tb_format.WindowPayload`, which leaves the per-variable
    ``stats`` table unparsed.  Raises ``ValueError``/``KeyError``/``TypeError`` on a
    payload it cannot read.
    """
    decoded = tb_format.WindowPayload(payload)
    _, rows = decoded.table("layers", _CELL_COLUMNS)
    if any(row[0] is None for row in rows):
        raise ValueError("the layers table has no 'layer' column")
    cells = ([str(row[0]) for row in rows], _float_column(rows, 1), _float_column(rows, 2))
    columns, rows = decoded.table("alerts")
    alerts = [
        {
            c: v if c in TEXT_COLUMNS else int(v) if c == "step" else tb_format.decode_number(v)
            for c, v in zip(columns, row)
        }
        for row in rows
    ]
    return decoded.window, decoded.first_step, cells, alerts


# step, first_step, cells, alerts, the window row's non-finite columns
Parsed = tuple[int, int, Cells, list[dict[str, Any]], dict[str, Any]]
_NONFINITE_COLUMNS = ("step", "steps", "nonfinite_steps", "first_nonfinite_step")


def _parse(summary_step: int, payload: bytes) -> Parsed | None:
    """One window summary parsed, or None when it cannot be read."""
    try:
        window, first_step, cells, alerts = _parse_window(payload)
        step = int(window.get("step") if window.get("step") is not None else summary_step)
        nonfinite = {c: window.get(c) for c in _NONFINITE_COLUMNS} | {"step": step}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return step, first_step, cells, alerts, nonfinite


def _divergence(rows: list[dict[str, Any]]) -> dict[str, int] | None:
    """``{"step", "last_step"}`` when the windows (in step order) end diverged (see
    ``alerts.divergence_since``), else None."""
    since = None
    for row in rows:
        since = divergence_since(since, row)
    if since is None or not rows or since >= rows[-1]["step"]:
        return None
    return {"step": since, "last_step": int(rows[-1]["step"])}


def _recoveries_kept(alerts: list[dict[str, Any]], rows: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The alerts in step order, less the info rows dated in a non-finite window (files before
    schema 3 cleared alerts on NaN norms read as 0: no recovery)."""
    unclean = {step for step, row in rows.items() if (row.get("nonfinite_steps") or 0) > 0}
    kept = [a for a in alerts if not (a.get("severity") == "info" and a.get("step") in unclean)]
    return sorted(kept, key=lambda a: a.get("step", 0))


def build_run(
    run_info: Mapping[str, Any] | None,
    payloads: Sequence[tuple[int, bytes]],
    parsed: dict[tuple[int, int], Parsed | None] | None = None,
) -> RunHeatmap:
    """Decodes a run's window payloads ``[(summary step, bytes)]``; unreadable ones are skipped, counted.

    ``parsed`` maps ``(summary step, hash of payload)`` to an earlier parse: while a run
    grows, only its new windows are parsed.  It is updated in place to hold exactly
    this run's windows.

    Raises:
        SchemaVersionError: ``run_info`` says the run was written by a newer gradwatch.
    """
    check_schema_version(run_info, f"its '{tb_format.RUN_TAG}' summary")
    layers = _layer_names(run_info)
    index = {name: i for i, name in enumerate(layers)}
    windows: dict[int, tuple[int, Cells]] = {}
    nonfinite_rows: dict[int, dict[str, Any]] = {}
    alerts: list[dict[str, Any]] = []
    corrupt = 0
    previous = parsed.copy() if parsed is not None else {}
    if parsed is not None:
        parsed.clear()
    for summary_step, payload in payloads:
        key = (summary_step, hash(payload))
        entry = previous[key] if key in previous else _parse(summary_step, payload)
        if parsed is not None:
            parsed[key] = entry
        if entry is None:
            corrupt += 1
            continue
        step, first_step, cells, window_alerts, nonfinite_row = entry
        alerts.extend(window_alerts)
        if not cells[0] and step in windows:
            continue  # alerts of no window (the run's last word): the window it follows stays
        windows[step] = (first_step, cells)
        nonfinite_rows[step] = nonfinite_row
        for name in cells[0]:
            if name not in index:
                index[name] = len(layers)
                layers.append(name)
    steps = np.array(sorted(windows), dtype=np.int64)
    log_l2 = np.full((len(layers), len(steps)), np.nan)
    nonfinite, zero = (np.zeros((len(layers), len(steps)), dtype=bool) for _ in range(2))
    first_steps = np.zeros(len(steps), dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for col, step in enumerate(steps.tolist()):
            first_steps[col], (names, l2, nf) = windows[step]
            rows = np.array([index[name] for name in names], dtype=np.int64)
            usable = (l2 > 0) & np.isfinite(l2)
            log_l2[rows[usable], col] = np.log10(l2[usable])
            nonfinite[rows, col] = nf > 0
            zero[rows, col] = l2 == 0
    alerts = [{**alert, "layer_index": index.get(alert["layer"], -1)
               if isinstance(alert.get("layer"), str) else -1} for alert in alerts]
    alerts = _recoveries_kept(alerts, nonfinite_rows)
    divergence = _divergence([nonfinite_rows[step] for step in steps.tolist()])
    return RunHeatmap(layers, steps, first_steps, log_l2, nonfinite, alerts, corrupt, divergence, zero,
                      labels=group_labels(layers, run_info), segments=_segments(run_info))


def _segments(run_info: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The run's segments as the tab marks them: number, first step, why it began."""
    return [{"segment": s.get("segment"), "first_step": s.get("first_step"), "reason": s.get("reason")}
            for s in segments_of_run(run_info)]


def with_alerts(data: RunHeatmap, rows: list[dict[str, Any]], source: str) -> RunHeatmap:
    """``data`` with its alerts replaced by ``rows`` (every alert of the run, read whole from
    ``source``), each given its layer's row index (-1: none)."""
    index = {name: i for i, name in enumerate(data.layers)}
    alerts = sorted(
        ({**row, "layer_index": index.get(row.get("layer"), -1)} for row in rows),
        key=lambda a: a.get("step", 0),
    )
    return RunHeatmap(data.layers, data.steps, data.first_steps, data.log_l2, data.nonfinite, alerts,
                      data.corrupt, data.divergence, data.zero, source, data.labels, data.segments)


def read_run_alerts(run_dir: str) -> tuple[list[dict[str, Any]], str] | None:
    """Every alert of the run in ``run_dir`` from its ``alerts.csv`` (else from its event files,
    read whole by gradwatch's reader, not sampled by TensorBoard), with the source's name;
    None when the directory holds neither (a remote log dir, another writer)."""
    from gradwatch._io import readers

    try:
        csv_present = os.path.exists(os.path.join(run_dir, "alerts.csv"))
        if not csv_present and not readers.event_files(run_dir):
            return None
        frame = readers.read_alerts(run_dir, source="csv" if csv_present else "events")
    except (OSError, GradwatchDataError, ValueError):
        return None
    rows = []
    for record in frame.to_dict("records"):
        row = {c: record.get(c) for c in ALERT_COLUMNS}
        try:
            row["step"] = int(row["step"])
        except (TypeError, ValueError):
            continue
        for c in ("value", "threshold"):
            row[c] = _finite_or_none(float(row[c])) if row.get(c) is not None else None
        rows.append(row)
    return rows, "alerts.csv" if csv_present else "event files"


def _files_signature(run_dir: str) -> tuple[Any, ...]:
    """What changes when a run's alerts may have: its alerts.csv's and event files' sizes and times."""
    try:
        names = sorted(n for n in os.listdir(run_dir) if n == "alerts.csv" or ".tfevents." in n)
        return tuple((n, *os.stat(os.path.join(run_dir, n))[6:9]) for n in names)
    except OSError:
        return ()


def step_range(data: RunHeatmap, start: int | None, end: int | None) -> np.ndarray:
    """The window columns of ``data`` that hold a step of ``[start, end]`` (None: open)."""
    keep = np.ones(len(data.steps), dtype=bool)
    if start is not None:
        keep &= data.steps >= start
    if end is not None:
        keep &= data.first_steps <= end
    return np.flatnonzero(keep)


def _markers(data: RunHeatmap, cols: np.ndarray, edges: np.ndarray) -> list[list[Any]]:
    """[layer index, column, severity rank, count, kinds] per outlined cell; ``cols`` are the
    window columns shown (in step order), ``edges`` their buckets."""
    markers: dict[tuple[int, int], list[Any]] = {}
    if not len(cols):
        return []
    steps = data.steps[cols]
    lo, hi = int(data.first_steps[cols[0]]), int(steps[-1])
    for alert in data.alerts:
        step = alert.get("step", 0)
        if not lo <= step <= hi:
            continue
        window = min(int(np.searchsorted(steps, step, side="left")), len(steps) - 1)
        key = (alert["layer_index"], int(bucket_of(edges, np.array([window]))[0]))
        rank = _SEVERITY_RANK.get(alert.get("severity"), 0)
        marker = markers.setdefault(key, [key[0], key[1], rank, 0, []])
        marker[2] = max(marker[2], rank)
        marker[3] += 1
        if alert.get("kind") not in marker[4]:
            marker[4].append(alert.get("kind"))
    return sorted(markers.values())


def flow_json(run: str, data: RunHeatmap, max_cols: int, start: int | None = None,
              end: int | None = None) -> dict[str, Any]:
    """The ``/flow`` response: a compact, at most ``max_cols`` wide heatmap of ``data``'s windows
    that hold a step of ``[start, end]`` (all by default)."""
    cols_kept = step_range(data, start, end)
    missing = data.missing_before()[cols_kept]
    reduced, edges = downsample_columns(data.log_l2[:, cols_kept], max_cols)
    width = len(cols_kept)
    cols = len(edges) - 1
    nonfinite = data.nonfinite[:, cols_kept]
    zero = data.zeros()[:, cols_kept]
    if width > cols:
        nonfinite = np.logical_or.reduceat(nonfinite, edges[:-1], axis=1)
        zero = np.logical_or.reduceat(zero, edges[:-1], axis=1)
    zero &= np.isnan(reduced)  # a bucket with any non-zero norm shows it
    holes = np.flatnonzero(missing[1:]) + 1  # windows that follow dropped ones
    gap_columns = sorted(set(bucket_of(edges, holes).tolist()))
    boundaries = []  # the column where each segment after the first begins
    shown = data.steps[cols_kept]
    for segment in data.segments[1:] if width else []:
        first = int(segment.get("first_step") or 0)
        window = int(np.searchsorted(shown, first, side="left"))
        if window < width and (start is None or first >= start):
            boundaries.append({"column": int(bucket_of(edges, np.array([window]))[0]),
                               "segment": segment.get("segment"), "first_step": segment.get("first_step"),
                               "reason": segment.get("reason")})
    rounded = np.round(reduced, 3)
    values = [[None if x != x else x for x in row] for row in rounded.tolist()]
    finite = reduced[np.isfinite(reduced)]
    steps, first_steps = data.steps[cols_kept], data.first_steps[cols_kept]
    return {
        "run": run,
        "layers": data.labels or data.layers,
        "steps": steps[edges[1:] - 1].tolist() if cols else [],
        "first_steps": first_steps[edges[:-1]].tolist() if cols else [],
        "windows": width,
        "all_windows": len(data.steps),
        "range": ({"first": int(data.first_steps[0]), "last": int(data.steps[-1])} if len(data.steps)
                  else None),
        "zoom": {"start": start, "end": end} if start is not None or end is not None else None,
        "values": values,
        "vmin": float(finite.min()) if finite.size else None,
        "vmax": float(finite.max()) if finite.size else None,
        "scale": {"min": SCALE_LOG10[0], "max": SCALE_LOG10[1]},
        "nonfinite": np.argwhere(nonfinite).tolist(),
        "zeros": np.argwhere(zero).tolist(),
        "gap_columns": gap_columns,
        "segments": boundaries,
        "markers": _markers(data, cols_kept, edges),
        "severities": list(SEVERITIES),
        "alerts": len(data.alerts),
        "alerts_source": data.alerts_source,
        "downsampled": (
            {"windows": width, "columns": cols, "per_column": width / cols} if width > cols else None
        ),
        "dropped": {**data.gaps(), "corrupt": data.corrupt, "advice": SAMPLES_ADVICE,
                    "kept_windows": len(data.steps), "expected_windows": data.expected_windows()},
        "divergence": data.divergence,
    }


class GradientFlowPlugin(base_plugin.TBPlugin):
    """TensorBoard tab "Gradient Flow" for gradwatch runs."""

    plugin_name = tb_format.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider = context.data_provider
        self._logdir = context.logdir or ""
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[tuple[Any, ...], RunHeatmap]] = OrderedDict()
        self._parsed: dict[str, dict[tuple[int, int], Parsed | None]] = {}

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Gradient Flow")

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        return {
            "/index.js": self._serve_index,
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/flow": self._serve_flow,
            "/alerts": self._serve_alerts,
        }

    def is_active(self) -> bool:
        if self._provider is None:
            return False
        return bool(self._list(RequestContext(), ""))

    # -- data ---------------------------------------------------------------------------------------

    def _list(self, ctx: RequestContext, experiment_id: str) -> dict[str, dict[str, Any]]:
        """``{run: {tag: TensorTimeSeries}}`` for the runs that hold gradwatch summaries."""
        listing = self._provider.list_tensors(ctx, experiment_id=experiment_id, plugin_name=self.plugin_name)
        return {
            run: tags
            for run, tags in listing.items()
            if tb_format.WINDOW_TAG in tags or tb_format.RUN_TAG in tags
        }

    def _run_data(self, ctx: RequestContext, experiment_id: str, run: str) -> RunHeatmap | None:
        tags = self._list(ctx, experiment_id).get(run)
        if tags is None:
            return None
        run_dir = self._run_dir(run)
        key = tuple(
            (tag, tags[tag].max_step, tags[tag].max_wall_time) for tag in sorted(tags)
        ) + (_files_signature(run_dir) if run_dir else ())
        with self._lock:
            cached = self._cache.get(run)
            if cached is not None and cached[0] == key:
                self._cache.move_to_end(run)
                return cached[1]
        read = self._provider.read_tensors(
            ctx,
            experiment_id=experiment_id,
            plugin_name=self.plugin_name,
            downsample=_READ_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tb_format.WINDOW_TAG, tb_format.RUN_TAG]),
        ).get(run, {})
        run_info: dict[str, Any] | None = None
        for datum in read.get(tb_format.RUN_TAG, [])[-1:]:
            try:
                run_info = tb_format.decode_run(_scalar_bytes(datum.numpy))
            except (ValueError, UnicodeDecodeError):
                run_info = None
        payloads = [(d.step, _scalar_bytes(d.numpy)) for d in read.get(tb_format.WINDOW_TAG, [])]
        with self._lock:
            parsed = dict(self._parsed.get(run, {}))
        data = build_run(run_info if isinstance(run_info, dict) else None, payloads, parsed)
        whole = read_run_alerts(run_dir) if run_dir else None
        if whole is not None:  # every alert, whatever TensorBoard kept of the windows
            data = with_alerts(data, *whole)
        with self._lock:
            self._cache[run] = (key, data)
            self._parsed[run] = parsed
            self._cache.move_to_end(run)
            while len(self._cache) > _CACHE_RUNS:
                self._parsed.pop(self._cache.popitem(last=False)[0], None)
        return data

    def _run_dir(self, run: str) -> str | None:
        """The local directory of ``run`` under the log dir, or None (a remote or unknown one)."""
        if not self._logdir or "://" in self._logdir:
            return None
        path = os.path.normpath(os.path.join(self._logdir, run))
        root = os.path.normpath(self._logdir)
        if os.path.commonpath([root, path]) != root or not os.path.isdir(path):
            return None
        return path

    # -- routes -------------------------------------------------------------------------------------

    @staticmethod
    def _json(request: wrappers.Request, body: Any, code: int = 200) -> wrappers.Response:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
        return http_util.Respond(request, text, "application/json", code=code)

    @staticmethod
    def _file(request: wrappers.Request, name: str) -> wrappers.Response:
        content_type = _CONTENT_TYPES[os.path.splitext(name)[1]]
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            return http_util.Respond(request, f.read(), content_type)

    @wrappers.Request.application
    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        return self._file(request, "index.js")

    @wrappers.Request.application
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        # Only plain names of files that exist in static/ with a known type are served: anything
        # with a separator, "..", a drive or an encoded slash (decoded into PATH_INFO) is refused.
        prefix = f"/data/plugin/{self.plugin_name}/static/"
        name = request.path[len(prefix):] if request.path.startswith(prefix) else ""
        bad = not name or name.startswith(".") or any(c in name for c in "/\\:\0%")
        if bad:
            return http_util.Respond(request, f"Bad static file name: {name!r}", "text/plain", code=400)
        allowed = {
            f for f in os.listdir(STATIC_DIR)
            if os.path.isfile(os.path.join(STATIC_DIR, f)) and os.path.splitext(f)[1] in _CONTENT_TYPES
        }
        if name not in allowed:
            return http_util.Respond(request, f"No static file {name!r}", "text/plain", code=404)
        return self._file(request, name)

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        listing = self._list(ctx, eid)
        runs = [
            {
                "run": run,
                "last_step": tags[tb_format.WINDOW_TAG].max_step if tb_format.WINDOW_TAG in tags else None,
            }
            for run, tags in sorted(listing.items())
        ]
        return self._json(request, {"runs": runs, "advice": SAMPLES_ADVICE})

    def _request_run(
        self, request: wrappers.Request
    ) -> tuple[RunHeatmap | None, str, wrappers.Response | None]:
        run = request.args.get("run")
        if run is None:
            return None, "", self._json(request, {"error": "missing query parameter 'run'"}, 400)
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        try:
            data = self._run_data(ctx, eid, run)
        except GradwatchDataError as error:  # a run written by a newer gradwatch
            return None, run, self._json(request, {"error": f"run {run!r}: {error}"}, 422)
        if data is None:
            error = f"run {run!r} has no gradwatch data; /runs lists the runs that have some"
            return None, run, self._json(request, {"error": error}, 404)
        return data, run, None

    @wrappers.Request.application
    def _serve_flow(self, request: wrappers.Request) -> wrappers.Response:
        raw = request.args.get("max_cols", str(DEFAULT_MAX_COLS))
        try:
            max_cols = int(raw)
        except ValueError:
            max_cols = 0
        if not 1 <= max_cols <= MAX_COLS_LIMIT:
            error = f"max_cols must be an integer in [1, {MAX_COLS_LIMIT}], got {raw!r}"
            return self._json(request, {"error": error}, 400)
        bounds = []
        for name in ("start", "end"):
            raw = request.args.get(name)
            try:
                bounds.append(None if raw in (None, "") else int(raw))
            except ValueError:
                return self._json(request, {"error": f"{name} must be a step number, got {raw!r}"}, 400)
        data, run, failure = self._request_run(request)
        if failure is not None:
            return failure
        return self._json(request, flow_json(run, data, max_cols, *bounds))

    @wrappers.Request.application
    def _serve_alerts(self, request: wrappers.Request) -> wrappers.Response:
        data, run, failure = self._request_run(request)
        if failure is not None:
            return failure
        columns = [*ALERT_COLUMNS, "layer_index"]
        rows = [[_finite_or_none(a.get(c)) for c in columns] for a in data.alerts]
        return self._json(request, {"run": run, "columns": columns, "rows": rows})
