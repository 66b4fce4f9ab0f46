"""The report's charts as inline SVG, the heatmap's cells as a PNG made with numpy: no
matplotlib, a few milliseconds a chart, so a report over hundreds of runs stays fast.

Every text drawn is escaped. Isolated points (a series measured once, or between gaps)
and short series get markers, and a constant or all-zero series gets an axis around it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

WIDTH = 1000
LEFT, RIGHT, TOP, BOTTOM = 64, 190, 12, 38
#: A series with at most this many points gets a marker on each.
MARKERS_UP_TO = 40
#: NaN/Inf gradients: the same magenta as the TensorBoard tab's.
NONFINITE_COLOUR = "#d500f9"
MISSING_COLOUR = "#bbbbbb"
#: viridis at 9 even stops (matplotlib's), interpolated linearly.
_VIRIDIS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
], dtype=np.float64)
_FONT = 'font-family="system-ui,sans-serif" font-size="11"'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_e(text)}</text>'


def _box(x0: float, y0: float, x1: float, y1: float, fill: str = "#fff") -> str:
    return (f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
            f'fill="{fill}" stroke="#999"/>')


def _x_labels(x: Axis, bottom: float) -> list[str]:
    """The step ticks under a panel and its "step" label."""
    out = [_text(float(x.at(value)), bottom + 14, text, "middle") for value, text in x.ticks(8)]
    return out + [_text((x.start + x.end) / 2, bottom + 30, "step", "middle")]


def fmt(value: float) -> str:
    """A tick label: 3 significant digits, no trailing noise."""
    if value == 0:
        return "0"
    return f"{value:.3g}"


@dataclasses.dataclass
class Axis:
    """A data range mapped onto pixels ``[start, end]`` (log10 of the values when ``log``)."""

    lo: float
    hi: float
    log: bool
    start: float
    end: float

    def at(self, value: float | np.ndarray) -> np.ndarray:
        value = np.log10(value) if self.log else np.asarray(value, dtype=np.float64)
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self, count: int = 6) -> list[tuple[float, str]]:
        if self.log:
            first, last = math.ceil(self.lo - 1e-9), math.floor(self.hi + 1e-9)
            every = max(1, math.ceil((last - first + 1) / 8))
            return [(10.0 ** k, f"1e{k}") for k in range(first, last + 1, every)]
        return [(v, fmt(v)) for v in nice_ticks(self.lo, self.hi, count)]


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]``."""
    span = hi - lo
    raw = span / max(1, count - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def value_range(values: np.ndarray, log: bool) -> tuple[float, float]:
    """The (lo, hi) an axis shows for ``values`` (log10 units when ``log``): padded, never empty;
    a constant series sits in the middle, an all-zero one on 0..1."""
    finite = values[np.isfinite(values)]
    if log:
        finite = np.log10(finite[finite > 0])
    if not finite.size:
        return (0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if log:
        return (math.floor(lo), math.ceil(hi)) if math.ceil(hi) > math.floor(lo) else (lo - 1, hi + 1)
    if hi == lo:
        return (0.0, 1.0) if lo == 0 else (lo - abs(lo) * 0.5, hi + abs(hi) * 0.5)
    pad = (hi - lo) * 0.05
    return (lo - pad if lo < 0 or lo - pad > 0 else 0.0, hi + pad)


def x_axis(steps: np.ndarray, width: int = WIDTH) -> Axis:
    lo, hi = (float(np.min(steps)), float(np.max(steps))) if len(steps) else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    return Axis(lo, hi, False, LEFT, width - RIGHT)


@dataclasses.dataclass
class Series:
    label: str
    x: np.ndarray
    y: np.ndarray
    colour: str
    dashed: bool = False


def _frame(x: Axis, y: Axis, height: int, xlabel: str, ylabel: str) -> list[str]:
    """Axes, grid lines, tick labels and axis labels of one panel."""
    top, bottom = y.end, y.start
    out = [f'<rect x="{x.start:.1f}" y="{top:.1f}" width="{x.end - x.start:.1f}" '
           f'height="{bottom - top:.1f}" fill="#fff" stroke="#999"/>']
    for value, label in y.ticks():
        py = float(y.at(value))
        out.append(f'<line x1="{x.start:.1f}" x2="{x.end:.1f}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{x.start - 4:.1f}" y="{py + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    for value, label in x.ticks(8):
        px = float(x.at(value))
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top:.1f}" y2="{bottom:.1f}" stroke="#eee"/>'
                   f'<text x="{px:.1f}" y="{bottom + 14:.1f}" text-anchor="middle">{_e(label)}</text>')
    if xlabel:
        out.append(f'<text x="{(x.start + x.end) / 2:.1f}" y="{bottom + 30:.1f}" '
                   f'text-anchor="middle">{_e(xlabel)}</text>')
    middle = (top + bottom) / 2
    out.append(f'<text x="12" y="{middle:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {middle:.1f})">{_e(ylabel)}</text>')
    return out


def _series(series: Series, x: Axis, y: Axis) -> list[str]:
    """Polylines over the drawable runs of points; a marker on isolated points (on all of a short
    series)."""
    drawable = np.isfinite(series.y) & np.isfinite(series.x)
    if y.log:
        drawable &= series.y > 0
    out = []
    dash = ' stroke-dasharray="5,3"' if series.dashed else ""
    index = np.flatnonzero(drawable)
    if not index.size:
        return out
    breaks = np.flatnonzero(np.diff(index) > 1) + 1
    px, py = x.at(series.x[index]), y.at(np.clip(series.y[index], *_clip_range(y)))
    for run in np.split(np.arange(index.size), breaks):
        if run.size > 1:
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px[run], py[run]))
            out.append(f'<polyline points="{points}" fill="none" stroke="{series.colour}" '
                       f'stroke-width="1.5"{dash}/>')
    marked = np.ones(index.size, bool) if index.size <= MARKERS_UP_TO else np.zeros(index.size, bool)
    for run in np.split(np.arange(index.size), breaks):
        if run.size == 1:
            marked[run] = True
    out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.8" fill="{series.colour}"/>'
            for a, b in zip(px[marked], py[marked])]
    return out


