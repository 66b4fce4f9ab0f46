"""``Watch``: the front for custom ``tf.GradientTape`` training loops."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from gradwatch._capture import keras_internals as internals
from gradwatch._capture import model_topology as topology_lib
from gradwatch._capture.call_trace import CallTrace
from gradwatch._capture.recorder import Recorder, StepContext
from gradwatch._internal_options import InternalOptions, as_internal
from gradwatch._interpret.alerts import NonFiniteGradientError, nonfinite_action
from gradwatch._options import Options
from gradwatch._pipeline import Pipeline
from gradwatch._topology import Topology

logger = logging.getLogger("gradwatch")


class Watch:
    """Watches the gradients of a custom training loop.

    ``observe`` runs in-graph (inside or outside ``tf.function``) on every
    step; ``step_end`` runs on the host after each step and writes every
    ``log_every`` steps.

    Args:
        log_dir: directory for the run files (created if missing); None keeps
            everything in memory.
        log_every: host reads and writes every this many steps (1 to 10**9;
            memory does not grow with it).
        histogram_every: steps between gradient histograms (0 disables them; at most 10**9).
        clip: optional gradient clipping applied to the gradients ``observe`` returns.
        on_nonfinite: "warn", "skip_step", "stop" or "raise".
        append: continue the files of a previous run in ``log_dir``; steps
            continue after the last step written.
        thresholds: detector thresholds (``gradwatch._interpret.detectors.Thresholds``).
        names: names for the variables, in the order they are passed to
            ``observe`` (a list), or a mapping from variable (a ``tf.Variable``,
            its ``.ref()``, or a Keras variable) to name; unmapped variables take
            their own names. Names are distinct and non-empty; ``"layer/w"`` puts
            ``w`` in layer ``layer``.
        model: the Keras model (or layer) the variables belong to, if any: gives
            layer names and activations in ``run.json``.
        on_alert: called with every alert row.
        internal: switches for tests and benchmarks (``gradwatch._internal_options``).

    Example:
        >>> watch = Watch(log_dir="runs/exp2")
        >>> grads = watch.observe(grads, variables)  # doctest: +SKIP
        >>> watch.step_end()  # doctest: +SKIP
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
        names: Sequence[str] | Mapping[Any, str] | None = None,
        model: Any = None,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        internal: InternalOptions | None = None,
    ):
        self.options = Options(
            log_dir=log_dir,
            log_every=log_every,
            histogram_every=histogram_every,
            clip=clip,
            on_nonfinite=on_nonfinite,
            append=append,
            thresholds=thresholds,
            signed_histograms=signed_histograms,
        )
        self._names = topology_lib.check_names(names)
        if model is not None and not isinstance(model, keras.layers.Layer):
            raise TypeError(f"model must be the Keras model the variables belong to, or None; received "
                            f"{model!r} ({type(model).__name__}). Pass the keras.Model, or leave model out.")
        self._model = model
        internals.check_backend()
        # the model's forward pass as traced until the first observe binds: layer order and edges
        self._trace = CallTrace(model) if model is not None else None
        if self._trace is not None:
            self._trace.install()
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be callable or None; received {on_alert!r}.")
        self._on_alert = on_alert
        self._internal = as_internal(internal)
        self._recorder = Recorder(self.options)
        self._pipeline: Pipeline | None = None
        self._last_finite: Any = None
        #: Set when a non-finite gradient was seen with on_nonfinite="stop": end your loop.
        self.stop_requested = False
        self._steps_since_read = 0
        self._eager_observe = None
        self._closed = False

    @property
    def last_window(self) -> dict[str, Any] | None:
        """The last window row read."""
        return self._pipeline.latest.window if self._pipeline is not None else None

    @property
    def topology(self) -> Topology | None:
        """The watched variables' topology (None before the first ``observe``)."""
        return self._recorder.topology

    @property
    def steps_seen(self) -> int:
        """The training steps observed and read so far."""
        return self._pipeline.steps_seen if self._pipeline is not None else 0

    @tf.autograph.experimental.do_not_convert
    def observe(
        self,
        grads: Sequence[tf.Tensor | tf.IndexedSlices | None],
        variables: Sequence[Any],
        loss: tf.Tensor | None = None,
    ) -> list[tf.Tensor | tf.IndexedSlices | None]:
        """Records this step's gradients (in-graph) and returns the gradients to apply.

        Args:
            grads: the list from ``tape.gradient(loss, variables)``; ``None``
                entries (variables disconnected from the loss) are recorded as
                having no gradient.
            variables: the variables, in the same order.
            loss: this step's loss, if you want it in ``windows.csv``.

        Returns:
            The gradients, clipped if a ``clip`` was given.
        """
        if self._closed:
            raise RuntimeError("Watch.observe() called after close(); create a new Watch.")
        grads = list(grads)
        variables = list(variables)
        if not self._recorder.bound:
            self._bind(variables)
        slots = self._recorder.slots_of(grads, variables)
        if tf.executing_eagerly():
            # Eager callers get the same fused graph, traced once per variable set.
            if self._eager_observe is None:
                self._eager_observe = internals.run_function(self._observe_in_graph)
            observed, finite = self._eager_observe(grads, slots, loss)
        else:
            observed, finite = self._observe_in_graph(grads, slots, loss)
        # read by apply() in the same step (the same trace, or eagerly)
        self._last_finite = finite
        return observed

    @tf.autograph.experimental.do_not_convert
    def _observe_in_graph(self, grads, slots, loss):
        context = StepContext(loss=loss, overflow_skips=self.options.on_nonfinite != "warn")
        return tuple(self._recorder.observe(grads, slots, context))

    @tf.autograph.experimental.do_not_convert
    def apply(self, optimizer: Any, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """Applies the gradients: ``optimizer.apply_gradients(zip(grads, variables))``,
        except that with ``on_nonfinite`` "skip_step", "stop" or "raise" a step whose
        gradient had a NaN/Inf is not applied at all (weights and optimizer state untouched).

        Args:
            optimizer: a Keras optimizer.
            grads: the gradients ``observe`` returned.
            variables: their variables.

        Call it after ``observe`` in the same step (inside or outside ``tf.function``).
        """
        grads, variables = list(grads), list(variables)
        internals.refuse_double_clipping("Watch", self.options.clip, optimizer)

        def apply_fn(grads, variables):
            optimizer.apply_gradients(zip(grads, variables))

        finite = self._last_finite
        if self.options.on_nonfinite == "warn" or finite is None:
            apply_fn(grads, variables)
        elif tf.executing_eagerly():
            if bool(finite):
                apply_fn(grads, variables)
        else:
            internals.apply_if_finite(apply_fn, grads, variables, finite)

    def _bind(self, variables: list[Any]) -> None:
        for variable in variables:
            dtype = tf.as_dtype(variable.dtype)
            if not dtype.is_floating:
                raise TypeError(
                    f"observe() got variable {internals.variable_path(variable)!r} of dtype "
                    f"{dtype.name}: only floating-point variables have gradients, so it cannot be "
                    "watched. Leave it out of the variables passed to observe()."
                )
        names = topology_lib.names_for(self._names, variables)
        trace, self._trace = self._trace, None
        if trace is not None:
            trace.remove()
        if self._model is not None and names is None:
            topology = topology_lib.from_model(self._model, variables, trace)
        else:
            topology = topology_lib.from_variables(variables, names)
        strategy = internals.current_strategy()
        internals.check_strategy(strategy)
        self._recorder.bind(topology, variables, strategy=strategy)
        self._pipeline = Pipeline(self.options, self._recorder, {"front": "Watch"}, on_alert=self._on_alert,
                                  extra_sinks=self._internal.extra_sinks)
        self._pipeline.open()
        self._pipeline.start(None, continuing=False)  # with append: a new segment after the last step

    def step_end(self, loss: float | None = None) -> dict[str, Any] | None:
        """Ends a step on the host: reads and writes the window every ``log_every`` steps.

        Args:
            loss: the step's loss, reported when ``observe`` was given none.

        Returns:
            The window row when one was written, else None.

        Raises:
            NonFiniteGradientError: a non-finite gradient with ``on_nonfinite="raise"``.
        """
        if self._closed:
            raise RuntimeError("Watch.step_end() called after close(); create a new Watch.")
        self._steps_since_read += 1
        if self._steps_since_read >= self.options.log_every or (
            self.options.on_nonfinite in ("stop", "raise") and self._recorder.has_nonfinite()
        ):
            return self._read(loss)
        return None

    def _read(self, loss: float | None = None) -> dict[str, Any] | None:
        self._steps_since_read = 0
        if self._pipeline is None:
            return None
        result = self._pipeline.read(fallback_loss=loss).result
        if result is None:
            return None
        action = nonfinite_action(
            result.alerts,
            self.options.on_nonfinite,
            "Stop requested (watch.stop_requested is True).",
        )
        if action is not None:
            kind, message = action
            if kind == "raise":
                raise NonFiniteGradientError(message)
            self.stop_requested = self.stop_requested or kind == "stop"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return dict(result.window_row)  # a copy: the writer thread may still format it

    def flush(self) -> dict[str, Any] | None:
        """Writes the steps observed since the last write now.

        Returns:
            The window row, or None when no step was observed since the last write.
        """
        return self._read()

    def close(self) -> None:
        """Writes what is left and closes the files (also when the last read raises). Idempotent.

        Raises:
            NonFiniteGradientError: the last window had a non-finite gradient and
                ``on_nonfinite="raise"``; raised once the files are closed.
        """
        if self._closed:
            return
        if self._trace is not None:
            self._trace.remove()
        self._closed = True
        if self._pipeline is not None:
            try:
                self._read()
                if self._pipeline.steps_seen == 0:
                    warnings.warn("Watch closed without observing any step.", stacklevel=2)
            finally:
                self._pipeline.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the block's own error goes on: closing never replaces it
            self.close()
        except Exception as error:  # noqa: BLE001
            logger.warning("gradwatch: Watch closed after %s; the last window said: %s",
                           exc_type.__name__, error)
