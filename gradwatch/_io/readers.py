"""Read a run back into pandas (no TensorFlow needed).

A run directory is read from its CSV files when it has them, else from the
structured ``gradwatch/window`` summaries of its TensorBoard event files
(``source="auto"``; ``"csv"`` or ``"events"`` force one).  Both give the same
DataFrames.  Readers tolerate a torn last line or record (a process killed
mid-write) and keep the later rows when a resumed run wrote the same steps
again.  A directory without gradwatch data of its own whose subdirectories hold
runs (``runs/a``, ``runs/b``, ...) is read as all of them, with a leading
``run`` column (the run's path relative to ``log_dir``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._io import csv_table, tb_format
from gradwatch._io.records import iter_records
from gradwatch._io.schema import (
    ALERT_COLUMNS,
    ALERTS_FILE,
    LAYERS_FILE,
    RUN_FILE,
    STATS_COLUMNS,
    STATS_FILE,
    TEXT_COLUMNS,
    WINDOW_COLUMNS,
    WINDOWS_FILE,
    GradwatchDataError,
    check_schema_version,
    groups_of,
    nan_norms_of_old_rows,
    segment_ranges,
    segments_of_run,
)

logger = logging.getLogger("gradwatch")

LEVELS = ("variable", "layer")
SOURCES = ("auto", "csv", "events")
CSV_FILES = (WINDOWS_FILE, STATS_FILE, LAYERS_FILE, ALERTS_FILE)
RUN_COLUMN = "run"

# ------------------------------------------------------------------ CSV


def _read_csv(path: str, columns: tuple[str, ...], keys: list[str]) -> pd.DataFrame:
    return _dedupe_sort(csv_table.read_table(path, columns), keys)


def _dedupe_sort(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if keys and len(frame):
        frame = frame.drop_duplicates(subset=keys, keep="last")
        frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    return frame


def _has_csv(log_dir: str) -> bool:
    return any(os.path.exists(os.path.join(log_dir, name)) for name in CSV_FILES)


# ------------------------------------------------------------- event files

_EVENT_NAME = re.compile(r"tfevents\.(\d+)")


def event_files(log_dir: str) -> list[str]:
    """The TensorBoard event files directly in ``log_dir``, oldest first: by the wall time of their
    first event (the writer's creation), else by the time in their name."""
    paths = [os.path.join(log_dir, n) for n in os.listdir(log_dir) if ".tfevents." in n]
    return sorted((p for p in paths if os.path.isfile(p)), key=_created)


def _created(path: str) -> tuple[float, str]:
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    name = os.path.basename(path)
    for record in iter_records(path):
        try:
            return event_pb2.Event.FromString(record).wall_time, name
        except DecodeError:
            break
    match = _EVENT_NAME.search(name)
    return float(match.group(1)) if match else 0.0, name


_MARKS = (tb_format.WINDOW_TAG.encode(), tb_format.RUN_TAG.encode())


def _gradwatch_values(path: str) -> Iterator[tuple[str, int, bytes]]:
    """(tag, step, payload) of the gradwatch window and run summaries of one event file."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    for record in iter_records(path):
        if _MARKS[0] not in record and _MARKS[1] not in record:
            continue
        try:
            event = event_pb2.Event.FromString(record)
        except DecodeError:
            logger.warning("gradwatch: skipped an unreadable event in %s.", path)
            continue
        for value in event.summary.value:
            if value.tag in (tb_format.WINDOW_TAG, tb_format.RUN_TAG) and value.tensor.string_val:
                yield value.tag, event.step, value.tensor.string_val[0]


def _has_gradwatch_events(log_dir: str) -> bool:
    for path in event_files(log_dir):
        for _ in _gradwatch_values(path):
            return True
    return False


_TABLES = {"window": WINDOW_COLUMNS, **tb_format.TABLE_COLUMNS}
_CHUNK_ROWS = 1 << 16


class _Column:
    """One column of a table, converted chunk by chunk (no Python object per cell is kept).

    Values are decoded as ``tb_format.decode_window`` does and typed as ``pd.read_csv`` types
    the CSV file: text columns as strings (missing: ""), int64 when every value is an integer,
    else float64 ("nan"/"inf"/"-inf" strings and null -> floats).
    """

    def __init__(self, name: str):
        self.name = name
        self.text = name in TEXT_COLUMNS
        self.parts: list[np.ndarray] = []  # float64 / int64 values, or text codes into self.words
        self.words: dict[str, int] = {}

    def add(self, values: np.ndarray) -> None:
        if self.text:
            codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)
            words = ["" if w is None or w is np.nan else str(w) for w in uniques]
            mapping = np.array([self.words.setdefault(w, len(self.words)) for w in words], dtype=np.int64)
            self.parts.append(mapping[codes] if len(codes) else np.empty(0, np.int64))
            return
        if values.dtype in (np.int64, np.float64):
            self.parts.append(values)
            return
        kind = pd.api.types.infer_dtype(values, skipna=False)
        if kind == "integer":
            self.parts.append(values.astype(np.int64))
            return
        if kind != "floating":
            values = values.copy()
            values[np.equal(values, None)] = np.nan
        try:
            self.parts.append(values.astype(np.float64))
        except (TypeError, ValueError) as error:
            raise GradwatchDataError(
                f"the gradwatch summaries hold a non-numeric value in column {self.name!r} ({error})."
            ) from error

    def values(self, order: np.ndarray) -> Any:
        if self.text:
            words = np.empty(len(self.words), dtype=object)
            words[:] = list(self.words)
            return pd.array(words[np.concatenate(self.parts)[order]], dtype="str")
        if all(part.dtype == np.int64 for part in self.parts):
            return np.concatenate(self.parts)[order]
        return np.concatenate([part.astype(np.float64) for part in self.parts])[order]


class _EventTable:
    """One table of a run's window summaries, streamed into typed column chunks, resumes resolved.

    The bulk tables (stats, layers) take a fast path: their rows' JSON text
    (``tb_format.WindowPayload.table_rows_text``) becomes CSV lines parsed by pandas' C parser;
    a window whose rows hold JSON escapes, or a chunk whose parse does not give the expected
    rows, goes through ``json`` instead.
    """

    def __init__(self, table: str):
        self.table = table
        self.columns = _TABLES[table]
        self.data = {c: _Column(c) for c in self.columns}
        self.seqs: list[np.ndarray] = []  # the window (seq) of each row, by chunk
        self.rows: list[list[Any]] = []  # rows decoded by json, not yet converted
        self.rows_seq: list[int] = []
        self.lines: list[bytes] = []  # fast path: the JSON text of each window's rows
        self.lines_seq: list[tuple[int, int]] = []  # (seq, rows)
        self.pending = 0
        self.windows: list[tuple[int, int]] = []  # (step, first_step) by seq
        self.run_info: dict[str, Any] | None = None
        self._bulk = table in ("stats", "layers")

    def add(self, payload: bytes, where: str) -> None:
        try:
            step, first_step, rows, lines = self._decode(payload)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            logger.warning("gradwatch: skipped an unreadable window summary in %s (%s).", where, error)
            return
        seq = len(self.windows)
        self.windows.append((step, first_step))
        if lines is not None:
            count = lines.count(b"],[") + 1 if lines else 0
            self.lines.append(lines)
            self.lines_seq.append((seq, count))
            self.pending += count
        else:
            self.rows += rows
            self.rows_seq += [seq] * len(rows)
            self.pending += len(rows)
        if self.pending >= _CHUNK_ROWS:
            self._flush()

    def _decode(self, payload: bytes) -> tuple[int, int, list[list[Any]], bytes | None]:
        """(step, first_step, rows, None), or for a bulk table whose text can go to pandas as it
        is, (step, first_step, [], the rows' JSON text)."""
        decoded = tb_format.WindowPayload(payload)
        window = decoded.window
        step, first_step = int(window["step"]), decoded.first_step
        if self.table == "window":
            return step, first_step, [[window.get(c) for c in self.columns]], None
        if self._bulk:
            lines = decoded.table_rows_text(self.table, self.columns)
            if lines is not None:
                return step, first_step, [], lines
        return step, first_step, decoded.table(self.table, self.columns)[1], None

    def _flush(self) -> None:
        if self.lines:
            self._flush_lines()
        if self.rows:
            block = np.empty((len(self.rows), len(self.columns)), dtype=object)
            block[:] = self.rows
            for j, c in enumerate(self.columns):
                self.data[c].add(block[:, j])
            self.seqs.append(np.asarray(self.rows_seq, dtype=np.int64))
            self.rows, self.rows_seq = [], []
        self.pending = 0

    def _flush_lines(self) -> None:
        expected = sum(count for _, count in self.lines_seq)
        text = b"\n".join(line.replace(b"],[", b"\n") for line in self.lines if line)
        frame = None
        if text:
            numeric = [c for c in self.columns if c not in TEXT_COLUMNS]
            try:
                frame = pd.read_csv(
                    io.BytesIO(text), header=None, names=list(self.columns), keep_default_na=False,
                    na_values={c: ["null", "nan"] for c in numeric},
                    dtype={c: str for c in self.columns if c in TEXT_COLUMNS},
                )
            except (pd.errors.ParserError, ValueError):
                frame = None
            if frame is not None and (
                len(frame) != expected
                or any(frame[c].dtype not in (np.int64, np.float64) for c in numeric)
                or any((frame[c] == "null").any() for c in self.columns if c in TEXT_COLUMNS)
            ):
                frame = None  # a name held "],[", or a null text: decode these windows with json
        if frame is None and text:
            for line, (seq, _) in zip(self.lines, self.lines_seq):
                rows = json.loads(b"[[" + line + b"]]") if line else []
                self.rows += rows
                self.rows_seq += [seq] * len(rows)
        elif frame is not None:
            for c in self.columns:
                self.data[c].add(frame[c].to_numpy())
            self.seqs.append(np.repeat([s for s, _ in self.lines_seq], [n for _, n in self.lines_seq]))
        self.lines, self.lines_seq = [], []

    def _surviving(self) -> np.ndarray:
        """Window seqs kept: a window whose first step is at or before a step already written
        supersedes every earlier window at or after that first step (the later write wins)."""
        kept: list[tuple[int, int]] = []  # (step, seq)
        for seq, (step, first_step) in enumerate(self.windows):
            if kept and kept[-1][0] >= first_step:
                kept = [k for k in kept if k[0] < first_step]
            kept.append((step, seq))
        return np.asarray([seq for _, seq in kept], dtype=np.int64)

    def frame(self) -> pd.DataFrame:
        self._flush()
        if not self.seqs:
            return pd.DataFrame({c: pd.Series(dtype="float64") for c in self.columns})
        seqs = np.concatenate(self.seqs)
        order = np.argsort(seqs, kind="stable")  # rows in the order they were written
        order = order[np.isin(seqs[order], self._surviving())]
        return pd.DataFrame({c: self.data[c].values(order) for c in self.columns})


def _load_events(log_dir: str, table: str | None) -> _EventTable:
    """Reads every event file of ``log_dir`` (oldest first); ``table=None`` reads the run info only."""
    loaded = _EventTable(table or "window")
    for path in event_files(log_dir):
        for tag, _, payload in _gradwatch_values(path):
            if tag == tb_format.RUN_TAG:
                try:
                    run_info = tb_format.decode_run(payload)
                except ValueError as error:
                    logger.warning("gradwatch: skipped an unreadable run summary in %s (%s).", path, error)
                    continue
                check_schema_version(run_info, f"the '{tb_format.RUN_TAG}' summary of {path}")
                loaded.run_info = run_info
            elif table is not None:
                loaded.add(payload, path)
    return loaded


# ------------------------------------------------------------ directories


def _require_dir(log_dir: str | os.PathLike[str]) -> str:
    log_dir = os.fspath(log_dir)
    if not os.path.exists(log_dir):
        raise GradwatchDataError(
            f"Log directory {log_dir!r} does not exist. Pass the log_dir given to GradientMonitor or Watch."
        )
    if not os.path.isdir(log_dir):
        raise GradwatchDataError(f"{log_dir!r} is a file, not a directory: pass the run's log_dir.")
    return log_dir


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; received {source!r}.")


def _has_data(log_dir: str, source: str) -> bool:
    if source in ("auto", "csv") and _has_csv(log_dir):
        return True
    return source in ("auto", "events") and _has_gradwatch_events(log_dir)


def list_runs(log_dir: str | os.PathLike[str], source: str = "auto") -> list[str]:
    """Lists the gradwatch runs in ``log_dir`` and its subdirectories (recursively).

    Args:
        log_dir: the directory to search.
        source: ``"auto"`` (CSV files when present, else TensorBoard event files),
            ``"csv"`` or ``"events"``.

    Returns:
        The runs' paths relative to ``log_dir`` ("." for ``log_dir`` itself), sorted.
    """
    _check_source(source)
    log_dir = _require_dir(log_dir)
    runs = []
    for root, dirs, _ in os.walk(log_dir):
        dirs.sort()
        if _has_data(root, source):
            runs.append(os.path.relpath(root, log_dir).replace(os.sep, "/"))
    return sorted(runs)


_LOOKED_FOR = {
    "csv": ", ".join(CSV_FILES),
    "events": f"TensorBoard event files (events.out.tfevents.*) holding '{tb_format.WINDOW_TAG}' summaries",
}
_LOOKED_FOR["auto"] = f"{_LOOKED_FOR['csv']}, or {_LOOKED_FOR['events']}"


def _no_data_error(log_dir: str, source: str) -> GradwatchDataError:
    entries = sorted(os.listdir(log_dir))
    if not entries:
        return GradwatchDataError(
            f"Log directory {log_dir!r} is empty: no gradwatch run was written there. Check the "
            "log_dir passed to GradientMonitor/Watch, and that training reached its first log_every steps."
        )
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return GradwatchDataError(
        f"No gradwatch data in {log_dir!r} or its subdirectories (source={source!r}): looked for "
        f"{_LOOKED_FOR[source]}; found {len(entries)} entries ({shown}). Pass the log_dir given to "
        "GradientMonitor/Watch, or the directory above several such runs."
    )


def _runs_of(log_dir: str | os.PathLike[str], source: str) -> list[tuple[str | None, str]]:
    """[(None, log_dir)] for a run, else [(relative path, path)] of the runs below it."""
    _check_source(source)
    log_dir = _require_dir(log_dir)
    if _has_data(log_dir, source):
        return [(None, log_dir)]
    runs = list_runs(log_dir, source)
    if not runs:
        raise _no_data_error(log_dir, source)
    return [(rel, os.path.join(log_dir, rel)) for rel in runs]


def _use_csv(run_dir: str, source: str) -> bool:
    return source == "csv" or (source == "auto" and _has_csv(run_dir))


def _per_run(
    log_dir: str | os.PathLike[str], source: str, read_one: Callable[[str, bool], pd.DataFrame]
) -> pd.DataFrame:
    runs = _runs_of(log_dir, source)
    if runs[0][0] is None:
        return read_one(runs[0][1], _use_csv(runs[0][1], source))
    frames = []
    for rel, path in runs:
        frame = read_one(path, _use_csv(path, source))
        frame.insert(0, RUN_COLUMN, pd.Series([rel] * len(frame), dtype="str"))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------ public API


def read_stats(
    log_dir: str | os.PathLike[str], level: str = "variable", source: str = "auto"
) -> pd.DataFrame:
    """Per-window gradient statistics of a run, one row per (window, variable) or layer.

    Args:
        log_dir: the ``log_dir`` given to ``GradientMonitor`` or ``Watch`` (or a
            directory above several runs: then a leading ``run`` column says which).
        level: ``"variable"`` (``stats.csv``) or ``"layer"`` (``layers.csv``:
            the same columns, aggregated in-graph over each layer's variables,
            with ``variable == "*"``).
        source: ``"auto"`` (CSV files when present, else TensorBoard event files),
            ``"csv"`` or ``"events"``.

    Returns:
        A DataFrame with the ``stats.csv`` columns, then ``group`` (from ``run.json``: the
        optimizer that updates the variable, e.g. ``"d_optimizer"``; a layer's is its
        variables', joined by ``+`` if several; ``""`` where unknown), sorted by step
        and model order.

    Raises:
        GradwatchDataError: no gradwatch data in ``log_dir``, or data that is not gradwatch's.
        ValueError: an unknown ``level`` or ``source``.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}; received {level!r}.")
    key = "variable" if level == "variable" else "layer"

    def read_one(run_dir: str, csv: bool) -> pd.DataFrame:
        if csv:
            name = STATS_FILE if level == "variable" else LAYERS_FILE
            path = os.path.join(run_dir, name)
            if not os.path.exists(path):
                raise GradwatchDataError(f"No gradwatch statistics in {run_dir!r}: {name} is missing.")
            frame = _read_csv(path, STATS_COLUMNS, keys=["step", key])
            run_info = _run_json(run_dir)
        else:
            loaded = _load_events(run_dir, "stats" if level == "variable" else "layers")
            frame = _dedupe_sort(loaded.frame(), ["step", key])
            run_info = loaded.run_info
        frame = nan_norms_of_old_rows(frame, check_schema_version(run_info, run_dir))
        groups = groups_of(run_info, level)
        frame = frame.assign(group=[groups.get(name, "") for name in frame[key]])
        return _model_sorted(frame, _model_order(run_info, level), key)

    return _per_run(log_dir, source, read_one)


def read_windows(log_dir: str | os.PathLike[str], source: str = "auto") -> pd.DataFrame:
    """Reads the per-window globals of a run.

    Args:
        log_dir: a run's ``log_dir`` (or a directory above several runs: then a
            leading ``run`` column says which).
        source: ``"auto"`` (CSV files when present, else TensorBoard event files),
            ``"csv"`` or ``"events"``.

    Returns:
        One row per window, in the ``windows.csv`` column order, sorted by step.

    Raises:
        GradwatchDataError: no run there, or one written by a newer gradwatch.
    """

    def read_one(run_dir: str, csv: bool) -> pd.DataFrame:
        if not csv:
            loaded = _load_events(run_dir, "window")
            frame = _dedupe_sort(loaded.frame(), ["step"])
            return nan_norms_of_old_rows(frame, check_schema_version(loaded.run_info, run_dir))
        path = os.path.join(run_dir, WINDOWS_FILE)
        if not os.path.exists(path):
            raise GradwatchDataError(f"No gradwatch windows in {run_dir!r}: {WINDOWS_FILE} is missing.")
        version = check_schema_version(_run_json(run_dir), run_dir)  # refuses a newer gradwatch's run
        return nan_norms_of_old_rows(_read_csv(path, WINDOW_COLUMNS, keys=["step"]), version)

    return _per_run(log_dir, source, read_one)


def read_alerts(log_dir: str | os.PathLike[str], source: str = "auto") -> pd.DataFrame:
    """Reads the alerts of a run.

    Args:
        log_dir: a run's ``log_dir`` (or a directory above several runs: then a
            leading ``run`` column says which).
        source: ``"auto"`` (CSV files when present, else TensorBoard event files),
            ``"csv"`` or ``"events"``.

    Returns:
        One row per alert, in the ``alerts.csv`` column order (empty when none fired).

    Raises:
        GradwatchDataError: no run there, or one written by a newer gradwatch.
    """

    def read_one(run_dir: str, csv: bool) -> pd.DataFrame:
        if csv:
            _run_json(run_dir)  # refuses a run written by a newer gradwatch
            path = os.path.join(run_dir, ALERTS_FILE)
            if not os.path.exists(path):
                if os.path.exists(os.path.join(run_dir, STATS_FILE)):
                    return pd.DataFrame({c: pd.Series(dtype="object") for c in ALERT_COLUMNS})
                raise GradwatchDataError(f"No gradwatch alerts in {run_dir!r}: {ALERTS_FILE} is missing.")
            frame = _read_csv(path, ALERT_COLUMNS, keys=[])
        else:
            frame = _load_events(run_dir, "alerts").frame()
        text_columns = [c for c in ALERT_COLUMNS if c in TEXT_COLUMNS]
        frame[text_columns] = frame[text_columns].astype(object).fillna("").astype(str)
        return frame[list(ALERT_COLUMNS)]

    return _per_run(log_dir, source, read_one)


#: The columns of ``read_segments``.
SEGMENT_COLUMNS: tuple[str, ...] = ("segment", "first_step", "last_step", "reason", "iterations_at_start",
                                    "optimizer", "variables")


def read_segments(log_dir: str | os.PathLike[str], source: str = "auto") -> pd.DataFrame:
    """Reads the segments of a run: each fit whose optimizer restarted at iteration 0, or whose
    watched variables changed, began a new one (a run written before schema 4 is one segment).

    Args:
        log_dir: a run's ``log_dir`` (or a directory above several runs: then a
            leading ``run`` column says which).
        source: ``"auto"``, ``"csv"`` or ``"events"``.

    Returns:
        One row per segment: its number, first and last step, why it began ("start",
        "optimizer_restart", "variables_changed", "append"), the optimizer's iterations at
        its start, the optimizer's class and the number of watched variables.

    Raises:
        GradwatchDataError: no run there, or one written by a newer gradwatch.
    """

    def read_one(run_dir: str, csv: bool) -> pd.DataFrame:
        info = _run_json(run_dir) if csv else _load_events(run_dir, None).run_info
        steps = read_windows(run_dir, source="csv" if csv else "events")["step"].tolist()
        rows = [{"segment": s.get("segment"), "first_step": s.get("first_step"),
                 "last_step": s.get("last_step"),
                 "reason": s.get("reason"), "iterations_at_start": s.get("iterations_at_start"),
                 "optimizer": (s.get("optimizer") or {}).get("class") if isinstance(s.get("optimizer"), dict)
                 else None, "variables": len(s.get("variables") or [])}
                for s in segment_ranges(info, steps)]
        return pd.DataFrame(rows, columns=list(SEGMENT_COLUMNS))

    return _per_run(log_dir, source, read_one)


def read_run(log_dir: str | os.PathLike[str], source: str = "auto") -> dict[str, Any]:
    """Reads a run's ``run.json`` metadata (from the ``gradwatch/run`` summary without CSV files).

    Args:
        log_dir: one run's ``log_dir``.
        source: ``"auto"`` (CSV files when present, else TensorBoard event files),
            ``"csv"`` or ``"events"``.

    Returns:
        The run's description: versions, options, layers and variables.

    Raises:
        GradwatchDataError: no run there, several runs, or one written by a newer gradwatch.
    """
    runs = _runs_of(log_dir, source)
    if runs[0][0] is not None:
        raise GradwatchDataError(
            f"{os.fspath(log_dir)!r} holds {len(runs)} runs ({', '.join(r for r, _ in runs[:6])}); "
            "read_run reads one: pass one of their directories."
        )
    run_dir = runs[0][1]
    if _use_csv(run_dir, source) or (source == "auto" and os.path.exists(os.path.join(run_dir, RUN_FILE))):
        info = _run_json(run_dir)
        if info is None:
            raise GradwatchDataError(f"No {RUN_FILE} in {run_dir!r}.")
        return info
    info = _load_events(run_dir, None).run_info
    if info is None:
        raise GradwatchDataError(
            f"No '{tb_format.RUN_TAG}' summary in the event files of {run_dir!r} (the run info is "
            "written at step 0 by gradwatch's TensorBoard sink)."
        )
    return info


def _run_json(run_dir: str) -> dict[str, Any] | None:
    """The run's ``run.json`` (None without one), its schema version checked."""
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise GradwatchDataError(f"{path} is not valid JSON ({error}); restore or delete it.") from error
    check_schema_version(info, path)
    return info


def _model_order(run_info: dict[str, Any] | None, level: str) -> list[str]:
    """The last segment's names in model order, then those only earlier segments watched."""
    entries = (run_info or {}).get("variables" if level == "variable" else "layers", [])
    order = [entry["name"] for entry in entries]
    for segment in segments_of_run(run_info):
        for variable in segment.get("variables", []):
            name = variable.get("name") if level == "variable" else variable.get("layer")
            if name and name not in order:
                order.append(name)
    return order


def _model_sorted(frame: pd.DataFrame, model_order: list[str], key: str) -> pd.DataFrame:
    order = {name: i for i, name in enumerate(model_order)}
    if order and len(frame):
        frame = frame.assign(_order=frame[key].map(order).fillna(len(order)))
        frame = frame.sort_values(["step", "_order"], kind="stable").drop(columns="_order")
        frame = frame.reset_index(drop=True)
    return frame
