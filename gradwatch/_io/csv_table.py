"""One gradwatch CSV file read into pandas, every row checked (no TensorFlow).

A file is its header and complete lines: a last line without its line end (a
write cut short by a kill) is left out with a warning naming it. A row that does
not fit the header (another number of fields, or a value that is not a number
in a numeric column: a hand edit, a disk error) is left out with a warning naming
its line, so the numeric columns always come back numeric. A file with no
complete line, or whose header is not gradwatch's, is refused.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings

import pandas as pd

from gradwatch._io.schema import TEXT_COLUMNS, GradwatchDataError

logger = logging.getLogger("gradwatch")

#: How the writers (and a person) spell a missing number; every other text in a numeric column is a bad row.
NUMERIC_NA = ("", "nan", "NaN", "-nan", "NA", "N/A", "null", "None", "<NA>")
#: Bad lines named one by one in the warnings; the rest are counted.
NAMED_LINES = 5


def complete_lines(path: str) -> bytes:
    """The bytes of ``path`` up to its last line end.

    Raises:
        GradwatchDataError: the file holds bytes but not one complete line.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        end = data.rfind(b"\n") + 1
        if end == 0:
            raise GradwatchDataError(
                f"{path} is not a gradwatch CSV file: its {len(data)} bytes hold no complete line (a "
                "gradwatch file starts with its header line). Restore it, or read the run's "
                "TensorBoard events with source='events'.")
        logger.warning("gradwatch: %s line %d has no line end (a write cut short?); it is left out.",
                       path, data.count(b"\n", 0, end) + 1)
        data = data[:end]
    return data


def read_table(path: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """The rows of a gradwatch CSV file whose header holds ``columns``, bad rows left out.

    Raises:
        GradwatchDataError: no complete line, or a header without ``columns``.
    """
    data = complete_lines(path)
    if not data.strip():
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    text = data.decode("utf-8", errors="replace")
    numeric = [c for c in columns if c not in TEXT_COLUMNS]
    frame = _parse(text, path, numeric)
    if frame is not None:
        _check_header(path, list(frame.columns), columns)
        if _numeric(frame, numeric):
            return frame
    frame = _parse(_fitting_rows(text, path, columns), path, numeric)
    if frame is None or not _numeric(frame, numeric):
        raise GradwatchDataError(f"{path} could not be read as numbers where numbers belong; restore it.")
    return frame


def _numeric(frame: pd.DataFrame, numeric: list[str]) -> bool:
    """Whether every numeric column holds numbers (a header-only file holds none)."""
    return not len(frame) or all(frame[c].dtype.kind in "iuf" for c in numeric)


def _parse(text: str, path: str, numeric: list[str]) -> pd.DataFrame | None:
    """pandas' reading of the text; None when a line has another number of fields."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        try:
            return pd.read_csv(
                io.StringIO(text), keep_default_na=False, na_values={c: list(NUMERIC_NA) for c in numeric},
                dtype={c: str for c in TEXT_COLUMNS})
        except pd.errors.ParserError:
            return None
        except ValueError as error:
            raise GradwatchDataError(
                f"{path} is not a readable CSV file ({error}). Was it edited or written by another "
                "program? Restore it, or read the run's TensorBoard events with source='events'."
            ) from error


def _check_header(path: str, found: list[str], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise GradwatchDataError(
            f"{path} is not a gradwatch file: columns {missing} are missing "
            f"(found {[name[:40] for name in found[:12]]}).")


def _is_number(value: str) -> bool:
    if value in NUMERIC_NA:
        return True
    try:
        float(value)
    except ValueError:
        return False
    return "_" not in value  # Python reads "1_000"; pandas does not


def _fitting_rows(text: str, path: str, columns: tuple[str, ...]) -> str:
    """The text with only the rows that fit its header; warns of the others, naming their lines."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        _check_header(path, header, columns)
        numeric = [i for i, name in enumerate(header) if name in columns and name not in TEXT_COLUMNS]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        bad: list[tuple[int, str]] = []
        line = reader.line_num + 1
        for record in reader:
            first, line = line, reader.line_num + 1
            if not record:
                continue  # a blank line, as pandas skips it
            reason = _misfit(record, header, numeric)
            if reason is None:
                writer.writerow(record)
            else:
                bad.append((first, reason))
    except csv.Error as error:
        raise GradwatchDataError(f"{path} is not a readable CSV file ({error}); restore it.") from error
    for first, reason in bad[:NAMED_LINES]:
        logger.warning("gradwatch: %s line %d is not a gradwatch row (%s); it is left out.",
                       path, first, reason)
    if len(bad) > NAMED_LINES:
        logger.warning("gradwatch: %s: %d more lines that are not gradwatch rows are left out.",
                       path, len(bad) - NAMED_LINES)
    return out.getvalue()


def _misfit(record: list[str], header: list[str], numeric: list[int]) -> str | None:
    """Why a row does not fit the header, or None."""
    if len(record) != len(header):
        return f"{len(record)} fields, the header has {len(header)}"
    for i in numeric:
        if not _is_number(record[i]):
            return f"{header[i]} is {record[i][:40]!r}, not a number"
    return None
