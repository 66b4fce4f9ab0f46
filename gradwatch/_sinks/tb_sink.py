"""TensorBoard sink: a run's rows as TensorBoard event files (host side, no TensorFlow import).

Summaries are built as TensorBoard protobufs and written as TFRecords directly in
``log_dir`` (``tensorboard --logdir runs/`` shows the run ``exp1`` for ``runs/exp1``),
one ``events.out.tfevents.<time>.<host>.<pid>.<n>.gradwatch`` file per sink.  Each window
is one event at ``step = window_row["step"]``, flushed before
:meth:`TensorBoardSink.write_window` returns, so a killed process keeps every window
written before the kill (the output calls it on its writer thread: the windows still
queued there, two at most, are lost).  The file is written by :class:`EventFile`, not by
TensorBoard's ``EventFileWriter``: that one checksums records with a pure-Python CRC in a
background thread (holding the GIL for a large window) and opens files through
``tf.io.gfile``; :mod:`gradwatch._io.records` frames them with google-crc32c.

Tags (``<layer>`` is ``<NN>_<name>``: the layer's zero-padded input-to-output index, then its
name as it is, ``/`` included, so TensorBoard lists layers in model order; see
:mod:`gradwatch._sinks.tb_tags`). A run writes at most 20 scalar tags (Scalars cards) by
default: the per-layer scalar families are written while they fit, most useful first
(``grad_norm``, ``update_ratio``, ``dead_fraction``, ``grad_norm_max``, ``nonfinite``,
``zero_count``, ``hist_nonfinite``); when the norms of every layer do not fit, those of
evenly spaced layers are (the Gradient Flow tab shows every layer).

=======================================  ==========  ===================================================
tag                                      plugin      value
=======================================  ==========  ===================================================
``gradwatch/loss``                       scalars     mean training loss over the window
``gradwatch/learning_rate``              scalars     learning rate at the window's last step
``gradwatch/global_norm``                scalars     global gradient L2 norm at the last step
``gradwatch/global_norm_max``            scalars     largest global gradient norm in the window
``gradwatch/nonfinite_steps``            scalars     steps whose gradient had a NaN/Inf entry
``gradwatch/skipped_steps``              scalars     steps whose update was not applied
``gradwatch/clip_fraction``              scalars     share of steps clipped (only when clipping)
``gradwatch/grad_norm/<layer>``          scalars     layer gradient L2 norm at the last step (``l2``)
``gradwatch/grad_norm_max/<layer>``      scalars     largest layer gradient norm in the window
``gradwatch/update_ratio/<layer>``       scalars     ||update|| / ||weights|| of the layer
``gradwatch/dead_fraction/<layer>``      scalars     fraction of dead units (ReLU-family layers)
``gradwatch/nonfinite/<layer>``          scalars     NaN/Inf gradient entries in the window
``gradwatch/grad_log10_abs/<layer>``     histograms  log10 |g| (exact zeros, NaN, Inf not in buckets)
``gradwatch/grad_values/<layer>``        histograms  signed gradient values; for a layer whose
                                                     gradient is all exact zeros, one bucket at 0
``gradwatch/hist_nonfinite/<layer>``     scalars     NaN/Inf entries of the histogram step
``gradwatch/zero_count/<layer>``         scalars     exact zeros of the histogram step
``gradwatch/alerts``                     text        the run's problems so far, first one first
``gradwatch/window``                     gradwatch   the window's rows as JSON (``tb_format``)
``gradwatch/run``                        gradwatch   ``run.json`` content, at step 0
``custom_scalars__config__``             custom_     the Custom Scalars dashboard layout, at step 0
                                         scalars
=======================================  ==========  ===================================================

A non-finite value (NaN, +-Inf, or a float64 beyond float32's range) is not
written for that tag and step: the chart has a gap there.  Non-finite gradient
entries are counted in their own scalars (``nonfinite_steps``, ``nonfinite/<layer>``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata

from gradwatch._io import tb_format
from gradwatch._io.records import write_record
from gradwatch._io.schema import with_schema_version
from gradwatch._sinks.tb_tags import MAX_SCALAR_CARDS, ProblemTable, ScalarPlan, layer_tag, markdown_cell

logger = logging.getLogger("gradwatch")

ALERTS_TAG = "gradwatch/alerts"
LAYOUT_TAG = custom_scalars_metadata.CONFIG_SUMMARY_TAG

#: window column -> scalar tag
WINDOW_SCALARS: tuple[tuple[str, str], ...] = (
    ("loss", "gradwatch/loss"),
    ("learning_rate", "gradwatch/learning_rate"),
    ("global_l2", "gradwatch/global_norm"),
    ("global_l2_max", "gradwatch/global_norm_max"),
    ("nonfinite_steps", "gradwatch/nonfinite_steps"),
    ("skipped_steps", "gradwatch/skipped_steps"),
    ("clip_fraction", "gradwatch/clip_fraction"),
)

#: layer-row column -> scalar tag prefix (the layer name follows)
LAYER_SCALARS: tuple[tuple[str, str], ...] = (
    ("l2", "gradwatch/grad_norm/"),
    ("l2_max", "gradwatch/grad_norm_max/"),
    ("update_ratio", "gradwatch/update_ratio/"),
    ("dead_frac", "gradwatch/dead_fraction/"),
    ("nonfinite", "gradwatch/nonfinite/"),
)

#: histogram kind -> tag prefix
HISTOGRAM_TAGS = {"log10_abs": "gradwatch/grad_log10_abs/", "signed": "gradwatch/grad_values/"}
HIST_NONFINITE_PREFIX = "gradwatch/hist_nonfinite/"
ZERO_COUNT_PREFIX = "gradwatch/zero_count/"

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _metadata(plugin_name: str, content: bytes, data_class: int) -> summary_pb2.SummaryMetadata:
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name, content=content),
        data_class=data_class,
    )


_SCALAR_METADATA = _metadata(
    scalar_metadata.PLUGIN_NAME,
    scalar_metadata.create_summary_metadata(None, None).plugin_data.content,
    summary_pb2.DATA_CLASS_SCALAR,
)
_HISTOGRAM_METADATA = _metadata(
    histogram_metadata.PLUGIN_NAME,
    histogram_metadata.create_summary_metadata(None, None).plugin_data.content,
    summary_pb2.DATA_CLASS_TENSOR,
)
_TEXT_METADATA = _metadata(
    text_metadata.PLUGIN_NAME,
    text_metadata.create_summary_metadata(None, None).plugin_data.content,
    summary_pb2.DATA_CLASS_TENSOR,
)
_GRADWATCH_METADATA = _metadata(tb_format.PLUGIN_NAME, b"", summary_pb2.DATA_CLASS_TENSOR)
_LAYOUT_METADATA = _metadata(custom_scalars_metadata.PLUGIN_NAME, b"", summary_pb2.DATA_CLASS_TENSOR)
_SCALAR_SHAPE = tensor_shape_pb2.TensorShapeProto()


def _string_tensor(data: bytes) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=_SCALAR_SHAPE, string_val=[data])


def _finite32(value: Any) -> float | None:
    """The value as a float when it is finite in float32, else None (not written)."""
    number = value
    if type(value) is not float:  # most values are a row's floats: no conversion
        if value is None or isinstance(value, (str, bytes)):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        return None
    return number


def _chart(title: str, *regexes: str) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))


def dashboards_layout(layers: Sequence[str], plan: ScalarPlan | None = None) -> layout_pb2.Layout:
    """The Custom Scalars dashboard layout of a run whose layers are ``layers`` (input -> output).

    The category charts use tag regexes (TensorBoard matches them at the tag's
    start), so layouts of runs with different layers merge into the same charts;
    the closed "per layer" category has one chart per layer, in model order.
    """
    categories = [
        layout_pb2.Category(
            title="gradient norm",
            chart=[
                _chart("gradient L2 norm per layer (last step of each window; spans decades: "
                       "log y axis with the card's middle button)", r"gradwatch/grad_norm/.*"),
                _chart("largest gradient L2 norm per layer in each window (log y axis: middle button)",
                       r"gradwatch/grad_norm_max/.*"),
            ],
        ),
        layout_pb2.Category(
            title="update/weight ratio",
            chart=[_chart("||update|| / ||weights|| per layer (healthy ~1e-3)", "gradwatch/update_ratio/.*")],
        ),
        layout_pb2.Category(
            title="dead units",
            chart=[_chart("fraction of dead units per layer", r"gradwatch/dead_fraction/.*")],
        ),
        layout_pb2.Category(
            title="clipping & non-finite",
            chart=[
                _chart("share of steps clipped", r"gradwatch/clip_fraction$"),
                _chart("steps with NaN/Inf gradients (and skipped steps)",
                       r"gradwatch/nonfinite_steps$", r"gradwatch/skipped_steps$"),
                _chart("NaN/Inf gradient entries per layer", r"gradwatch/nonfinite/.*"),
            ],
        ),
        layout_pb2.Category(
            title="global norm & loss",
            chart=[
                _chart("global gradient L2 norm", r"gradwatch/global_norm$", r"gradwatch/global_norm_max$"),
                _chart("loss", r"gradwatch/loss$"),
                _chart("learning rate", r"gradwatch/learning_rate$"),
            ],
        ),
    ]
    plan = plan or ScalarPlan(layers, len(WINDOW_SCALARS))
    if plan.families.get("l2"):
        per_layer = [
            _chart(
                f"{layer}: gradient L2 norm (last, max)",
                r"gradwatch/grad_norm/(\d+_)?" + re.escape(layer) + "$",  # (runs written before the index)
                r"gradwatch/grad_norm_max/(\d+_)?" + re.escape(layer) + "$",
            )
            for layer, _ in plan.layer_tags("l2")
        ]
        categories.append(layout_pb2.Category(title="per layer", chart=per_layer, closed=True))
    return layout_pb2.Layout(category=categories)


def layout_value(layers: Sequence[str], plan: ScalarPlan | None = None) -> summary_pb2.Summary.Value:
    """The summary value that carries :func:`dashboards_layout` (tag as Custom Scalars expects)."""
    return summary_pb2.Summary.Value(
        tag=LAYOUT_TAG,
        metadata=_LAYOUT_METADATA,
        tensor=_string_tensor(dashboards_layout(layers, plan).SerializeToString()),
    )


_FILE_NUMBER = itertools.count()


class EventFile:
    """One new TensorBoard event file in ``log_dir``, written synchronously: one record
    (:func:`gradwatch._io.records.write_record`) per serialized ``Event``."""

    def __init__(self, log_dir: str, suffix: str = ".gradwatch"):
        os.makedirs(log_dir, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_FILE_NUMBER)}{suffix}")
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "xb")
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: event_pb2.Event) -> None:
        write_record(self._file, event.SerializeToString())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def write_layout(log_dir: str, layers: Sequence[str]) -> str:
    """Writes :func:`dashboards_layout` at step 0 into a new event file in ``log_dir`` (for a run
    written without it) and returns the file's path."""
    events = EventFile(log_dir, suffix=".layout")
    summary = summary_pb2.Summary(value=[layout_value(layers)])
    events.add(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
    events.close()
    return events.path


def alerts_markdown(alert_rows: Sequence[Mapping[str, Any]]) -> str:
    """The alerts of one window as a Markdown table (step, layer, kind, severity, message, hint)."""
    columns = ("step", "layer", "kind", "severity", "message", "hint")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in alert_rows:
        lines.append("| " + " | ".join(markdown_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _histogram_tensor(edges: Any, counts: Any, where: str) -> tensor_pb2.TensorProto | None:
    """TensorBoard's histogram tensor: float64 [k, 3] rows (left, right, count); None if unusable."""
    try:
        edges = np.asarray(edges, dtype=np.float64).ravel()
        counts = np.asarray(counts, dtype=np.float64).ravel()
    except (TypeError, ValueError) as error:
        logger.warning("gradwatch: histogram %s not written: edges/counts not numeric (%s).", where, error)
        return None
    if edges.size != counts.size + 1:
        logger.warning(
            "gradwatch: histogram %s not written: %d edges for %d counts (expected counts + 1).",
            where, edges.size, counts.size,
        )
        return None
    left, right = edges[:-1], edges[1:]
    keep = np.isfinite(left) & np.isfinite(right) & np.isfinite(counts) & (counts >= 0)
    if not keep.all():
        logger.warning(
            "gradwatch: histogram %s: dropped %d of %d buckets with a non-finite edge or a "
            "non-finite or negative count.", where, int((~keep).sum()), keep.size,
        )
    buckets = np.stack([left[keep], right[keep], counts[keep]], axis=1)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=buckets.shape[0]),
             tensor_shape_pb2.TensorShapeProto.Dim(size=3)]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE, tensor_shape=shape, tensor_content=buckets.astype("<f8").tobytes()
    )