def _clip_range(y: Axis) -> tuple[float, float]:
    return (10.0 ** y.lo, 10.0 ** y.hi) if y.log else (y.lo, y.hi)


def _legend(series: Sequence[Series], x_end: float, top: float, notes: dict[str, str]) -> list[str]:
    out = []
    for i, s in enumerate(series):
        ty = top + 10 + 15 * i
        label = s.label + notes.get(s.label, "")
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        out.append(f'<line x1="{x_end + 10:.1f}" x2="{x_end + 28:.1f}" y1="{ty - 4:.1f}" y2="{ty - 4:.1f}" '
                   f'stroke="{s.colour}" stroke-width="2"{dash}/>'
                   f'<text x="{x_end + 32:.1f}" y="{ty:.1f}">{_e(label)}</text>')
    return out


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" aria-label="{_e(title)}" {_FONT}>' + "".join(body) + "</svg>")


def line_chart(series: Sequence[Series], title: str, ylabel: str, log: bool = False,
               ylim: tuple[float, float] | None = None, height: int = 300,
               vlines: Sequence[tuple[float, str]] = ()) -> str:
    """Lines of ``series`` over the step; ``log`` draws the y axis in log10 (falls back to linear
    when nothing is positive: an all-zero series is drawn at 0, not left out)."""
    values = np.concatenate([s.y for s in series]) if series else np.zeros(0)
    log = log and bool(np.any(np.isfinite(values) & (values > 0)))
    x = x_axis(np.concatenate([s.x for s in series]) if series else np.zeros(0))
    lo, hi = ylim if ylim is not None else value_range(values, log)
    y = Axis(lo, hi, log, height - BOTTOM, TOP)
    notes = {}
    for s in series:
        finite = s.y[np.isfinite(s.y)]
        if log and finite.size and not np.any(finite > 0):
            notes[s.label] = " (all 0: not on a log axis)"
    body = _frame(x, y, height, "step", ylabel)
    for step, colour in vlines:
        px = float(x.at(step))
        body.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{height - BOTTOM}" stroke="{colour}" '
                    'stroke-opacity="0.5"/>')
    for s in series:
        body += _series(s, x, y)
    body += _legend(series, x.end, TOP, notes)
    return _svg(WIDTH, height, body, title)


