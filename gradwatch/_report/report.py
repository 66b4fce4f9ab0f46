"""Post-hoc reports of one or several runs: a self-contained HTML file (figures inline as SVG,
no network) or Markdown with the SVGs in a ``<name>_files`` directory beside it.

Only the layer rows (``layers.csv``), the windows and the alerts are read; every name
shown is HTML-escaped. The charts are drawn by ``gradwatch._report.svg`` (no matplotlib: fast).
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd

from gradwatch import __version__
from gradwatch._io.schema import ALERT_KINDS, LAYERS_FILE, group_labels, groups_of, segment_ranges
from gradwatch._report import svg
from gradwatch._report.verdicts import (
    RunFrames,
    RunVerdicts,
    compute_verdicts,
    discover_runs,
    headline,
    interesting_layers,
    kind_label,
    layer_label,
    load_run,
    require_data,
)

#: Line plots draw at most this many layers (the heatmap always shows all of them).
MAX_LINES = 12
#: Verdict tables list every healthy layer up to this many layers; beyond, healthy layers are folded.
MAX_LISTED_LAYERS = 40
#: Alert tables show at most this many rows per run.
MAX_ALERT_ROWS = 500
#: In "auto" mode the progress bar is shown on a TTY, or when the runs' layers.csv files exceed this size.
LARGE_RUN_BYTES = 32 << 20
FIGURES_PER_RUN = 6
#: A report of more runs than this is an index page plus one page per run (in ``<stem>_files/``).
INLINE_RUNS = 12
FORMATS = ("html", "md")
_SEVERITY_COLOURS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#2ca02c"}
#: tab10 then tab20's light shades (a layer beyond them is drawn dashed).
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")


@dataclasses.dataclass
class FigureOut:
    """One figure of a run: a PNG, or a note saying why it was skipped."""

    key: str
    title: str
    svg: str | None  # an inline <svg> element
    note: str = ""


@dataclasses.dataclass
class RunReport:
    verdicts: RunVerdicts
    figures: list[FigureOut]


# --------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on stderr, or nothing (``enabled=False``)."""

    def __init__(self, enabled: bool, total: int, force: bool = False):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True, force_terminal=True if force else None)
            # On a terminal the bar vanishes when done; elsewhere (a CI log) only its final state is printed.
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=console.is_terminal,
            )
            self._task = self._bar.add_task("gradwatch report", total=total)

    def step(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=description)

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if self._bar is None:
            yield self
            return
        with self._bar:
            yield self


def _want_progress(progress: bool | None, paths: Sequence[str]) -> bool:
    if progress is not None:
        return progress
    if sys.stderr.isatty():
        return True
    size = 0
    for path in paths:
        try:
            size += os.path.getsize(os.path.join(path, LAYERS_FILE))
        except OSError:
            pass
    return size > LARGE_RUN_BYTES


def _bar_for(runs: Sequence[tuple[str, str]], progress: bool | None, steps_per_run: int) -> _Progress:
    enabled = _want_progress(progress, [path for _, path in runs])
    return _Progress(enabled, len(runs) * steps_per_run, force=progress is True)


def load_all(
    log_dir: str | os.PathLike[str], progress: bool | None = None, source: str = "auto"
) -> list[RunVerdicts]:
    """Loads every run under ``log_dir`` and computes its verdicts (progress bar: see ``build_report``).

    Raises:
        GradwatchDataError: no run, unreadable data, or no run that wrote a window yet.
    """
    runs = discover_runs(log_dir, source)
    bar = _bar_for(runs, progress, 4)
    with bar.running():
        return require_data([compute_verdicts(load_run(name, path, bar.step, source)) for name, path in runs],
                            log_dir)


# --------------------------------------------------------------------------- figures


