"""``GradientMonitor``: the Keras callback front for ``model.fit``."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from gradwatch._capture import fit_tap
from gradwatch._capture import keras_internals as internals
from gradwatch._fit_parts import FitParts
from gradwatch._internal_options import InternalOptions, as_internal
from gradwatch._interpret.alerts import NonFiniteGradientError, nonfinite_action
from gradwatch._interpret.probe_layout import early_read_due, next_snapshot
from gradwatch._options import Options
from gradwatch._topology import Topology

logger = logging.getLogger("gradwatch")


def _cleans_up(method: Callable[..., Any]) -> Callable[..., Any]:
    """A callback method after which the monitor cleans up at once if it raises (Keras's
    ``fit`` has no ``finally``: its ``on_train_end`` would never run)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            if self._active:
                self._finish(failed=True)
            raise

    return wrapper


class GradientMonitor(keras.callbacks.Callback):
    """Watches the real gradients of every ``model.fit`` step, in-graph.

    The monitor taps the model's optimizer, so the statistics are of the exact
    gradients the optimizer is handed (the raw tape gradients, before any
    clipping), computed inside the compiled train function on every step, with
    no recomputation. The host reads them every ``log_every`` steps.

    Args:
        log_dir: directory for ``run.json``, ``windows.csv``, ``stats.csv``,
            ``alerts.csv`` (created if missing). ``None`` keeps everything in
            memory (``monitor.last_window``).
        log_every: host reads and file writes every this many steps (up to 10**9);
            the capture runs on every step, no step is lost, memory stays the same.
        histogram_every: steps between gradient histograms (0 disables them; at most 10**9).
        clip: optional gradient clipping applied to what the optimizer receives.
        on_nonfinite: on NaN/Inf gradients: "warn", "skip_step", "stop" or "raise".
        append: continue the files of a previous run in ``log_dir`` (resume).
        thresholds: detector thresholds (``gradwatch._interpret.detectors.Thresholds``).
        signed_histograms: also write a signed-value gradient histogram per layer
            (the log10|g| histogram is always written on histogram steps).
        activation_probe: also count dead units from ReLU-family layers' activations
            (zero on every sample of the batch); off by default (it wraps those
            layers' ``call`` during fit, one reduction per layer).
        optimizers: optimizers the model's ``train_step`` applies besides those the
            monitor finds itself (``model.optimizer`` and every optimizer among the
            model's attributes, e.g. a GAN's ``self.d_optimizer``): a list, or a dict of
            group name to optimizer. Each optimizer's variables are a group of their own.
        on_alert: called with every alert row. With a ``log_dir``, a window with no
            non-finite step is interpreted (rows, detectors, alerts) on gradwatch's
            writer thread while training goes on (``on_alert`` is called there;
            ``last_window`` follows a read by a few steps; both complete when
            ``fit`` returns). Non-finite windows are handled at the read.
        internal: switches for tests and benchmarks (``gradwatch._internal_options``).

    Example:
        >>> monitor = GradientMonitor(log_dir="runs/exp1", log_every=10)
        >>> model.fit(x, y, callbacks=[monitor])  # doctest: +SKIP
    """

    def __init__(
        self,
        log_dir: str | None = "runs/gradwatch",
        log_every: int = 10,
        histogram_every: int = 100,
        clip: Any = None,
        on_nonfinite: str = "warn",
        append: bool = False,
        thresholds: Any = None,
        signed_histograms: bool = False,
        activation_probe: bool = False,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        internal: InternalOptions | None = None,
        optimizers: Any = None,
    ):
        super().__init__()
        self._internal = as_internal(internal)
        self.options = Options(
            log_dir=log_dir,
            log_every=log_every,
            histogram_every=histogram_every,
            clip=clip,
            on_nonfinite=on_nonfinite,
            append=append,
            thresholds=thresholds,
            signed_histograms=signed_histograms,
            activation_probe=activation_probe,
        )
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be callable or None; received {on_alert!r}.")
        self.on_alert = on_alert
        self._parts = FitParts(self.options, self._internal, on_alert, optimizers)
        self._single_replica = True
        self._optimizer: Any = None
        self._iterations_at_end = -1
        self._steps_since_read = 0
        self._batch_begin = 0
        self._host_steps = 0  # steps begun through the recorder below
        self._next_snapshot = 0
        self._counted_recorder: Any = None
        self._last_logs: dict[str, Any] = {}
        self._active = False
        self._lean_function: Any = None  # this fit's lean train function, if any
        self._lean = fit_tap.LeanDecision()  # whether it runs yet
        self._next_step: int | None = None  # the in-graph number of the next step
        self._update_pending = False
        self._tracing_lean = False  # read by the tap while a train function traces
        self._in_batch = False  # on_train_batch_begin ran since the last train-function call
        self._stepped = False  # a train-function call ran since on_train_begin
        self._in_call = False  # the guard runs the monitor's train function now

    # ------------------------------------------------------------------ API

    @property
    def last_window(self) -> dict[str, Any] | None:
        """The last window row read (also when ``log_dir`` is None)."""
        return self._parts.pipeline.latest.window if self._parts.pipeline is not None else None

    @property
    def topology(self) -> Topology | None:
        """The watched model's topology (None before the first fit)."""
        return self._parts.recorder.topology if self._parts.recorder is not None else None

    @property
    def steps_seen(self) -> int:
        """The training steps observed so far, over every fit."""
        return self._parts.pipeline.steps_seen if self._parts.pipeline is not None else 0

    # -------------------------------------------------------------- Keras

    def set_model(self, model: Any) -> None:
        internals.check_backend()
        super().set_model(model)

    @_cleans_up
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._active:  # the last fit ended where the monitor could not see it
            self._finish(failed=True)
        model = self.model
        self._stepped = False
        strategy = internals.model_strategy(model)
        internals.check_strategy(strategy)
        tapped = self._parts.install(model, strategy, self._tap, self._parts.end_step,
                                     claim=lambda optimizer: _claim(optimizer, self))
        optimizer = getattr(model, "optimizer", None) or tapped[0][1]  # numbers the steps
        if not self._parts.begin_fit(model, optimizer, strategy, self._iterations_at_end):
            self._parts.uninstall()
            warnings.warn("GradientMonitor: the model has no trainable variables; there is nothing to "
                          "watch and the monitor stays idle.", stacklevel=2)
            return
        self._single_replica = strategy is None or strategy.num_replicas_in_sync <= 1
        self._optimizer = optimizer
        self._after_bind()
        internals.retrace_train_function(model)
        full_function = model.train_function
        self._lean_function = None
        self._lean = fit_tap.LeanDecision(always=not self._internal.lean_break_even)
        if self._lean_eligible(model):
            # a second trace of the same step, traced with the lean flag set
            internals.retrace_train_function(model)
            self._lean_function = model.train_function
        _guard_train_function(self, model, full_function)
        self._steps_since_read = 0
        self._next_step = None  # taken at the first step (other callbacks may move iterations)
        self._update_pending = False
        self._active = True

    @_cleans_up
    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_begin = batch
        self._in_batch = True
        if self._active and self._parts.bound:
            self._snapshot_if_due()

    @_cleans_up
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._active and (idle := self._parts.first_batch_warning()):
            warnings.warn(idle, stacklevel=2)
        if not self._active or not self._parts.bound:
            return
        self._last_logs = logs or {}
        steps = max(1, batch - self._batch_begin + 1)
        self._steps_since_read += steps
        self._host_steps += steps
        if self._lean_function is not None:
            self._lean.decide(steps, self.params or {})
        if self._next_step is not None:
            self._next_step += steps
        if self._update_pending and self._lean_function is not None:
            # the measure waits for a step that moves the weights (one small read)
            self._update_pending = self._parts.recorder.update_pending()
        if self._steps_since_read >= self.options.log_every:
            self._read()
        elif self.options.on_nonfinite in ("stop", "raise") and self._parts.recorder.has_nonfinite():
            # These modes act at once: one scalar read per batch instead of waiting
            # for the next window.
            self._read()

    @_cleans_up
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._active and self._parts.bound and early_read_due(
                self._host_steps, self._steps_since_read, self.options.thresholds.dead_steps):
            self._read()

    @_cleans_up
    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        # validation inside fit: the activation probe does not count these batches
        if self._active and self._parts.bound:
            self._parts.recorder.pause_activations(True)

    @_cleans_up
    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._active and self._parts.bound:
            self._parts.recorder.pause_activations(False)

    @_cleans_up
    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._active:
            return
        self._finish()
        if self.steps_seen == 0 and not self._parts.warned_idle:
            warnings.warn(
                "GradientMonitor observed no training step: the optimizer's apply() was never "
                "called through model.fit (a custom train_step that updates weights without "
                "self.optimizer.apply_gradients?). Use gradwatch.Watch in that train_step.",
                stacklevel=2,
            )

    # ------------------------------------------------------------ private

    def _after_bind(self) -> None:
        """A new recorder counts its steps and update snapshots from zero."""
        if self._parts.recorder is not self._counted_recorder:
            self._counted_recorder = self._parts.recorder
            self._host_steps = self._next_snapshot = 0

    def _snapshot_if_due(self) -> None:
        """On the steps of probe_layout.snapshot_due: the weights before this step, for the update probe."""
        if self._host_steps >= self._next_snapshot and self._parts.recorder.snapshot_weights():
            self._next_snapshot = next_snapshot(self._host_steps + 1) - 1  # host steps count from 0
            self._update_pending = True

    def _read(self) -> None:
        self._steps_since_read = 0
        loss = self._last_logs.get("loss")
        fallback = _float_or_none(loss) if self._parts.fallback_loss_allowed() else None
        read = self._parts.pipeline.read(fallback_loss=fallback, defer=self._internal.defer_reads)
        if read.steps and read.last_step is not None:
            self._next_step = read.last_step + 1
        self._react(read.result.alerts if read.result is not None else [])

    def _lean_eligible(self, model: Any) -> bool:
        return self._internal.lean_steps and fit_tap.lean_eligible(
            self.params or {}, model, self._single_replica, self._internal.lean_min_steps)

    def _full_step_due(self) -> bool:
        """Host side, before a step: whether it may hold work only the full step does:
        the window's sampled step (its first), a histogram step (unless every step is
        one: the lean step then takes it), an update measure
        still waiting, or a full buffer (every ``capacity``-th step since the read)."""
        every = self.options.histogram_every
        if not self._parts.bound:
            return True
        if self._next_step is None:
            self._next_step = self._parts.recorder.next_step()
        return (self._steps_since_read == 0
                or self._update_pending
                or (every > 1 and self._next_step % every == 0)  # every step: the lean step takes them
                or (self._steps_since_read + 1) % self._parts.recorder.capacity == 0)

    def _react(self, alerts) -> None:
        stop_note = "Training stopped (on_nonfinite='stop')."
        action = nonfinite_action(alerts, self.options.on_nonfinite, stop_note)
        if action is None:
            return
        kind, message = action
        if kind == "raise":
            if self._active:
                self._finish()
            raise NonFiniteGradientError(message)
        if kind == "stop":
            self.model.stop_training = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _finish(self, failed: bool = False) -> None:
        """Final read, tap removed, writer stopped, files closed: the model is left as it was
        found. Every part runs; after a failure (``failed``) their errors are logged, not raised."""
        self._active = False
        run_all([lambda: self._parts.bound and self._read(), self._restore, self._parts.end_fit],
                quiet=failed)

    def _restore(self) -> None:
        # the taps and the step-end hook go in end_fit (only those this monitor installed)
        if self._optimizer is not None:
            self._iterations_at_end = int(internals.iterations(self._optimizer).numpy())
        if self.model is not None:
            internals.forget_train_function(self.model)

    def _tap(self, optimizer, group, original_apply, grads, trainable_variables):
        if not self._in_call:  # traced outside the monitor's fit (a recompile after an unseen exit)
            return original_apply(grads, trainable_variables)
        if self._active and self._parts.waiting:
            self._parts.bind_in_trace()  # the first traced step: the variables exist now
            if self._parts.bound:  # else nothing to watch: the monitor stays idle
                with tf.init_scope():
                    self._after_bind()
                    self._snapshot_if_due()
        if not self._active or not self._parts.bound:
            # A tap left behind by an interrupted process is a pass-through.
            return original_apply(grads, trainable_variables)
        self._parts.note_group(group, trainable_variables or internals.trainable_variables_of(optimizer))
        if self._parts.discard_trace:  # bound in this trace, which TensorFlow traces again
            return original_apply(grads, trainable_variables)
        # a fit whose host sees every step takes one row a step and reads every log_every
        # steps, before its buffer fills: no fold of a full buffer in its steps (that fold,
        # a few hundred ops in a branch never taken, cost a short fit's first call ~3 s of
        # XLA compile under jit_compile; benchmarks/README.md, twelfth session)
        reads_in_time = (fit_tap.host_counts_steps(self.model, self._single_replica)
                         and self._parts.recorder.capacity > self.options.log_every)
        return fit_tap.observe_and_apply(self._parts.recorder, optimizer, self.model,
                                         self.options.on_nonfinite, self._tracing_lean, original_apply,
                                         grads, trainable_variables, reads_in_time=reads_in_time)


