"""``GradientMonitor``: the Keras callback front for ``model.fit``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from gradwatch import _keras_internals as internals
from gradwatch import probes as probes_lib
from gradwatch import topology as topology_lib
from gradwatch.alerts import NonFiniteGradientError, nonfinite_action
from gradwatch.engine import Engine, StepContext
from gradwatch.options import Options

logger = logging.getLogger("gradwatch")


# A fit of fewer planned steps does not trace the lean step (see _lean_eligible).
LEAN_MIN_STEPS = 1000


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
        log_every: host reads and file writes every this many steps; the
            capture itself runs on every step and no step is lost in between.
        histogram_every: steps between gradient histograms (0 disables them).
        clip: optional gradient clipping applied to what the optimizer receives.
        on_nonfinite: what to do about NaN/Inf gradients: "warn", "skip_step",
            "stop" or "raise".
        append: continue the files of a previous run in ``log_dir`` (resume).
        thresholds: detector thresholds (``gradwatch.detectors.Thresholds``).
        signed_histograms: also write a signed-value gradient histogram per layer
            (the log10|g| histogram is always written on histogram steps).
        activation_probe: also count dead units from the activations of ReLU-family
            layers (units zero on every sample of the batch); off by default (it
            wraps those layers' ``call`` during fit and costs one reduction per layer).
        on_alert: called with every alert row. With a ``log_dir``, a window with no
            non-finite step is interpreted (rows, detectors, alerts) on gradwatch's
            writer thread while training goes on, so ``on_alert`` is called there
            and ``last_window`` follows a read by a few steps; both are complete
            when ``fit`` returns. Non-finite windows are handled on the training
            thread, at the read.

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
    ):
        super().__init__()
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
        self._engine: Engine | None = None
        self._optimizer: Any = None
        self._variables: list[Any] = []
        self._iterations_at_end = -1
        self._steps_since_read = 0
        self._batch_begin = 0
        self._host_steps = 0  # steps begun through this monitor's engine
        self._next_snapshot = 0
        self._last_logs: dict[str, Any] = {}
        self._active = False
        # The lean train function (see _guard_train_function), when this fit has one;
        # _lean_steps False traces the full step only (tests compare the two).
        self._lean_steps = True
        self._lean_function: Any = None
        self._next_step: int | None = None  # the in-graph number of the next step
        self._update_pending = False

    # ------------------------------------------------------------------ API

    @property
    def last_window(self) -> dict[str, Any] | None:
        """The last window row read (also when ``log_dir`` is None)."""
        return self._engine.last_window if self._engine is not None else None

    @property
    def topology(self) -> topology_lib.Topology | None:
        return self._engine.topology if self._engine is not None else None

    # -------------------------------------------------------------- Keras

    def set_model(self, model: Any) -> None:
        internals.check_backend()
        super().set_model(model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                "GradientMonitor needs a compiled model with an optimizer; model.optimizer is "
                "None. Call model.compile(optimizer=...) before fit, or use gradwatch.Watch "
                "in a custom training loop."
            )
        variables = list(model.trainable_variables)
        if not variables:
            warnings.warn(
                "GradientMonitor: the model has no trainable variables; there is nothing to "
                "watch and the monitor stays idle.",
                stacklevel=2,
            )
            return
        internals.refuse_double_clipping("GradientMonitor", self.options.clip, optimizer)
        strategy = internals.model_strategy(model)
        internals.check_strategy(strategy)
        if self._engine is None or [id(v) for v in variables] != [id(v) for v in self._variables]:
            topology = topology_lib.from_model(model, variables)
            if self._engine is not None:
                self._engine.close()
            # update/weight snapshots from the host, measured in the tap after the update
            self._engine = Engine(self.options, run_info=self._run_info(model, optimizer, strategy),
                                  host_update_snapshots=True)
            self._engine.defer_reads = True
            self._engine.on_alert = self.on_alert
            self._host_steps = 0
            self._next_snapshot = 0
            self._engine.bind(topology, variables, strategy=strategy)
            self._variables = variables
        self._engine.closed = False
        self._engine.request_resync(self._iterations_at_end)
        self._engine.open_sinks()
        self._optimizer = optimizer
        internals.ensure_built(optimizer, variables, strategy)
        internals.install_apply_tap(optimizer, self._tap)
        if self.options.activation_probe:
            if self._engine.activations is None:
                self._engine.activations = probes_lib.ActivationProbe(
                    self._engine.topology, topology_lib.relu_layers(model, self._engine.topology), strategy
                )
            self._engine.activations.install()
        internals.retrace_train_function(model)
        full_function = model.train_function
        self._lean_function = None
        if self._lean_eligible(model):
            # a second trace of the same step, traced with the engine's lean flag set
            internals.retrace_train_function(model)
            self._lean_function = model.train_function
        self._guard_train_function(model, full_function)
        self._steps_since_read = 0
        self._next_step = None  # taken at the first step (other callbacks may move iterations)
        self._update_pending = False
        self._active = True

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_begin = batch
        updates = self._engine.updates if self._active else None
        if updates is not None and self._host_steps >= self._next_snapshot:
            # every UPDATE_EVERY steps: the weights before this step, for the update probe
            updates.snapshot_now()
            self._next_snapshot = self._host_steps + probes_lib.UPDATE_EVERY
            self._update_pending = True

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._active:
            return
        self._last_logs = logs or {}
        steps = max(1, batch - self._batch_begin + 1)
        self._steps_since_read += steps
        self._host_steps += steps
        if self._next_step is not None:
            self._next_step += steps
        if self._update_pending and self._lean_function is not None:
            # the measure waits for a step that moves the weights (one small read)
            self._update_pending = self._engine.updates.pending()
        if self._steps_since_read >= self.options.log_every:
            self._read()
        elif self.options.on_nonfinite in ("stop", "raise") and self._engine.has_nonfinite():
            # These modes act at once: one scalar read per batch instead of waiting
            # for the next window.
            self._read()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        # validation inside fit: the activation probe does not count these batches
        if self._active and self._engine.activations is not None:
            self._engine.activations.training.assign(False)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._active and self._engine.activations is not None:
            self._engine.activations.training.assign(True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._active:
            return
        self._finish()
        if self._engine is not None and self._engine.steps_seen == 0:
            warnings.warn(
                "GradientMonitor observed no training step: the optimizer's apply() was never "
                "called through model.fit (a custom train_step that updates weights without "
                "self.optimizer.apply_gradients?). Use gradwatch.Watch in that train_step.",
                stacklevel=2,
            )

    # ------------------------------------------------------------ private

    def _read(self) -> None:
        self._steps_since_read = 0
        self._engine.read(fallback_loss=_float_or_none(self._last_logs.get("loss")))
        if self._engine.last_read_steps and self._engine.last_step is not None:
            self._next_step = self._engine.last_step + 1
        self._react(self._engine.acted_alerts)

    def _lean_eligible(self, model: Any) -> bool:
        """Whether this fit traces a lean step beside the full one: one step per
        train-function call (the host then knows every step's number and place in
        its window) and one replica (the engine buffers its rows)."""
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        # the lean trace is a second trace of the whole train step (0.5-0.8 s for a
        # fresh 784-512-512-10 MLP) that saves ~0.25 ms a step there: a fit known to
        # be shorter than LEAN_MIN_STEPS runs the full step throughout
        planned = steps * (epochs - int(params.get("initial_epoch", 0) or 0)) if steps and epochs else None
        return (self._lean_steps and self._engine._buffered
                and int(getattr(model, "steps_per_execution", 1) or 1) == 1
                and not getattr(model, "run_eagerly", False)
                and (planned is None or planned >= LEAN_MIN_STEPS))

    def _full_step_due(self) -> bool:
        """Host side, before a step: whether it may hold work only the full step does:
        the window's sampled step (its first), a histogram step, an update measure
        still waiting, or a buffer about to fill."""
        every = self.options.histogram_every
        if self._next_step is None:
            self._next_step = self._engine.next_step(int(internals.iterations(self._optimizer).numpy()))
        return (self._steps_since_read == 0
                or self._update_pending
                or (every > 0 and self._next_step % every == 0)
                or self._steps_since_read + 1 >= self._engine.capacity)

    def _react(self, alerts) -> None:
        action = nonfinite_action(
            alerts, self.options.on_nonfinite, "Training stopped (on_nonfinite='stop')."
        )
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

    def _finish(self) -> None:
        """Final read, tap removed, files closed: the model is left as it was found."""
        self._active = False
        try:
            if self._engine is not None and self._engine.bound:
                self._read()
        finally:
            if self._engine is not None and self._engine.activations is not None:
                self._engine.activations.remove()
            if self._optimizer is not None:
                internals.remove_apply_tap(self._optimizer)
                self._iterations_at_end = int(internals.iterations(self._optimizer).numpy())
            if self.model is not None:
                internals.forget_train_function(self.model)
            if self._engine is not None:
                self._engine.close()

    def _guard_train_function(self, model: Any, train_function: Any) -> None:
        # Keras's fit has no try/finally: if a step raises (or is interrupted),
        # on_train_end never runs, so the tap is removed here instead.
        monitor = self
        engine = self._engine

        def guarded_train_function(iterator):
            lean_function = monitor._lean_function
            # the flag only matters when a call traces (the first, or a retrace)
            lean = monitor._active and lean_function is not None and not monitor._full_step_due()
            engine.lean = lean
            try:
                return (lean_function if lean else train_function)(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                # The end of the data: Keras ends the epoch (and may start the next);
                # training goes on, so the monitor stays on.
                raise
            except BaseException:
                if monitor._active:
                    try:
                        monitor._finish()
                    except Exception:  # never mask the user's error
                        logger.exception("gradwatch: cleanup after a failed step failed")
                raise
            finally:
                engine.lean = False

        model.train_function = guarded_train_function

    def _tap(self, original_apply, grads, trainable_variables):
        engine = self._engine
        if engine is None or engine.closed or not engine.bound:
            # A tap left behind by an interrupted process is a pass-through.
            return original_apply(grads, trainable_variables)
        optimizer = self._optimizer
        grads = list(grads)
        if trainable_variables is None:
            trainable_variables = internals.trainable_variables_of(optimizer)
        trainable_variables = list(trainable_variables)
        watched = [
            i for i, v in enumerate(trainable_variables)
            if internals.variable_key(v) in engine._index
        ]
        loss_scaled = internals.is_loss_scale_optimizer(optimizer)
        guard = self.options.on_nonfinite != "warn"
        context = StepContext(
            learning_rate=internals.learning_rate(optimizer),
            loss_scale=internals.loss_scale(optimizer),
            iterations=internals.iterations(optimizer),
            loss_totals=internals.loss_tracker_totals(self.model),
            overflow_skips=loss_scaled or guard,
        )
        observed = engine.observe(
            [grads[i] for i in watched], [trainable_variables[i] for i in watched], context
        )
        for k, i in enumerate(watched):
            grads[i] = observed[k]
        finite = engine.last_finite
        if loss_scaled:
            # The LossScaleOptimizer skips non-finite steps itself (and lowers its
            # scale); under several replicas make sure it sees what any replica saw.
            if internals.replicas_to_reduce() is not None:
                grads = internals.poison_unless_finite(grads, finite)
            result = original_apply(grads, trainable_variables)
        elif guard:
            # skip_step, stop and raise: the host learns of a NaN only later, so the
            # update of a non-finite step is never applied (weights and optimizer
            # state untouched, on every replica).
            result = internals.apply_if_finite(original_apply, grads, trainable_variables, finite)
        else:
            result = original_apply(grads, trainable_variables)
        engine.after_update()  # the update probe reads the weights it just moved
        return result

    @staticmethod
    def _run_info(model: Any, optimizer: Any, strategy: Any) -> dict[str, Any]:
        policy = keras.mixed_precision.dtype_policy()
        return {
            "front": "GradientMonitor",
            "optimizer": {
                "class": type(internals.base_optimizer(optimizer)).__name__,
                "loss_scale_optimizer": internals.is_loss_scale_optimizer(optimizer),
                "clipping": internals.optimizer_clipping(optimizer),
                "clips": bool(internals.optimizer_clipping(optimizer)),
            },
            "dtype_policy": getattr(policy, "name", str(policy)),
            "strategy": type(strategy).__name__ if strategy is not None else None,
            "num_replicas": int(getattr(strategy, "num_replicas_in_sync", 1) or 1),
            "jit_compile": bool(getattr(model, "jit_compile", False)),
            "steps_per_execution": int(getattr(model, "steps_per_execution", 1) or 1),
        }


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