def _layer_matrix(run: RunFrames, column: str, layers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``column`` of the layer rows as a (layers x windows) float32 matrix (NaN where missing)."""
    frame = run.layers
    steps = np.unique(frame["step"].to_numpy())
    matrix = np.full((len(layers), len(steps)), np.nan, dtype=np.float32)
    position = {layer: i for i, layer in enumerate(layers)}
    codes = frame["layer"].cat.categories.map(lambda c: position.get(str(c), -1)).to_numpy()
    rows = codes[frame["layer"].cat.codes.to_numpy()]
    keep = rows >= 0
    cols = np.searchsorted(steps, frame["step"].to_numpy()[keep])
    matrix[rows[keep], cols] = frame[column].to_numpy()[keep]
    return matrix, steps


def _heatmap(verdicts: RunVerdicts) -> FigureOut:
    run = verdicts.run
    title = "Gradient flow: log10 mean gradient norm per layer and window (input at top)"
    layers = run.layer_order
    if not layers or run.layers.empty:
        return FigureOut("heatmap", title, None, "No layer statistics in this run.")
    matrix, steps = _layer_matrix(run, "l2_mean", layers)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(matrix > 0, np.log10(matrix), np.nan)
    nonfinite, _ = _layer_matrix(run, "nonfinite", layers)
    position = {layer: i for i, layer in enumerate(layers)}
    crosses = [(position[p.layer], float(p.first_step), _SEVERITY_COLOURS.get(p.severity, "red"))
               for p in verdicts.problems if p.layer in position]
    chart = svg.heatmap(logs, nonfinite > 0, group_labels(layers, run.meta), steps, crosses, title,
                        "log10 grad norm")
    note = "Grey: zero or missing gradient; magenta: NaN/Inf gradient entries in the window."
    if crosses:
        note += " Crosses mark where an alert was first raised on a layer."
    return FigureOut("heatmap", title, chart, note)


def _layer_lines(
    verdicts: RunVerdicts, column: str, key: str, title: str, ylabel: str, log: bool, max_lines: int
) -> FigureOut:
    run = verdicts.run
    values = run.layers[column]
    if not np.isfinite(values).any():
        return FigureOut(key, title, None, f"Skipped: {column} was not measured in this run (all NaN).")
    shown = interesting_layers(verdicts, max_lines)
    matrix, steps = _layer_matrix(run, column, shown)
    steps = steps.astype(np.float64)
    series = [svg.Series(label, steps, matrix[i].astype(np.float64), _PALETTE[i % len(_PALETTE)],
                         dashed=i >= len(_PALETTE))
              for i, label in enumerate(group_labels(shown, run.meta))]
    chart = svg.line_chart(series, title, ylabel, log=log, height=300)
    total = len(run.layer_order)
    note = (
        f"Showing {len(shown)} of {total} layers: those with alerts first, then those whose median "
        "gradient norm is farthest from the median layer's (the heatmap shows every layer)."
        if total > len(shown) else ""
    )
    return FigureOut(key, title, chart, note)


def _clip_fraction(run: RunFrames) -> FigureOut:
    title = "Clip fraction: share of each window's steps on which clipping changed the gradient"
    values = run.windows["clip_fraction"].to_numpy(dtype=np.float64)
    if not np.isfinite(values).any():
        return FigureOut("clip_fraction", title, None, "Skipped: no clipping in this run (all NaN).")
    series = [svg.Series("clip fraction", run.windows["step"].to_numpy(np.float64), values, "#1f77b4")]
    return FigureOut("clip_fraction", title, svg.line_chart(series, title, "clip fraction", ylim=(0.0, 1.0),
                                                           height=220))


def _timeline(run: RunFrames) -> FigureOut:
    title = "Alert timeline on the training loss"
    loss = run.windows["loss"].to_numpy(dtype=np.float64)
    alerts = run.alerts
    if not np.isfinite(loss).any() and alerts.empty:
        return FigureOut("timeline", title, None, "Skipped: no loss recorded and no alerts.")
    kinds = [k for k in ALERT_KINDS if k in set(alerts["kind"])] if len(alerts) else []
    kinds += sorted(set(alerts["kind"]) - set(kinds)) if len(alerts) else []
    marks = [(float(r.step), kinds.index(r.kind), r.severity) for r in alerts.itertuples(index=False)]
    chart = svg.timeline(run.windows["step"].to_numpy(np.float64), loss, marks,
                         [kind_label(k) for k in kinds], _SEVERITY_COLOURS, title)
    note = "Vertical lines: alerts (red error, orange warning, green cleared)." if len(alerts) else ""
    return FigureOut("timeline", title, chart, note)


def run_figures(
    verdicts: RunVerdicts, step: Callable[[str], None], max_lines: int = MAX_LINES
) -> list[FigureOut]:
    """The figures of one run, in report order."""
    name = verdicts.run.name
    makers: list[tuple[str, Callable[[], FigureOut]]] = [
        ("gradient flow heatmap", lambda: _heatmap(verdicts)),
        ("gradient norms", lambda: _layer_lines(
            verdicts, "l2_mean", "grad_norms", "Gradient norm per layer (window mean, log scale)",
            "grad norm", True, max_lines)),
        ("update ratio", lambda: _layer_lines(
            verdicts, "update_ratio", "update_ratio",
            "Update/weight ratio per layer (log scale; ~1e-3 is typical)", "||Δw|| / ||w||", True,
            max_lines)),
        ("dead units", lambda: _layer_lines(
            verdicts, "dead_frac", "dead_units", "Dead-unit fraction per layer", "dead fraction", False,
            max_lines)),
        ("clip fraction", lambda: _clip_fraction(verdicts.run)),
        ("alert timeline", lambda: _timeline(verdicts.run)),
    ]
    figures = []
    for label, make in makers:
        step(f"{name}: {label}")
        figures.append(make())
    return figures


# --------------------------------------------------------------------------- tables


def verdict_rows(verdicts: RunVerdicts, fold_healthy: bool | None = None) -> list[dict[str, str]]:
    """The verdict table of a run as rows of text (problems in model order; healthy layers listed,
    or folded into one row when the model has more than ``MAX_LISTED_LAYERS`` layers)."""
    if fold_healthy is None:
        fold_healthy = len(verdicts.run.layer_order) > MAX_LISTED_LAYERS
    rows: list[dict[str, str]] = []
    position = {layer: i for i, layer in enumerate(verdicts.run.layer_order)}
    healthy_rows = {
        layer: {"layer": layer_label(layer), "verdict": "healthy", "severity": "", "first step": "",
                "last step": "", "status": "", "evidence": evidence, "hint": ""}
        for layer, evidence in verdicts.healthy.items()
    }
    problem_rows = [
        (position.get(p.layer, -1), {
            "layer": layer_label(p.layer), "verdict": kind_label(p.kind), "severity": p.severity,
            "first step": str(p.first_step), "last step": str(p.last_step), "status": p.status,
            "evidence": p.evidence, "hint": p.hint,
        })
        for p in verdicts.problems
    ]
    if fold_healthy:
        rows = [row for _, row in problem_rows]
        if healthy_rows:
            names = list(healthy_rows)
            shown = ", ".join(names[:8]) + (f", … (+{len(names) - 8})" if len(names) > 8 else "")
            rows.append({"layer": f"{len(names)} layers", "verdict": "healthy", "severity": "",
                         "first step": "", "last step": "", "status": "", "evidence": shown, "hint": ""})
        return rows
    merged = problem_rows + [(position[layer], row) for layer, row in healthy_rows.items()]
    merged.sort(key=lambda item: item[0])
    return [row for _, row in merged]


def comparison_rows(all_verdicts: Sequence[RunVerdicts]) -> tuple[list[str], list[list[str]]]:
    """A run x kind matrix: per kind, the layers with that problem (count, active count, first names)."""
    kinds = [k for k in ALERT_KINDS if any(v.layers_with(k) for v in all_verdicts)]
    extra = {p.kind for v in all_verdicts for p in v.problems} - set(kinds)
    kinds += sorted(extra)
    header = ["run", "verdict", "headline", "layers", "healthy"] + [kind_label(k) for k in kinds]
    rows = []
    for v in all_verdicts:
        row = [v.run.name, v.state, headline(v), str(len(v.run.layer_order)), str(len(v.healthy))]
        for kind in kinds:
            problems = v.layers_with(kind)
            if not problems:
                row.append("")
                continue
            active = sum(p.active for p in problems)
            names = [layer_label(p.layer) for p in problems]
            listed = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
            row.append(f"{len(problems)} ({active} active): {listed}")
        rows.append(row)
    return header, rows


def _alert_table(alerts: pd.DataFrame) -> tuple[list[str], list[list[str]], str]:
    columns = ["step", "layer", "variable", "kind", "severity", "value", "threshold", "message", "hint"]
    shown = alerts.iloc[:MAX_ALERT_ROWS]
    rows = [
        [str(int(r.step)), layer_label(r.layer), r.variable, r.kind, r.severity, f"{r.value:.3g}",
         f"{r.threshold:.3g}", r.message, r.hint]
        for r in shown.itertuples(index=False)
    ]
    note = ""
    if len(alerts) > MAX_ALERT_ROWS:
        note = f"Showing the first {MAX_ALERT_ROWS} of {len(alerts)} alerts."
    return columns, rows, note


def _run_facts(run: RunFrames) -> str:
    meta = run.meta
    parts = []
    if meta.get("model_name"):
        parts.append(f"model {meta['model_name']}")
    for key in ("front", "optimizer"):
        value = meta.get(key)
        if isinstance(value, dict):
            value = value.get("class_name") or value.get("name")
        if value:
            parts.append(f"{key} {value}")
    applied = set(groups_of(meta).values())
    optimizers = [o for o in meta.get("optimizers", []) or []
                  if isinstance(o, dict) and o.get("group") in applied]
    if len(optimizers) > 1:  # several optimizers applied: each one's variables are a group
        parts.append("optimizers " + ", ".join(f"{o.get('group')} ({o.get('class')})" for o in optimizers))
    if len(run.windows):
        parts.append(f"{int(run.windows['step'].iloc[-1])} steps in {len(run.windows)} windows")
    parts.append(f"{len(run.layer_order)} layers")
    segments = segment_ranges(meta, run.windows["step"].tolist() if len(run.windows) else [])
    if len(segments) > 1:  # fits that restarted the optimizer or changed the variables
        parts.append(f"{len(segments)} segments: " + "; ".join(
            f"steps {s['first_step']}-{s['last_step'] if s['last_step'] is not None else '?'} "
            f"({str(s.get('reason', '')).replace('_', ' ')})" for s in segments))
    return ", ".join(str(p) for p in parts)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.hint,td.msg{max-width:420px}
tr.error td{background:#fde2e2}tr.warning td{background:#fff1dc}tr.healthy td{background:#eaf7ea}
tr.recovered td{background:#f4f4f4}
figure{margin:12px 0}figure svg{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-weight:600;margin-bottom:4px}.note{color:#555;font-style:italic}
.bad{color:#b00020;font-weight:600}.good{color:#1b7a1b;font-weight:600}.warn{color:#a84e00;font-weight:600}
p.headline{font-size:1.15em;padding:6px 10px;border-left:6px solid currentColor;background:#fafafa}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] | None = None,
                cell_classes: dict[int, str] | None = None, links: dict[int, str] | None = None) -> str:
    out = ["<table><thead><tr>", "".join(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    cell_classes = cell_classes or {}
    for i, row in enumerate(rows):
        css = f' class="{_e(classes[i])}"' if classes and classes[i] else ""
        cells = []
        for j, cell in enumerate(row):
            klass = f' class="{cell_classes[j]}"' if j in cell_classes else ""
            content = _e(cell)
            if links and j == 0 and i in links:
                content = f'<a href="{_e(links[i])}">{content}</a>'
            cells.append(f"<td{klass}>{content}</td>")
        out.append(f"<tr{css}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _row_class(row: dict[str, str]) -> str:
    if row["verdict"] == "healthy":
        return "healthy"
    if row["status"].startswith("recovered"):
        return "recovered"
    return row["severity"]


def _html_run(report: RunReport, anchor: str, heading: str) -> str:
    v = report.verdicts
    run = v.run
    rows = verdict_rows(v)
    header = ["layer", "verdict", "severity", "first step", "last step", "status", "evidence", "hint"]
    body = [f'<section id="{anchor}">', f"<{heading}>{_e(run.name)}</{heading}>",
            f"<p>{_e(_run_facts(run))}. Source: <code>{_e(os.path.abspath(run.path))}</code></p>"]
    tone = {"healthy": "good", "warnings": "warn", "no data": "warn"}.get(v.state, "bad")
    body.append(f'<p class="headline {tone}" data-state="{_e(v.state)}">{_e(headline(v))}</p>')
    if v.errors_raised:
        body.append('<p class="bad">An alert of severity error was raised in this run.</p>')
    body.append("<h3>Verdicts per layer</h3>")
    body.append(_html_table(header, [[r[h] for h in header] for r in rows], [_row_class(r) for r in rows],
                            cell_classes={6: "msg", 7: "hint"}))
    body.append("<h3>Figures</h3>")
    for figure in report.figures:
        if figure.svg is None:
            body.append(f'<p class="note"><b>{_e(figure.title)}</b>: {_e(figure.note)}</p>')
            continue
        body.append(f'<figure data-figure="{_e(figure.key)}"><figcaption>{_e(figure.title)}</figcaption>'
                    f'{figure.svg}')
        if figure.note:
            body.append(f'<p class="note">{_e(figure.note)}</p>')
        body.append("</figure>")
    body.append("<h3>Alerts</h3>")
    if run.alerts.empty:
        body.append("<p>No alerts.</p>")
    else:
        columns, alert_rows, note = _alert_table(run.alerts)
        classes = [r[4] for r in alert_rows]
        body.append(_html_table(columns, alert_rows, classes, cell_classes={7: "msg", 8: "hint"}))
        if note:
            body.append(f'<p class="note">{_e(note)}</p>')
    body.append("</section>")
    return "\n".join(body)


def _page_head(title: str) -> list[str]:
    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]


def _report_title(log_dir: str) -> str:
    return f"gradwatch report: {os.path.basename(os.path.abspath(log_dir))}"


def _comparison(all_verdicts: Sequence[RunVerdicts], links: dict[int, str]) -> list[str]:
    header, rows = comparison_rows(all_verdicts)
    row_class = {"diverged": "error", "errors": "error", "warnings": "warning", "healthy": "healthy"}
    classes = [row_class.get(row[1], "") for row in rows]
    return ["<h2>Comparison of runs</h2>",
            "<p>Per run: its headline (the first problem and whether it lasted), then per alert kind the "
            "layers with that problem (how many are still active at the end).</p>",
            _html_table(header, rows, classes, links=links)]


def render_html(reports: Sequence[RunReport], log_dir: str) -> str:
    """The whole report as one self-contained HTML document."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = _page_head(_report_title(log_dir))
    parts.append(f"<p>{len(reports)} run(s) under <code>{_e(os.path.abspath(log_dir))}</code>; "
                 f"generated {_e(stamp)} by gradwatch {_e(__version__)}.</p>")
    if len(reports) > 1:
        parts += _comparison([r.verdicts for r in reports], {i: f"#run-{i}" for i in range(len(reports))})
    for i, report in enumerate(reports):
        parts.append(_html_run(report, f"run-{i}", "h2"))
    parts.append("</body></html>")
    return "\n".join(parts)


def render_index(all_verdicts: Sequence[RunVerdicts], log_dir: str, pages: Sequence[str]) -> str:
    """The index page of a report of many runs: the comparison, each run linking to its own page."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = _page_head(_report_title(log_dir))
    parts.append(f"<p>{len(all_verdicts)} runs under <code>{_e(os.path.abspath(log_dir))}</code>; "
                 f"generated {_e(stamp)} by gradwatch {_e(__version__)}. Each run's verdicts, figures and "
                 "alerts are on its own page (the run's name links to it).</p>")
    parts += _comparison(all_verdicts, dict(enumerate(pages)))
    parts.append("</body></html>")
    return "\n".join(parts)


def render_run_page(report: RunReport, log_dir: str, index: str) -> str:
    """One run's page of a report of many runs, linking back to the ``index`` page."""
    parts = _page_head(_report_title(log_dir))
    parts.append(f'<p><a href="{_e(index)}">← all runs</a></p>')
    parts.append(_html_run(report, "run", "h2"))
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- Markdown


def _md_cell(text: object) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(reports: Sequence[RunReport], log_dir: str, output: str) -> str:
    """The report as Markdown; writes the PNGs into ``<output stem>_files/`` and links them."""
    stem = os.path.splitext(os.path.basename(output))[0]
    files_dir = os.path.join(os.path.dirname(os.path.abspath(output)), f"{stem}_files")
    os.makedirs(files_dir, exist_ok=True)
    title = f"gradwatch report: {os.path.basename(os.path.abspath(log_dir))}"
    parts = [f"# {_md_cell(title)}", "",
             f"{len(reports)} run(s) under `{_md_cell(os.path.abspath(log_dir))}`, gradwatch {__version__}.",
             ""]
    if len(reports) > 1:
        header, rows = comparison_rows([r.verdicts for r in reports])
        parts += ["## Comparison of runs", "", _md_table(header, rows), ""]
    header = ["layer", "verdict", "severity", "first step", "last step", "status", "evidence", "hint"]
    for i, report in enumerate(reports):
        v = report.verdicts
        parts += [f"## {_md_cell(v.run.name)}", "", _md_cell(_run_facts(v.run)) + ".", ""]
        parts += ["### Verdicts per layer", ""]
        parts += [_md_table(header, [[r[h] for h in header] for r in verdict_rows(v)]), "", "### Figures", ""]
        for figure in report.figures:
            if figure.svg is None:
                parts += [f"*{_md_cell(figure.title)}*: {_md_cell(figure.note)}", ""]
                continue
            name = f"run{i}-{figure.key}.svg"
            with open(os.path.join(files_dir, name), "w", encoding="utf-8") as f:
                f.write(figure.svg)
            parts += [f"![{_md_cell(figure.title)}]({stem}_files/{name})", ""]
            if figure.note:
                parts += [f"*{_md_cell(figure.note)}*", ""]
        parts += ["### Alerts", ""]
        if v.run.alerts.empty:
            parts += ["No alerts.", ""]
        else:
            columns, rows, note = _alert_table(v.run.alerts)
            parts += [_md_table(columns, rows), ""] + ([f"*{note}*", ""] if note else [])
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry point


def default_output(log_dir: str | os.PathLike[str], fmt: str) -> str:
    return os.path.join(os.fspath(log_dir), f"report.{fmt}")


def build_report(
    log_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    fmt: str = "html",
    progress: bool | None = None,
    max_lines: int = MAX_LINES,
    source: str = "auto",
) -> tuple[str, list[RunVerdicts]]:
    """Writes the report of every run under ``log_dir`` and returns its path and the verdicts.

    Args:
        log_dir: a run directory, or a directory holding several runs in subdirectories.
        output: the file to write (default ``LOG_DIR/report.html`` or ``.md``).
        fmt: ``"html"`` (self-contained) or ``"md"`` (PNGs in ``<stem>_files/`` beside it).
        progress: show a progress bar on stderr; None: only on a TTY or for large runs.
        max_lines: layers drawn at most in each line plot.
        source: read CSV files or TensorBoard events ("auto": CSV when present).

    Raises:
        GradwatchDataError: no run, or unreadable data (the message says which file and why).
        ValueError: an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}; received {fmt!r}.")
    log_dir = os.fspath(log_dir)
    output = os.fspath(output) if output is not None else default_output(log_dir, fmt)
    runs = discover_runs(log_dir, source)
    bar = _bar_for(runs, progress, 4 + FIGURES_PER_RUN)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with bar.running():
        all_verdicts = require_data(
            [compute_verdicts(load_run(name, path, bar.step, source)) for name, path in runs], log_dir)
        if fmt == "html" and len(all_verdicts) > INLINE_RUNS:
            _write_pages(all_verdicts, log_dir, output, bar.step, max_lines)
            return output, all_verdicts
        reports = [RunReport(v, run_figures(v, bar.step, max_lines)) for v in all_verdicts]
    text = render_html(reports, log_dir) if fmt == "html" else render_markdown(reports, log_dir, output)
    _write_text(output, text)
    return output, all_verdicts


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_pages(all_verdicts: Sequence[RunVerdicts], log_dir: str, output: str,
                 step: Callable[[str], None], max_lines: int) -> None:
    """A report of many runs: ``output`` is the index, each run a page in ``<stem>_files/`` (its
    figures made and written one run at a time)."""
    stem = os.path.splitext(os.path.basename(output))[0]
    files_dir = os.path.join(os.path.dirname(os.path.abspath(output)), f"{stem}_files")
    os.makedirs(files_dir, exist_ok=True)
    pages = [f"{stem}_files/run-{i:04d}.html" for i in range(len(all_verdicts))]
    back = f"../{os.path.basename(output)}"
    for verdicts, page in zip(all_verdicts, pages):
        report = RunReport(verdicts, run_figures(verdicts, step, max_lines))
        _write_text(os.path.join(files_dir, os.path.basename(page)), render_run_page(report, log_dir, back))
    _write_text(output, render_index(all_verdicts, log_dir, pages))


# --------------------------------------------------------------------------- terminal summary


def print_summary(all_verdicts: Sequence[RunVerdicts], console) -> None:  # console: rich.console.Console
    """Prints one verdict table per run (and the hints of the kinds raised) to a rich console."""
    from rich.table import Table
    from rich.text import Text

    styles = {"error": "bold red", "warning": "yellow", "healthy": "green", "recovered": "dim",
              "diverged": "bold red"}
    header = ["layer", "verdict", "severity", "first step", "last step", "status", "evidence"]
    for v in all_verdicts:
        state = v.state
        # the headline on a line of its own: a table title is cut to the table's width
        console.print(Text(f"{v.run.name}: {state}: {headline(v)}", style=styles.get(state.rstrip("s"), ""),
                           overflow="fold"))
        table = Table(show_lines=False)
        for column in header:
            table.add_column(column, overflow="fold", no_wrap=column in ("verdict", "severity"))
        for row in verdict_rows(v):
            table.add_row(*(Text(row[h]) for h in header), style=styles.get(_row_class(row), ""))
        console.print(table)
        hints: dict[str, str] = {}
        for problem in v.problems:
            hints.setdefault(kind_label(problem.kind), problem.hint)
        for label, hint in hints.items():
            if hint:
                console.print(Text(f"  hint ({label}): {hint}"))
    failing = [v.run.name for v in all_verdicts if v.errors_raised or v.divergence is not None]
    if failing:
        console.print(Text(f"{len(failing)} of {len(all_verdicts)} run(s) diverged or raised an error alert: "
                           f"{', '.join(failing)}", style="bold red"))
    else:
        console.print(Text(f"{len(all_verdicts)} run(s): no error alert raised.", style="green"))


def summary_text(all_verdicts: Sequence[RunVerdicts], width: int = 120) -> str:
    """``print_summary`` as plain text (no colour codes)."""
    from rich.console import Console

    buffer = io.StringIO()
    print_summary(all_verdicts, Console(file=buffer, width=width, color_system=None, soft_wrap=False))
    return buffer.getvalue()
