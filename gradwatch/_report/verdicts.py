"""Per-layer verdicts of a run, from its alerts and layer statistics (pandas only, no TensorFlow).

A verdict says, for every layer, whether it is healthy or which problems it had:
the alert kind, the first and last step it was raised, whether it was still
active at the end of the run or recovered (an ``info`` row of the same kind and
layer clears it; an ``info`` row with no layer clears the kind for every layer),
the evidence from the layer statistics and the hint of the alert.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._interpret.alerts import divergence_since
from gradwatch._io import readers
from gradwatch._io.schema import (
    ALERT_KINDS,
    LAYERS_FILE,
    WINDOWS_FILE,
    GradwatchDataError,
    SchemaVersionError,
)

#: The layer-statistics columns the report and the verdicts use (the rest of layers.csv is dropped).
LAYER_VALUE_COLUMNS: tuple[str, ...] = (
    "l2_mean", "l2_max", "nonfinite", "grad_steps", "clip_fraction",
    "update_ratio", "update_cos", "dead_frac", "no_signal_frac",
)
#: The windows.csv columns used.
WINDOW_VALUE_COLUMNS: tuple[str, ...] = (
    "steps", "loss", "global_l2", "nonfinite_steps", "first_nonfinite_step", "clip_fraction",
)
#: Clipping that changed the gradient on at least this share of the steps ...
CLIP_MOST = 0.5
#: ... over at least this many steps is a finding: the bound, not the optimizer, sets the step size.
CLIP_LONG_STEPS = 20
#: The kind of that finding (a verdict of the report, not an alert kind of alerts.csv).
CLIPPING_KIND = "clipping"

#: How a layer-less alert (e.g. a non-finite loss) is shown.
MODEL_LABEL = "(whole model)"
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
KIND_LABELS: dict[str, str] = {
    "vanishing_gradient": "vanishing",
    "exploding_gradient": "exploding",
    "dead_relu": "dead units",
    "nonfinite_gradient": "non-finite",
    "no_gradient": "no gradient",
    "update_ratio": "update ratio",
    "update_mismatch": "update mismatch",
    "no_learning_signal": "no learning signal",
    CLIPPING_KIND: "clipping on most steps",
}
CLIPPING_HINT = (
    "Clipping fires on most steps: the bound, not the learning rate, sets every step's size. Lower the "
    "learning rate (or warm it up), or raise the clip bound until it fires only on rare spikes."
)


def kind_label(kind: str) -> str:
    """The short human name of an alert kind."""
    return KIND_LABELS.get(kind, kind.replace("_", " "))


def layer_label(layer: str) -> str:
    """The name shown for a layer (the layer-less alerts get ``MODEL_LABEL``)."""
    return layer if layer else MODEL_LABEL


@dataclasses.dataclass
class RunFrames:
    """One run as the report reads it: its run.json and the frames it needs (values as float32)."""

    name: str  # path relative to the LOG_DIR given; LOG_DIR's own name when it is the run itself
    path: str
    meta: dict[str, Any]
    layers: pd.DataFrame  # step, layer + LAYER_VALUE_COLUMNS (layers.csv rows only)
    windows: pd.DataFrame  # step + WINDOW_VALUE_COLUMNS
    alerts: pd.DataFrame  # the alerts.csv columns
    layer_order: list[str]  # model order, input first


@dataclasses.dataclass
class Problem:
    """One alert kind raised on one layer over the run."""

    layer: str
    kind: str
    severity: str  # the worst severity raised
    first_step: int
    last_step: int  # step of the last warning/error row
    raised: int  # warning/error rows (first alert + reminders)
    active: bool  # still active at the end of the run
    cleared_step: int | None  # step of the info row that cleared it (None while active)
    value: float  # of the last warning/error row
    threshold: float
    message: str
    hint: str
    evidence: str = ""

    diverged_step: int | None = None  # the run diverged at this step and this problem never cleared

    @property
    def status(self) -> str:
        if self.active and self.diverged_step is not None:
            return f"diverged at step {self.diverged_step}, never recovered"
        return "active at end" if self.active else f"recovered at step {self.cleared_step}"


@dataclasses.dataclass
class Divergence:
    """A run whose gradients (or loss) went non-finite and stayed so to its last window."""

    step: int  # first non-finite step of the last unbroken stretch of non-finite windows
    last_step: int  # the run's last step


@dataclasses.dataclass
class RunVerdicts:
    """The verdicts of one run: its problems, in model order, and the healthy layers."""

    run: RunFrames
    problems: list[Problem]
    healthy: dict[str, str]  # layer -> evidence ("median grad norm ...")
    errors_raised: bool  # an alert of severity "error" was raised at some point
    divergence: Divergence | None = None  # the run ended diverged (never recovered)

    @property
    def has_data(self) -> bool:
        """Whether the run wrote a window (files with headers only hold none)."""
        return bool(len(self.run.windows) or len(self.run.layers))

    @property
    def state(self) -> str:
        """"diverged", "errors", "warnings", "healthy", or "no data" (no window written yet)."""
        if self.divergence is not None:
            return "diverged"
        if self.errors_raised:
            return "errors"
        if self.problems:
            return "warnings"
        return "healthy" if self.has_data else "no data"

    def problems_of(self, layer: str) -> list[Problem]:
        return [p for p in self.problems if p.layer == layer]

    def layers_with(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]


# --------------------------------------------------------------------------- discovery and loading


def discover_runs(log_dir: str | os.PathLike[str], source: str = "auto") -> list[tuple[str, str]]:
    """The runs under ``log_dir`` as ``(name, path)``: ``log_dir`` itself (named after its last
    component) when it is a run, else every run directory below it (``readers.list_runs``: sorted,
    names relative to ``log_dir``).

    Raises:
        GradwatchDataError: ``log_dir`` is missing, empty, or holds no gradwatch run.
    """
    log_dir = os.fspath(log_dir)
    names = readers.list_runs(log_dir, source=source)
    if not names:
        if not os.listdir(log_dir):
            raise GradwatchDataError(
                f"{log_dir!r} is empty: no gradwatch run was written there. Pass the log_dir given to "
                "GradientMonitor or Watch."
            )
        raise GradwatchDataError(
            f"No gradwatch run in {log_dir!r} or its subdirectories (source={source!r}): none holds "
            f"{', '.join(readers.CSV_FILES)} or TensorBoard event files with gradwatch summaries. Pass the "
            "log_dir given to GradientMonitor or Watch, or the directory above several runs."
        )
    if names == ["."]:
        return [(os.path.basename(os.path.abspath(log_dir)), log_dir)]
    return [(name, os.path.normpath(os.path.join(log_dir, name))) for name in names]


def _numeric(frame: pd.DataFrame, columns: tuple[str, ...], where: str) -> pd.DataFrame:
    """``frame[columns]`` as float32; a column holding text raises GradwatchDataError."""
    out = {}
    for column in columns:
        if column not in frame.columns:
            out[column] = np.full(len(frame), np.nan, dtype=np.float32)
            continue
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values):
            coerced = pd.to_numeric(values, errors="coerce")
            bad = values[coerced.isna() & values.notna() & (values.astype(str).str.lower() != "nan")]
            if len(bad):
                raise GradwatchDataError(
                    f"{where}: column {column!r} holds non-numeric values (e.g. {str(bad.iloc[0])[:40]!r}); "
                    "the file is corrupt: re-run training or remove the file."
                )
            values = coerced
        with np.errstate(over="ignore"):
            out[column] = values.to_numpy(dtype=np.float64).astype(np.float32)
    return pd.DataFrame(out, index=frame.index)


def _steps(frame: pd.DataFrame, where: str) -> np.ndarray:
    steps = pd.to_numeric(frame["step"], errors="coerce")
    if steps.isna().any():
        bad = frame["step"][steps.isna()].iloc[0]
        raise GradwatchDataError(
            f"{where}: column 'step' holds a non-numeric value ({str(bad)[:40]!r}); the file is corrupt."
        )
    return steps.to_numpy(dtype=np.int64)


def load_run(
    name: str, path: str, on_step: Callable[[str], None] | None = None, source: str = "auto"
) -> RunFrames:
    """Reads the run at ``path`` through ``gradwatch._io.readers`` (``source``: "auto", "csv" or "events"),
    keeping only the columns the report uses (float32 values, categorical layer names). ``on_step``
    is told each part as it is read."""
    tell = on_step or (lambda _: None)
    tell(f"{name}: run.json")
    try:
        meta = readers.read_run(path, source=source)
    except SchemaVersionError:
        raise  # written by a newer gradwatch: nothing of it is read
    except GradwatchDataError:
        meta = {}  # no run.json: the layers are ordered as the rows come
    tell(f"{name}: layer statistics")
    raw = readers.read_stats(path, level="layer", source=source)
    where = os.path.join(path, LAYERS_FILE)
    layers = _numeric(raw, LAYER_VALUE_COLUMNS, where)
    layers.insert(0, "layer", raw["layer"].fillna("").astype(str).astype("category"))
    layers.insert(0, "step", _steps(raw, where))
    del raw
    tell(f"{name}: windows")
    raw_windows = readers.read_windows(path, source=source)
    windows = _numeric(raw_windows, WINDOW_VALUE_COLUMNS, os.path.join(path, WINDOWS_FILE))
    windows.insert(0, "step", _steps(raw_windows, os.path.join(path, WINDOWS_FILE)))
    tell(f"{name}: alerts")
    alerts = readers.read_alerts(path, source=source)
    if len(alerts):
        alerts = alerts.assign(step=_steps(alerts, os.path.join(path, "alerts.csv")))
        alerts[["value", "threshold"]] = _numeric(alerts, ("value", "threshold"), path).astype("float64")
    order = [entry["name"] for entry in meta.get("layers", []) if "name" in entry]
    seen = set(order)
    order += [layer for layer in pd.unique(layers["layer"].astype(str)) if layer not in seen]
    return RunFrames(name, path, meta, layers, windows, alerts, order)


def require_data(all_verdicts: list[RunVerdicts], log_dir: str | os.PathLike[str]) -> list[RunVerdicts]:
    """Returns ``all_verdicts`` when a run wrote a window.

    Raises:
        GradwatchDataError: every run's files hold headers only: there is nothing to judge.
    """
    if all_verdicts and not any(v.has_data for v in all_verdicts):
        names = ", ".join(v.run.name for v in all_verdicts[:6]) + (", ..." if len(all_verdicts) > 6 else "")
        raise GradwatchDataError(
            f"No readable gradwatch data in {os.fspath(log_dir)!r}: no window was written yet "
            f"({len(all_verdicts)} run(s): {names}; their files hold headers only), so there is nothing to "
            "judge. Read it again once training has passed its first log_every steps.")
    return all_verdicts


def load_runs(
    log_dir: str | os.PathLike[str], on_step: Callable[[str], None] | None = None, source: str = "auto"
) -> list[RunFrames]:
    """Every run under ``log_dir`` (see ``discover_runs``), loaded."""
    return [load_run(name, path, on_step, source) for name, path in discover_runs(log_dir, source)]


# --------------------------------------------------------------------------- verdicts


def _problems_from_alerts(alerts: pd.DataFrame,
                          nonfinite_steps: frozenset[int] = frozenset()) -> list[Problem]:
    """Walks the alerts in step order: warning/error rows open (or re-open) a problem, info rows close it.

    An info row dated in a window with a non-finite step (``nonfinite_steps``: those windows' last
    steps) clears nothing: files written before gradwatch 0.3 cleared alerts on NaN norms read as 0."""
    problems: dict[tuple[str, str], Problem] = {}
    if alerts.empty:
        return []
    ordered = alerts.sort_values("step", kind="stable")
    for row in ordered.itertuples(index=False):
        key = (row.kind, row.layer)
        step = int(row.step)
        if row.severity == "info" and step in nonfinite_steps:
            continue
        if row.severity == "info":
            targets = [p for k, p in problems.items() if k[0] == row.kind and (not row.layer or k == key)]
            for problem in targets:
                if problem.active:
                    problem.active, problem.cleared_step = False, step
            continue
        problem = problems.get(key)
        if problem is None:
            problems[key] = Problem(
                row.layer, row.kind, row.severity, step, step, 1, True, None,
                float(row.value), float(row.threshold), row.message, row.hint,
            )
            continue
        problem.last_step, problem.raised = step, problem.raised + 1
        problem.active, problem.cleared_step = True, None
        if SEVERITY_RANK.get(row.severity, 1) > SEVERITY_RANK.get(problem.severity, 1):
            problem.severity = row.severity
        problem.value, problem.threshold = float(row.value), float(row.threshold)
        problem.message = row.message
        problem.hint = row.hint or problem.hint
    return list(problems.values())


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _layer_evidence(problem: Problem, rows: pd.DataFrame, windows: pd.DataFrame) -> str:
    """What the layer statistics show for ``problem`` (``rows``: the layer's rows)."""
    end = problem.cleared_step if problem.cleared_step is not None else np.inf
    during = rows[(rows["step"] >= problem.first_step) & (rows["step"] <= end)]
    parts: list[str] = []
    kind = problem.kind

    def finite(column: str) -> pd.Series:
        values = during[column]
        return values[np.isfinite(values)]

    if kind == "vanishing_gradient" and len(finite("l2_mean")):
        median = float(finite("l2_mean").median())
        parts.append(f"median grad norm {_fmt(median)} from step {problem.first_step}")
    elif kind == "exploding_gradient" and len(finite("l2_max")):
        values = finite("l2_max")
        at = int(during.loc[values.idxmax(), "step"])
        parts.append(f"max grad norm {_fmt(float(values.max()))} (window ending at step {at})")
    elif kind in ("dead_relu", "no_learning_signal"):
        column = "dead_frac" if kind == "dead_relu" else "no_signal_frac"
        values = finite(column)
        # only when the column is what the alert's rule read (not a kernel silent on every step)
        if len(values) and values.max() >= problem.threshold:
            parts.append(f"{column} up to {values.max():.0%}, last {values.iloc[-1]:.0%}")
    elif kind == "nonfinite_gradient":
        if problem.layer and len(rows):
            bad = rows[rows["nonfinite"] > 0]
            if len(bad):
                parts.append(f"{int(bad['nonfinite'].sum())} non-finite entries in {len(bad)} windows, "
                             f"first window ending at step {int(bad['step'].iloc[0])}")
        else:
            bad = windows[windows["nonfinite_steps"] > 0]
            if len(bad):
                parts.append(f"{int(bad['nonfinite_steps'].sum())} non-finite steps in {len(bad)} windows")
    elif kind == "no_gradient" and len(rows):
        empty = int((rows["grad_steps"] == 0).sum())
        parts.append(f"no gradient in {empty} of {len(rows)} windows")
    elif kind == "update_ratio" and len(finite("update_ratio")):
        parts.append(f"median update/weight ratio {_fmt(float(finite('update_ratio').median()))}")
    elif kind == "update_mismatch" and len(finite("update_cos")):
        parts.append(f"median update/gradient cosine {float(finite('update_cos').median()):.2f}")
    # the non-finite and no-gradient rows' value is a count with no threshold: their message says it
    if problem.threshold != 0 and (math.isfinite(problem.value) or math.isfinite(problem.threshold)):
        parts.append(f"alert value {_fmt(problem.value)} vs threshold {_fmt(problem.threshold)}")
    if problem.raised > 1:
        parts.append(f"raised {problem.raised} times")
    return "; ".join(parts)


def _healthy_evidence(rows: pd.DataFrame) -> str:
    norms = rows["l2_mean"][np.isfinite(rows["l2_mean"])]
    return f"median grad norm {_fmt(float(norms.median()))}" if len(norms) else "no statistics"


def find_divergence(windows: pd.DataFrame) -> Divergence | None:
    """The run's divergence: every step non-finite from the step returned to its last (more than
    one step; see ``alerts.divergence_since``), else None."""
    since = None
    columns = ("step", "steps", "nonfinite_steps", "first_nonfinite_step")
    for values in zip(*(windows[c].tolist() for c in columns)):
        since = divergence_since(since, dict(zip(columns, values)))
    if since is None or windows.empty or since >= int(windows["step"].iloc[-1]):
        return None
    return Divergence(since, int(windows["step"].iloc[-1]))


def clipping_finding(windows: pd.DataFrame) -> Problem | None:
    """A warning when clipping changed the gradient on most steps (``CLIP_MOST``) for long
    (``CLIP_LONG_STEPS``): the bound then sets the step size, not the learning rate."""
    fraction = windows["clip_fraction"].to_numpy(dtype=np.float64)
    steps = windows["steps"].to_numpy(dtype=np.float64)
    known = np.isfinite(fraction) & np.isfinite(steps)
    total = float(steps[known].sum())
    if total < CLIP_LONG_STEPS:
        return None
    clipped = float((fraction[known] * steps[known]).sum())
    share = clipped / total
    if share < CLIP_MOST:
        return None
    heavy = np.flatnonzero(known & (fraction >= CLIP_MOST))
    window_steps = windows["step"].to_numpy()
    first_step = int(window_steps[heavy[0]] - steps[heavy[0]] + 1)
    last = heavy[-1]
    active = last == len(windows) - 1
    cleared = None if active else int(window_steps[last + 1])
    message = (f"Clipping changed the gradient on {share:.0%} of the steps ({int(round(clipped))} of "
               f"{int(total)}).")
    evidence = f"clipped on {int(round(clipped))} of {int(total)} steps ({share:.0%})"
    return Problem("", CLIPPING_KIND, "warning", first_step, int(window_steps[last]), 1, active, cleared,
                   share, CLIP_MOST, message, CLIPPING_HINT, evidence)


def headline(verdicts: RunVerdicts) -> str:
    """One line per run: the first problem (kind, layer, step), and whether it lasted, e.g.
    "exploding at 'hidden' step 4 → NaN at step 6, diverged (never recovered)"."""
    if verdicts.state == "no data":
        return "no window written yet: nothing to judge"
    problems = sorted(verdicts.problems, key=lambda p: p.first_step)  # stable: model order on ties
    divergence = verdicts.divergence
    if not problems:
        return "no problem found"
    first = problems[0]
    where = f" at {first.layer!r}" if first.layer else ""
    text = f"{kind_label(first.kind)}{where} step {first.first_step}"
    if first.kind == "nonfinite_gradient":
        text = f"NaN/Inf{f' in {first.layer!r}' if first.layer else ''} at step {first.first_step}"
    elif first.kind == CLIPPING_KIND:
        text = f"clipping changed the gradient on {first.value:.0%} of the steps from step {first.first_step}"
    if divergence is not None:
        if first.kind != "nonfinite_gradient" or divergence.step != first.first_step:
            text += f" → NaN at step {divergence.step}"
        text += f", diverged (never recovered; NaN to step {divergence.last_step})"
    elif first.active:
        text += ", still active at the end"
    else:
        text += f", recovered at step {first.cleared_step}"
    if first.raised > 1 and divergence is None:
        text += f" (raised {first.raised} times)"
    if len(problems) > 1:
        text += f"; {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}"
    return text


def compute_verdicts(run: RunFrames) -> RunVerdicts:
    """The verdict of every layer of ``run``: problems from its alerts, evidence from its statistics."""
    windows = run.windows
    unclean = frozenset(windows["step"][windows["nonfinite_steps"].to_numpy() > 0].tolist())
    problems = _problems_from_alerts(run.alerts, unclean)
    divergence = find_divergence(windows)
    if divergence is not None:
        for problem in problems:
            if problem.active and problem.kind in ("nonfinite_gradient", "exploding_gradient"):
                problem.diverged_step = divergence.step
    groups = {str(k): g for k, g in run.layers.groupby("layer", observed=True, sort=False)}
    empty = run.layers.iloc[:0]
    for problem in problems:
        problem.evidence = _layer_evidence(problem, groups.get(problem.layer, empty), run.windows)
    position = {layer: i for i, layer in enumerate(run.layer_order)}
    problems.sort(key=lambda p: (position.get(p.layer, -1 if not p.layer else len(position)),
                                 ALERT_KINDS.index(p.kind) if p.kind in ALERT_KINDS else len(ALERT_KINDS)))
    troubled = {p.layer for p in problems}
    judged = len(run.windows) or len(run.layers)  # no layer is healthy before a window
    healthy = {
        layer: _healthy_evidence(groups.get(layer, empty))
        for layer in run.layer_order
        if layer not in troubled and judged
    }
    errors = bool(len(run.alerts)) and bool((run.alerts["severity"] == "error").any())
    clipping = clipping_finding(windows)
    if clipping is not None:
        problems.append(clipping)
    return RunVerdicts(run, problems, healthy, errors, divergence)


def problem_pairs(verdicts: RunVerdicts) -> set[tuple[str, str]]:
    """The ``(layer, kind)`` pairs with a problem (the empty layer for layer-less alerts)."""
    return {(p.layer, p.kind) for p in verdicts.problems}


def interesting_layers(verdicts: RunVerdicts, limit: int) -> list[str]:
    """Up to ``limit`` layers to draw line plots for: layers with problems first (worst severity first),
    then the layers whose median gradient norm is farthest (in log10) from the median layer's."""
    run = verdicts.run
    chosen: list[str] = []
    for problem in sorted(verdicts.problems, key=lambda p: -SEVERITY_RANK.get(p.severity, 1)):
        if problem.layer and problem.layer not in chosen:
            chosen.append(problem.layer)
    norms = run.layers[np.isfinite(run.layers["l2_mean"]) & (run.layers["l2_mean"] > 0)]
    medians = np.log10(norms.groupby("layer", observed=True)["l2_mean"].median().astype("float64"))
    if len(medians):
        distance = (medians - medians.median()).abs().sort_values(ascending=False, kind="stable")
        chosen += [str(layer) for layer in distance.index if str(layer) not in chosen]
    chosen += [layer for layer in run.layer_order if layer not in chosen]
    order = {layer: i for i, layer in enumerate(run.layer_order)}
    return sorted(chosen[:limit], key=lambda layer: order.get(layer, len(order)))
