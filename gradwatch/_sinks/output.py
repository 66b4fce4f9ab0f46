"""The output: the run's sinks behind one protocol, written on one background thread."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gradwatch._interpret.results import WindowResult


class Sink(Protocol):
    """What every sink does: open with the run's description, write windows, close."""

    def open(self, run_info: dict[str, Any]) -> None: ...

    def write(self, result: WindowResult) -> None: ...

    def close(self) -> None: ...


class Output:
    """Writes window results to its sinks on one background thread, in order.

    Training goes on while a window is formatted and written. At most
    ``MAX_PENDING`` windows wait; a write's error is raised by the next call or by
    ``flush``. Work handed over with ``defer`` (a window's interpretation) runs on
    the same thread, in order with the writes.

    Args:
        sinks: the sinks (none: results are still produced, nothing is written).
    """

    MAX_PENDING = 2

    def __init__(self, sinks: Sequence[Sink]):
        self._sinks = list(sinks)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future] = []

    def open(self, run_info: dict[str, Any]) -> None:
        """Opens every sink with the run's description and starts the writer thread."""
        for sink in self._sinks:
            sink.open(run_info)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                           thread_name_prefix="gradwatch-writer")

    @property
    def threaded(self) -> bool:
        """Returns whether the writer thread runs (the output was opened)."""
        return self._pool is not None

    def write(self, result: WindowResult) -> None:
        """Hands one window result to the writer thread."""
        self.defer(lambda: result)

    def defer(self, produce: Callable[[], WindowResult | None]) -> None:
        """Runs ``produce`` on the writer thread, then writes the result it returns."""
        if self._pool is None:
            produce()
            return
        self._settle(keep=self.MAX_PENDING - 1)
        self._pending.append(self._pool.submit(self._produce_and_write, produce))

    def _produce_and_write(self, produce: Callable[[], WindowResult | None]) -> None:
        result = produce()
        if result is not None:
            for sink in self._sinks:
                sink.write(result)

    def write_alerts(self, alert_rows: list[dict[str, Any]]) -> None:
        """Writes alert rows that belong to no window (the run's last word) to the sinks that take
        them (``write_alerts``), on the writer thread."""
        def write() -> None:
            for sink in self._sinks:
                if hasattr(sink, "write_alerts"):
                    sink.write_alerts(alert_rows)

        if self._pool is None:
            write()
            return
        self._pending.append(self._pool.submit(write))

    def _settle(self, keep: int) -> None:
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            self._pending.pop(0).result()

    def flush(self) -> None:
        """Waits until everything handed over is written; raises a write's error."""
        self._settle(keep=0)

    def close(self) -> None:
        """Writes what is queued, then closes the sinks (also when a write failed)."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            for sink in self._sinks:
                sink.close()
            self._sinks = []


class Latest:
    """The last window row, handed from the writer thread to the training thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._window: dict[str, Any] | None = None

    def set(self, result: WindowResult) -> None:
        with self._lock:
            self._window = dict(result.window_row)

    @property
    def window(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._window is None else dict(self._window)