def _finite_counts(histogram: Mapping[str, Any]) -> tuple[int, float, float] | None:
    """(number of buckets, their counts' sum, exact zeros) of a histogram; None when unreadable."""
    try:
        counts = np.asarray(histogram.get("counts"), dtype=np.float64)
        zeros = float(histogram.get("zeros") or 0)
    except (TypeError, ValueError):
        return None
    return counts.size, float(np.nansum(counts)), zeros


def _all_zero(histogram: Mapping[str, Any]) -> bool:
    """Whether every finite entry of the histogram's layer was exactly zero (a dead layer)."""
    read = _finite_counts(histogram)
    return read is not None and read[2] > 0 and not read[1] > 0


def _empty(histogram: Mapping[str, Any]) -> bool:
    """Whether the histogram counts nothing finite: no bucket count and no exact zero."""
    read = _finite_counts(histogram)
    return read is not None and read[0] > 0 and not read[1] > 0 and not read[2] > 0


def _zeros_tensor(zeros: Any) -> tensor_pb2.TensorProto:
    """A histogram of ``zeros`` entries all exactly 0: one bucket [0, 0] (as TensorBoard writes a
    histogram of equal values)."""
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1), tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
    buckets = np.array([[0.0, 0.0, float(zeros)]], dtype="<f8")
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_shape=shape,
                                  tensor_content=buckets.tobytes())


