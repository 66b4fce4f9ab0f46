"""The output: the run's sinks behind one protocol, written on one background thread."""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gradwatch._interpret.results import WindowResult

logger = logging.getLogger("gradwatch")
#: How long the interpreter's exit waits for a writer to write what it was handed.
EXIT_FLUSH_SECONDS = 30.0


class _Writer:
    """One daemon thread running the work handed to it, in order. After a failure (a
    full disk, an ``on_alert`` that raised) it runs ``on_failure`` at once (the sinks are
    closed) and refuses the rest; the failure is raised to the training thread by the
    work's future. The interpreter's exit waits (at most ``EXIT_FLUSH_SECONDS``) for what
    was handed over, then the daemon thread cannot hold the process."""

    def __init__(self, on_failure: Callable[[], None]):
        self._queue: queue.Queue = queue.Queue()
        self._on_failure = on_failure
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradwatch-writer", daemon=True)
        self._thread.start()
        _LIVE_WRITERS.add(self)

    def submit(self, work: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((functools.partial(work, *args), future))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, future = item
            if self.failed is not None:
                stopped = RuntimeError(f"gradwatch's writer stopped after an error: {self.failed!r}")
                future.set_exception(stopped)
                continue
            try:
                future.set_result(work())
            except BaseException as error:  # noqa: BLE001 - handed to the training thread
                self.failed = error
                future.set_exception(error)
                try:
                    self._on_failure()
                except Exception:  # noqa: BLE001
                    logger.exception("gradwatch: closing the files after a write error failed")

    def stop(self, timeout: float | None = None) -> None:
        """Lets the thread finish what it was handed, then ends it."""
        self._queue.put(None)
        self._thread.join(timeout)
        _LIVE_WRITERS.discard(self)


_LIVE_WRITERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _flush_writers_at_exit() -> None:
    for writer in list(_LIVE_WRITERS):
        writer.stop(timeout=EXIT_FLUSH_SECONDS)


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
        self._pool: _Writer | None = None
        self._pending: list[concurrent.futures.Future] = []
        self._sinks_lock = threading.Lock()

    def open(self, run_info: dict[str, Any]) -> None:
        """Opens every sink with the run's description and starts the writer thread."""
        try:
            for sink in self._sinks:
                sink.open(run_info)
        except BaseException:
            self._close_sinks()
            raise
        self._pool = _Writer(self._close_sinks)

    @property
    def threaded(self) -> bool:
        """Returns whether the writer thread runs (the output was opened)."""
        return self._pool is not None

    def write(self, result: WindowResult) -> None:
        """Hands one window result to the writer thread."""
        self.defer(lambda: result)

    def defer(self, produce: Callable[[], WindowResult | None],
              after: Callable[[WindowResult], Any] | None = None) -> None:
        """Runs ``produce`` on the writer thread, writes the result it returns, then calls
        ``after`` with it (so a window is on disk before an ``on_alert`` that raises sees it)."""
        if self._pool is None:
            _raise_after_error(self._produce_and_write(produce, after))
            return
        # handed over before an earlier window's error is raised: this window is not lost
        self._pending.append(self._pool.submit(self._produce_and_write, produce, after))
        self._settle(keep=self.MAX_PENDING)

    def _produce_and_write(self, produce: Callable[[], WindowResult | None],
                           after: Callable[[WindowResult], Any] | None = None) -> _AfterError | None:
        """An error of ``produce`` or of a sink stops the writer; one of ``after`` (the user's
        ``on_alert``) does not: the window is written, and the error reaches the training thread."""
        result = produce()
        if result is not None:
            for sink in self._sinks:
                sink.write(result)
            if after is not None:
                try:
                    after(result)
                except Exception as error:  # noqa: BLE001 - raised by the training thread
                    return _AfterError(error)
        return None

    def write_alerts(self, alert_rows: list[dict[str, Any]]) -> None:
        """Writes alert rows that belong to no window (the run's last word) to the sinks that take
        them (``write_alerts``), on the writer thread."""
        self._to_sinks("write_alerts", alert_rows)

    def describe(self, run_info: dict[str, Any]) -> None:
        """Hands the run's updated description (its segments) to the sinks that take it
        (``describe``), in order with the writes."""
        self._to_sinks("describe", run_info)
        if self._pool is not None:
            self._settle(keep=self.MAX_PENDING)

    def _to_sinks(self, method: str, argument: Any) -> None:
        """Calls ``method(argument)`` of every sink that has it, on the writer thread (in order
        with the writes), or at once without one."""
        def call() -> None:
            for sink in self._sinks:
                if hasattr(sink, method):
                    getattr(sink, method)(argument)

        if self._pool is None:
            call()
        else:
            self._pending.append(self._pool.submit(call))

    def _settle(self, keep: int) -> None:
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            _raise_after_error(self._pending.pop(0).result())

    def flush(self) -> None:
        """Waits until everything handed over is written; raises a write's error."""
        self._settle(keep=0)

    def close(self) -> None:
        """Writes what is queued, then ends the writer thread and closes the sinks (also when
        a write failed: then the first error is raised once everything is closed)."""
        try:
            self.flush()
        finally:
            self._pending = []
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
            self._close_sinks()

    def _close_sinks(self) -> None:
        """Closes every sink once (the training thread, or the writer after a failed write)."""
        with self._sinks_lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - close the others
                logger.exception("gradwatch: closing %s failed", type(sink).__name__)


class _AfterError:
    """An error of the work done after a window was written (the writer goes on)."""

    def __init__(self, error: Exception):
        self.error = error


def _raise_after_error(outcome: Any) -> None:
    if isinstance(outcome, _AfterError):
        raise outcome.error


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
