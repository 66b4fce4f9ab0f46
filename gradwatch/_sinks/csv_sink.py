"""CSV sink: ``run.json`` (stamped with the ``schema_version``), ``windows.csv``, ``stats.csv``,
``layers.csv`` and ``alerts.csv``.

Every write is flushed, so a killed process loses at most the rows of the
window being written, and of the windows queued for the output's writer thread
(two at most).  With ``append=True`` a resumed run continues the same
files: the header must match, the watched variables must match, a torn last
line is cut off, and rows at or after the resumed run's first step are
superseded (the later write wins).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from gradwatch._io.schema import (
    ALERT_COLUMNS,
    ALERTS_FILE,
    LAYERS_FILE,
    RUN_FILE,
    STATS_COLUMNS,
    STATS_FILE,
    WINDOW_COLUMNS,
    WINDOWS_FILE,
    check_schema_version,
    with_schema_version,
)

logger = logging.getLogger("gradwatch")


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def cut_torn_tail(path: str) -> None:
    """Truncates a file after its last newline (a write torn by a kill)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        chunk = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start)
            cut = data.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


def read_header(path: str) -> list[str] | None:
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
    if not first.endswith("\n"):
        return None
    return next(csv.reader([first]))


def last_step(path: str) -> int | None:
    """The step of the last complete row, reading only the file's tail."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read().decode("utf-8", errors="replace")
    lines = [line for line in tail.split("\n") if line.strip()]
    for line in reversed(lines):
        head = line.split(",", 1)[0]
        try:
            return int(float(head))
        except ValueError:
            continue
    return None


def drop_rows_from_step(path: str, first_step: int) -> int:
    """Rewrites a CSV without rows whose step is >= first_step. Returns rows dropped."""
    tmp = f"{path}.tmp"
    dropped = 0
    with open(path, encoding="utf-8", newline="") as src, open(
        tmp, "w", encoding="utf-8", newline=""
    ) as dst:
        header = src.readline()
        dst.write(header)
        for line in src:
            head = line.split(",", 1)[0]
            try:
                step = int(float(head))
            except ValueError:
                step = None
            if step is not None and step >= first_step:
                dropped += 1
                continue
            dst.write(line)
    os.replace(tmp, path)
    return dropped


class _CsvFile:
    def __init__(self, path: str, columns: Sequence[str], append: bool):
        self.path = path
        self.columns = tuple(columns)
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if append and exists:
            cut_torn_tail(path)
            header = read_header(path)
            if header is not None and tuple(header) != self.columns:
                raise ValueError(
                    f"Cannot append to {path}: its columns are {header}, but this version of "
                    f"gradwatch writes {list(self.columns)}. Use a new log_dir, or "
                    "append=False to overwrite."
                )
            exists = header is not None
        self._file = open(path, "a" if append else "w", encoding="utf-8", newline="")
        if not (append and exists):
            self._file.write(",".join(self.columns) + "\n")
            self._file.flush()

    def reopen_after(self, first_step: int) -> int:
        """Supersedes rows at or after first_step (a resumed run rewrites them)."""
        self._file.flush()
        step = last_step(self.path)
        if step is None or step < first_step:
            return 0
        self._file.close()
        dropped = drop_rows_from_step(self.path, first_step)
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        return dropped

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        # csv's writer: None as an empty cell, a float as its repr (nan, inf), quotes where needed
        buffer = io.StringIO()
        columns = self.columns
        csv.writer(buffer, lineterminator="\n").writerows([row[c] for c in columns] for row in rows)
        self._file.write(buffer.getvalue())
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


class CsvSink:
    """Writes a run's rows as CSV files under ``log_dir``."""

    def __init__(self, log_dir: str, append: bool = False, check_variables: bool = True):
        self.log_dir = log_dir
        self.append = append
        self._check_variables = check_variables  # False: a later fit of the same run (a new segment)
        self._files: dict[str, _CsvFile] = {}
        self._first_write = True

    def open(self, run_json: dict[str, Any]) -> None:
        """Writes ``run.json`` and opens the CSV files (continued with ``append``)."""
        try:
            os.makedirs(self.log_dir, exist_ok=True)
        except OSError as error:
            raise ValueError(
                f"log_dir {self.log_dir!r} cannot be created ({error}); pass a writable directory."
            ) from error
        if not os.access(self.log_dir, os.W_OK):
            raise ValueError(f"log_dir {self.log_dir!r} is not writable; pass a writable directory.")
        run_path = os.path.join(self.log_dir, RUN_FILE)
        run_json = with_schema_version(run_json)
        if self.append and self._check_variables and os.path.exists(run_path):
            self._check_same_variables(run_path, run_json)
        write_json_atomic(run_path, run_json)
        self._files = {
            "windows": _CsvFile(os.path.join(self.log_dir, WINDOWS_FILE), WINDOW_COLUMNS, self.append),
            "stats": _CsvFile(os.path.join(self.log_dir, STATS_FILE), STATS_COLUMNS, self.append),
            "layers": _CsvFile(os.path.join(self.log_dir, LAYERS_FILE), STATS_COLUMNS, self.append),
            "alerts": _CsvFile(os.path.join(self.log_dir, ALERTS_FILE), ALERT_COLUMNS, self.append),
        }

    @staticmethod
    def _check_same_variables(run_path: str, run_json: dict[str, Any]) -> None:
        try:
            with open(run_path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            return
        check_schema_version(previous, run_path)  # never append to files of a newer format
        before = [v["name"] for v in previous.get("variables", [])]
        now = [v["name"] for v in run_json.get("variables", [])]
        if before and before != now:
            gone = [n for n in before if n not in now]
            new = [n for n in now if n not in before]
            raise ValueError(
                f"Cannot append to the run in {os.path.dirname(run_path)!r}: it watched "
                f"{len(before)} variables and this run watches {len(now)}; only before: "
                f"{gone[:5]}, only now: {new[:5]}. Auto-numbered layer names (dense_1, dense_2, "
                "...) change between processes: give your layers explicit name=... arguments, "
                "or use a new log_dir."
            )
        shapes_before = {v["name"]: list(v.get("shape") or []) for v in previous.get("variables", [])}
        changed = [(v["name"], shapes_before[v["name"]], list(v.get("shape") or []))
                   for v in run_json.get("variables", [])
                   if v["name"] in shapes_before and shapes_before[v["name"]] != list(v.get("shape") or [])]
        if changed:
            name, before_shape, now_shape = changed[0]
            raise ValueError(
                f"Cannot append to the run in {os.path.dirname(run_path)!r}: {len(changed)} watched "
                f"variable(s) have the same names but other shapes (e.g. {name!r}: {before_shape} in the "
                f"run, {now_shape} now), so its rows would be described with the wrong shapes. "
                "Use a new log_dir for the changed model."
            )

    def describe(self, run_json: dict[str, Any]) -> None:
        """Rewrites ``run.json`` with the run's updated description (its segments)."""
        write_json_atomic(os.path.join(self.log_dir, RUN_FILE), with_schema_version(run_json))

    def write(self, result: Any) -> None:
        """Writes one window result (a ``WindowResult``): its rows, then its alerts."""
        self.write_rows(result.window_row, result.stats_rows, result.layer_rows, result.first_step)
        self.write_alerts(result.alert_rows)

    def write_rows(
        self,
        window_row: dict[str, Any],
        stats_rows: Sequence[dict[str, Any]],
        layer_rows: Sequence[dict[str, Any]],
        first_step: int,
    ) -> None:
        if self._first_write:
            self._first_write = False
            if self.append:
                dropped = sum(f.reopen_after(first_step) for f in self._files.values())
                if dropped:
                    logger.info(
                        "gradwatch: resumed at step %d; superseded %d rows written at or after it.",
                        first_step,
                        dropped,
                    )
        self._files["stats"].write_rows(stats_rows)
        self._files["layers"].write_rows(layer_rows)
        self._files["windows"].write_rows([window_row])

    def write_alerts(self, alert_rows: Sequence[dict[str, Any]]) -> None:
        if alert_rows:
            self._files["alerts"].write_rows(alert_rows)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