def _guard_train_function(monitor: GradientMonitor, model: Any, train_function: Any) -> None:
    """Sets ``model.train_function`` to ``train_function`` (or the lean one) behind the monitor's guard."""
    # Keras's fit has no try/finally: if a step raises (or is interrupted),
    # on_train_end never runs, so the tap is removed here instead.
    def guarded_train_function(iterator):
        if not (monitor._active and monitor._in_batch):
            # a call outside the monitor's fit (that fit ended where the monitor could
            # not see it, or a plain fit reuses this function): clean up, run untapped
            if monitor._active:
                monitor._finish(failed=True)
            return internals.plain_train_function(model)(iterator)
        monitor._in_batch, monitor._stepped = False, True
        try:
            monitor._parts.start_steps()
            lean_function = monitor._lean_function
            # the flag only matters when a call traces (the first, or a retrace)
            lean = (monitor._active and lean_function is not None and monitor._lean.lean
                    and not monitor._full_step_due())
            monitor._tracing_lean = lean
            if monitor._internal.on_step_kind is not None and monitor._active:
                monitor._internal.on_step_kind(lean)
            monitor._in_call = True  # the tap records only in the monitor's own calls
            if lean:
                return lean_function(iterator)
            return monitor._lean.time(lambda: train_function(iterator))
        except (StopIteration, tf.errors.OutOfRangeError):
            # The end of the data: Keras ends the epoch (and may start the next);
            # training goes on, so the monitor stays on.
            raise
        except BaseException:
            if monitor._active:
                monitor._finish(failed=True)  # never masks the user's error
            raise
        finally:
            monitor._tracing_lean = monitor._in_call = False

    model.train_function = guarded_train_function


def _claim(optimizer: Any, monitor: GradientMonitor) -> None:
    """Refuses a second monitor in the fit of a model another one watches (both are left
    clean); a monitor whose fit ended unseen (it stepped, then nothing told it) is cleaned up."""
    owner = internals.apply_tap_owner(optimizer)
    if not isinstance(owner, GradientMonitor) or owner is monitor or not owner._active:
        return
    stepped = owner._stepped
    owner._finish(failed=True)  # an abandoned fit's monitor, or the first of two: the model as it was
    if stepped:
        return
    raise ValueError(
        "Two GradientMonitors watch this model's optimizer in one fit; one monitor records every "
        f"step of the model (log_dir {owner.options.log_dir!r} and {monitor.options.log_dir!r}). "
        "Pass one GradientMonitor in callbacks=[...]; for two outputs, read the first one's files.")


def run_all(steps: list[Callable[[], Any]], quiet: bool) -> None:
    """Runs every step; the first error is raised after all ran, or logged (``quiet``) with the others."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as error:  # noqa: BLE001 - the other steps still run
            if quiet:
                logger.warning("gradwatch: cleanup after a failed fit: %r", error)
            elif first is None:
                first = error
    if first is not None:
        raise first


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