class TensorBoardSink:
    """Writes a run's windows as TensorBoard summaries in ``log_dir`` (see the module docstring)."""

    def __init__(self, log_dir: str, run_info: dict[str, Any] | None = None,
                 layers: list[str] | None = None, max_cards: int = MAX_SCALAR_CARDS):
        self.log_dir = log_dir
        self.run_info = with_schema_version(run_info or {})
        self.layers = list(layers or [])
        self.max_cards = max_cards
        self.plan = ScalarPlan(self.layers, len(WINDOW_SCALARS), max_cards)
        self._problems = ProblemTable()
        self._writer: EventFile | None = None
        self._tagged: set[str] = set()  # tags whose metadata this file already holds
        self._last_window: dict[str, Any] | None = None  # the last window row written

    def open(self, run_info: dict[str, Any]) -> None:
        """Takes the run's description; the events file is created at the first window
        (a new file per session; readers let the later write of a step win)."""
        self.run_info = with_schema_version(run_info)
        self.layers = [layer["name"] for layer in run_info.get("layers", [])]
        self.plan = ScalarPlan(self.layers, len(WINDOW_SCALARS), self.max_cards)

    def describe(self, run_info: dict[str, Any]) -> None:
        """Takes the run's updated description (its segments), written with the first window.
        Once the file is open it is not written again: an event at step 0 after later steps
        could make a loader purge them (a segment's last step is read from its windows)."""
        if self._writer is None:
            self.run_info = with_schema_version(run_info)

    def write(self, result: Any) -> None:
        """Writes one window result (a ``WindowResult``)."""
        self.write_window(result.window_row, result.stats_rows, result.layer_rows, result.alert_rows,
                          result.first_step, result.histograms or None)

    def _open(self) -> None:
        self._writer = EventFile(self.log_dir)
        run = summary_pb2.Summary.Value(
            tag=tb_format.RUN_TAG,
            metadata=_GRADWATCH_METADATA,
            tensor=_string_tensor(tb_format.encode_run(self.run_info)),
        )
        self._add(0, [run, layout_value(self.layers, self.plan)])

    def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        summary = summary_pb2.Summary(value=values)
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        self._writer.add(event)

    def _value(self, tag: str, metadata: summary_pb2.SummaryMetadata, tensor: tensor_pb2.TensorProto):
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        if tag not in self._tagged:  # TensorBoard keeps the first value's metadata for the tag
            self._tagged.add(tag)
            value.metadata.CopyFrom(metadata)
        return value

    def _scalar(self, values: list, tag: str, number: Any) -> None:
        number = _finite32(number)
        if number is not None:
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=_SCALAR_SHAPE,
                                            float_val=[number])
            values.append(self._value(tag, _SCALAR_METADATA, tensor))

    def write_window(
        self,
        window_row: dict[str, Any],
        stats_rows: list[dict[str, Any]],
        layer_rows: list[dict[str, Any]],
        alert_rows: list[dict[str, Any]],
        first_step: int,
        histograms: list[dict[str, Any]] | None = None,
    ) -> None:
        """Writes one window (scalars, alert text, histograms, structured summary) and flushes."""
        if self._writer is None:
            self._open()
        step = int(window_row["step"])
        self._last_window = dict(window_row)
        values: list[summary_pb2.Summary.Value] = []
        for column, tag in WINDOW_SCALARS:
            self._scalar(values, tag, window_row.get(column))
        for row in layer_rows:
            layer = str(row["layer"])
            for column, _ in LAYER_SCALARS:
                tag = self.plan.tag(column, layer)
                if tag is not None:
                    self._scalar(values, tag, row.get(column))
        if alert_rows:
            values.append(self._problems_value(alert_rows))
        payload = tb_format.encode_window(window_row, stats_rows, layer_rows, alert_rows, first_step)
        values.append(self._value(tb_format.WINDOW_TAG, _GRADWATCH_METADATA, _string_tensor(payload)))
        by_step = self._histogram_values(histograms or [], step)
        self._add(step, values + by_step.pop(step, []))
        for hist_step, hist_values in sorted(by_step.items()):
            self._add(hist_step, hist_values)
        self._writer.flush()

    def write_alerts(self, alert_rows: list[dict[str, Any]]) -> None:
        """Writes alert rows that belong to no window (the run's last word): the alert text,
        and a structured summary with the last window row, no layer or variable rows and a first
        step past it (so it supersedes no window), for the readers."""
        if not alert_rows or self._last_window is None:
            return
        step = int(self._last_window["step"])
        payload = tb_format.encode_window(self._last_window, [], [], alert_rows, step + 1)
        # one step past the last window: a loader that purges on a repeated step would drop it
        self._add(step + 1, [self._problems_value(alert_rows),
                         self._value(tb_format.WINDOW_TAG, _GRADWATCH_METADATA, _string_tensor(payload))])
        self._writer.flush()

    def _problems_value(self, alert_rows: list[dict[str, Any]]) -> summary_pb2.Summary.Value:
        """The Text tab's table of the run's problems so far (TensorBoard shows the newest step
        first: its table starts with the run's first problem)."""
        self._problems.add(alert_rows)
        text = self._problems.markdown().encode("utf-8")
        return self._value(ALERTS_TAG, _TEXT_METADATA, _string_tensor(text))

    def _histogram_values(
        self, histograms: list[dict[str, Any]], default_step: int
    ) -> dict[int, list[summary_pb2.Summary.Value]]:
        """Histogram values (and their zero/non-finite count scalars) grouped by their step."""
        by_step: dict[int, list[summary_pb2.Summary.Value]] = {}
        counted: set[tuple[int, str]] = set()
        for histogram in histograms:
            layer = str(histogram.get("layer"))
            hist_step = _finite32(histogram.get("step"))
            hist_step = default_step if hist_step is None else int(hist_step)
            values = by_step.setdefault(hist_step, [])
            kind = histogram.get("kind")
            prefix = HISTOGRAM_TAGS.get(kind)
            if prefix is None:
                logger.warning("gradwatch: histogram of %r not written: unknown kind %r (expected %s).",
                               layer, kind, sorted(HISTOGRAM_TAGS))
                continue
            where = f"{kind} of {layer!r} at step {hist_step}"
            index = self.plan.index(layer)
            tag = layer_tag(prefix, index, len(self.plan.layers), layer)
            if _empty(histogram):  # every entry NaN/Inf: no bucket to draw (hist_nonfinite counts them)
                tensor = None
            elif _all_zero(histogram):  # a dead layer: its zeros at 0, not an empty log10 axis
                if (hist_step, layer, "zero") not in counted:
                    counted.add((hist_step, layer, "zero"))
                    tag = layer_tag(HISTOGRAM_TAGS["signed"], index, len(self.plan.layers), layer)
                    values.append(self._value(tag, _HISTOGRAM_METADATA, _zeros_tensor(histogram["zeros"])))
                tensor = None
            else:
                tensor = _histogram_tensor(histogram.get("edges"), histogram.get("counts"), where)
            if tensor is not None:
                values.append(self._value(tag, _HISTOGRAM_METADATA, tensor))
            if (hist_step, layer) not in counted:  # one zero/non-finite count per layer and step
                counted.add((hist_step, layer))
                for column in ("hist_nonfinite", "zeros"):
                    count_tag = self.plan.tag(column, layer)
                    if count_tag is not None:
                        self._scalar(values, count_tag, histogram.get(column.replace("hist_", "")))
        return by_step

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._tagged.clear()
