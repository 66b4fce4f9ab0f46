"""One window's way from the recorder to the files: read, interpret, report, write.

Both fronts call ``Pipeline.read``; the parts it calls own all the state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from gradwatch._capture.recorder import Recorder
from gradwatch._interpret.interpreter import Interpreter
from gradwatch._interpret.results import WindowResult
from gradwatch._options import Options
from gradwatch._segments import RunHistory
from gradwatch._sinks.csv_sink import CsvSink
from gradwatch._sinks.output import Latest, Output
from gradwatch._sinks.tb_sink import TensorBoardSink

logger = logging.getLogger("gradwatch")
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}


def run_description(options: Options, recorder: Recorder, run_info: dict[str, Any],
                    history: RunHistory | None = None) -> dict[str, Any]:
    """Returns the ``run.json`` of a bound recorder's run: versions, options, front's
    facts, the topology (of the last segment) and the run's segments."""
    from gradwatch import __version__

    info = {"gradwatch_version": __version__, "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__, "options": options.to_json()}
    info.update(run_info)
    info.update(recorder.topology.to_json())
    info["segments"] = history.to_json() if history is not None else []
    return info


class Read(NamedTuple):
    """What one read found: its steps, its last step, and its result unless deferred."""

    steps: int
    last_step: int | None
    result: WindowResult | None


class Pipeline:
    """Reads a bound recorder's windows, interprets them and hands them to the output.

    Args:
        options: the front's options.
        recorder: a bound recorder.
        run_info: the front's entries for ``run.json``.
        on_alert: called with every alert row.
        extra_sinks: sinks that get every window result too (``InternalOptions``).
        history: the run's segments, shared by every pipeline a front builds for one run.
    """

    def __init__(self, options: Options, recorder: Recorder, run_info: dict[str, Any],
                 on_alert: Callable[[dict[str, Any]], None] | None = None, extra_sinks: Any = (),
                 history: RunHistory | None = None):
        self._options = options
        self._extra_sinks = list(extra_sinks)
        self._recorder = recorder
        self._run_info = run_info
        loss_scaled = bool(run_info.get("optimizer", {}).get("loss_scale_optimizer"))
        self._interpreter = Interpreter(recorder.topology, options.thresholds, recorder.clipping,
                                        loss_scale_optimizer=loss_scaled,
                                        signed_histograms=options.signed_histograms)
        self._writes = options.writes and recorder.chief  # only the chief writes
        self._output = Output([])
        self._history = history if history is not None else RunHistory()
        self._on_alert = on_alert
        self.latest = Latest()
        self.steps_seen = 0

    def open(self) -> None:
        """Opens the files; a later open (a later fit) continues what the first wrote."""
        options, history = self._options, self._history
        first = not history.opened
        if first and options.append and self._writes:
            history.load(options.log_dir)
        append = options.append or not first
        sinks = ([CsvSink(options.log_dir, append=append, check_variables=first),
                  TensorBoardSink(options.log_dir)] if self._writes else [])
        sinks += self._extra_sinks
        self._output = Output(sinks)
        if sinks:
            self._output.open(self._description())
        history.opened = True

    def _description(self) -> dict[str, Any]:
        return run_description(self._options, self._recorder, self._run_info, self._history)

    def start(self, iterations: int | None, continuing: bool) -> None:
        """Places this fit's steps in the run (a resume, or a new segment; see
        ``gradwatch._segments``) before its first step, and says so in ``run.json``."""
        topology = self._recorder.topology.to_json()
        start = self._history.begin({"front": self._run_info.get("front"),
                                     "optimizer": self._run_info.get("optimizer"),
                                     "model_name": topology.get("model_name", ""),
                                     "variables": topology["variables"]}, iterations, continuing)
        if start is not None:
            self._recorder.start_at(start)
        self._output.describe(self._description())

    def read(self, fallback_loss: float | None = None, defer: bool = False) -> Read:
        """Reads the window and writes it.

        Args:
            fallback_loss: the loss to report when the window's own is unknown.
            defer: interpret a window without a non-finite step on the writer thread
                (the front then needs no result back: training does not wait).

        Returns:
            The read's steps and last step, and its result (None when deferred).
        """
        pending = self._recorder.read_pending()
        if pending is None:
            return Read(0, None, None)
        self.steps_seen += pending.steps
        self._history.note(pending.last_step)
        if defer and self._output.threaded and not pending.nonfinite:
            # the fold, interpretation and writes: all on the writer thread
            self._output.defer(lambda: self._interpreter.interpret(pending.finish(), fallback_loss),
                               after=self._report)
            return Read(pending.steps, pending.last_step, None)
        self._output.flush()  # the detectors' state follows the windows in order
        result = self._interpreter.interpret(pending.finish(), fallback_loss)
        self._output.write(result)  # written before on_alert sees it (an on_alert may raise)
        self._report(result)
        return Read(pending.steps, pending.last_step, result)

    def _report(self, result: WindowResult) -> WindowResult:
        """Logs the alerts, calls ``on_alert`` and keeps the result as the latest."""
        for alert in result.alerts:
            self._report_alert(alert)
        if any(alert.severity in ("warning", "error") for alert in result.alerts):
            self._recorder.request_histogram()  # what the gradients look like right after it
        self.latest.set(result)
        return result

    def _report_alert(self, alert) -> None:
        logger.log(_LEVELS.get(alert.severity, logging.ERROR), "gradwatch %s at step %d: %s",
                   alert.kind, alert.step, alert.message)
        if self._on_alert is not None:
            try:
                self._on_alert(alert.to_row())
            except BaseException:
                self._on_alert = None  # raised once; the fit ends, its last windows are still written
                raise

    def close(self) -> None:
        """Writes what is queued and the run's last word (``Interpreter.finish``), and closes the files."""
        try:
            self._output.flush()  # the interpreter has seen every window
            final = self._interpreter.finish()
            if final:
                self._output.write_alerts([alert.to_row() for alert in final])
            self._output.describe(self._description())  # the segment's last step
            for alert in final or []:
                self._report_alert(alert)
        finally:
            self._output.close()