def png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image [h, w, 3] as a PNG file (no filter, zlib)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + \
        chunk(b"IEND", b"")


def viridis(unit: np.ndarray) -> np.ndarray:
    """Colours [..., 3] uint8 of values in [0, 1]."""
    position = np.clip(unit, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_VIRIDIS) - 1)
    frac = (position - low)[..., None]
    return (_VIRIDIS[low] * (1 - frac) + _VIRIDIS[high] * frac).round().astype(np.uint8)


def _hex_rgb(colour: str) -> list[int]:
    return [int(colour[i:i + 2], 16) for i in (1, 3, 5)]


def _cells(logs: np.ndarray, nonfinite: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The heatmap's cells as RGB: viridis, grey where missing, magenta where NaN/Inf."""
    unit = (np.nan_to_num(logs, nan=vmin) - vmin) / (vmax - vmin)
    rgb = viridis(unit)
    rgb[~np.isfinite(logs)] = _hex_rgb(MISSING_COLOUR)
    rgb[nonfinite] = _hex_rgb(NONFINITE_COLOUR)
    return rgb


HEATMAP_LEFT = 170
HEATMAP_MAX_COLUMNS = 800


def _columns_reduced(logs: np.ndarray, nonfinite: np.ndarray, steps: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most ``HEATMAP_MAX_COLUMNS`` columns: each keeps the largest norm of its windows."""
    width = logs.shape[1]
    if width <= HEATMAP_MAX_COLUMNS:
        return logs, nonfinite, steps
    edges = np.linspace(0, width, HEATMAP_MAX_COLUMNS + 1).round().astype(np.int64)
    with np.errstate(invalid="ignore"):
        logs = np.fmax.reduceat(logs, edges[:-1], axis=1)
    return logs, np.logical_or.reduceat(nonfinite, edges[:-1], axis=1), steps[edges[1:] - 1]


def _colourbar(x0: float, top: float, bottom: float, vmin: float, vmax: float, label: str) -> list[str]:
    last = len(_VIRIDIS) - 1
    stops = "".join(f'<stop offset="{i / last:.3f}" stop-color="rgb({r:.0f},{g:.0f},{b:.0f})"/>'
                    for i, (r, g, b) in enumerate(_VIRIDIS[::-1]))
    gradient = f'<linearGradient id="gw-viridis" x1="0" x2="0" y1="0" y2="1">{stops}</linearGradient>'
    out = [f"<defs>{gradient}</defs>",
           _box(x0, top, x0 + 14, bottom, "url(#gw-viridis)")]
    scale = Axis(vmin, vmax, False, bottom, top)
    for value, text in scale.ticks(5):
        py = float(scale.at(value))
        out.append(f'<text x="{x0 + 18:.1f}" y="{py + 4:.1f}">{_e(text)}</text>')
    middle = (top + bottom) / 2
    out.append(f'<text x="{x0 + 62:.1f}" y="{middle:.1f}" text-anchor="middle" '
               f'transform="rotate(90 {x0 + 62:.1f} {middle:.1f})">{_e(label)}</text>')
    return out


def heatmap(logs: np.ndarray, nonfinite: np.ndarray, layers: Sequence[str], steps: np.ndarray,
            crosses: Sequence[tuple[int, float, str]], title: str, label: str) -> str:
    """Layers (rows, input at top) x windows: viridis by ``logs`` (grey where NaN), magenta where
    ``nonfinite``; ``crosses`` (row, step, colour) mark alerts."""
    logs, nonfinite, columns = _columns_reduced(logs, nonfinite, np.asarray(steps))
    finite = logs[np.isfinite(logs)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    vmax = vmax if vmax > vmin else vmin + 1.0
    # at least 140 px high (the colour bar's label), at most 22 px a row
    row_h = max(5.0, min(22.0, 480.0 / max(1, len(layers))), 140.0 / max(1, len(layers)))
    top, bottom = TOP, TOP + row_h * len(layers)
    height = int(bottom + BOTTOM)
    first, last = float(steps[0]), float(steps[-1])
    half = (last - first) / max(1, len(steps) - 1) / 2 if len(steps) > 1 else 0.5
    x = Axis(first - half, last + half, False, HEATMAP_LEFT, WIDTH - RIGHT)
    data = base64.b64encode(png(_cells(logs, nonfinite, vmin, vmax))).decode("ascii")
    body = [f'<image x="{x.start:.1f}" y="{top:.1f}" width="{x.end - x.start:.1f}" '
            f'height="{bottom - top:.1f}" preserveAspectRatio="none" style="image-rendering:pixelated" '
            f'href="data:image/png;base64,{data}"/>', _box(x.start, top, x.end, bottom, "none")]
    body += _x_labels(x, bottom)
    every = max(1, math.ceil(len(layers) / 40))
    for row in range(0, len(layers), every):
        name = layers[row] if len(layers[row]) <= 26 else layers[row][:25] + "…"
        body.append(f'<text x="{x.start - 4:.1f}" y="{top + (row + 0.5) * row_h + 4:.1f}" '
                    f'text-anchor="end">{_e(name)}</text>')
    for row, step, colour in crosses:
        px, py = float(x.at(step)), top + (row + 0.5) * row_h
        body.append(f'<path d="M{px - 5:.1f},{py - 5:.1f}L{px + 5:.1f},{py + 5:.1f}M{px - 5:.1f},{py + 5:.1f}'
                    f'L{px + 5:.1f},{py - 5:.1f}" stroke="{colour}" stroke-width="2.5"/>')
    body += _colourbar(x.end + 16, top, bottom, vmin, vmax, label)
    return _svg(WIDTH, height, body, title)


def timeline(steps: np.ndarray, loss: np.ndarray, alerts: Sequence[tuple[float, int, str]],
             kinds: Sequence[str], colours: dict[str, str], title: str) -> str:
    """The loss over the steps with a vertical line per alert, and below it one row per alert
    kind with a marker per alert (a triangle for cleared ``info`` rows)."""
    has_loss = bool(np.isfinite(loss).any())
    positive = loss[np.isfinite(loss) & (loss > 0)]
    log = bool(positive.size and positive.min() > 0 and positive.max() / positive.min() > 100)
    top_h = 220
    x = x_axis(np.concatenate([steps, [a[0] for a in alerts]]) if len(alerts) else steps)
    y = Axis(*value_range(loss, log), log, top_h - 8, TOP)
    body = _frame(x, y, top_h, "", "loss (window mean)")
    for step, _, severity in alerts:
        px = float(x.at(step))
        body.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{top_h - 8}" '
                    f'stroke="{colours.get(severity, "#888")}" stroke-opacity="0.5"/>')
    if has_loss:
        body += _series(Series("loss", np.asarray(steps, np.float64), loss, "#333333"), x, y)
    else:
        body.append(f'<text x="{(x.start + x.end) / 2:.1f}" y="{top_h / 2:.1f}" text-anchor="middle">'
                    "loss not recorded in this run</text>")
    row_h = 20
    strip_top = top_h + 10
    strip_bottom = strip_top + row_h * max(1, len(kinds))
    body.append(_box(x.start, strip_top, x.end, strip_bottom))
    for i, kind in enumerate(kinds):
        body.append(f'<text x="{x.start - 4:.1f}" y="{strip_top + (i + 0.5) * row_h + 4:.1f}" '
                    f'text-anchor="end">{_e(kind)}</text>')
    for step, row, severity in alerts:
        px, py = float(x.at(step)), strip_top + (row + 0.5) * row_h
        colour = colours.get(severity, "#888")
        if severity == "info":
            corners = f"M{px:.1f},{py - 5:.1f}L{px + 5:.1f},{py + 4:.1f}L{px - 5:.1f},{py + 4:.1f}Z"
            body.append(f'<path d="{corners}" fill="{colour}"/>')
        else:
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4.5" fill="{colour}"/>')
    body += _x_labels(x, strip_bottom)
    legend = [(f"{s} alert" if s != "info" else "cleared", c) for s, c in colours.items()]
    for i, (text, colour) in enumerate(legend):
        body.append(f'<circle cx="{x.end + 16:.1f}" cy="{TOP + 10 + 15 * i - 4:.1f}" r="4" fill="{colour}"/>'
                    f'<text x="{x.end + 26:.1f}" y="{TOP + 10 + 15 * i:.1f}">{_e(text)}</text>')
    return _svg(WIDTH, int(strip_bottom + BOTTOM), body, title)
