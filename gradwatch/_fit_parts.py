"""The parts a ``GradientMonitor`` builds for a model: a recorder and its pipeline,
bound when the watched variables exist."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from gradwatch._capture import fit_tap
from gradwatch._capture import keras_internals as internals
from gradwatch._capture import model_topology as topology_lib
from gradwatch._capture.call_trace import CallTrace
from gradwatch._capture.recorder import Recorder
from gradwatch._internal_options import InternalOptions
from gradwatch._options import Options
from gradwatch._pipeline import Pipeline
from gradwatch._segments import RunHistory

logger = logging.getLogger("gradwatch")


class FitParts:
    """Binds a recorder and a pipeline to a model's variables, at a fit's start or,
    on one replica, at the first traced step: then the layers are ordered as the
    forward pass calls them, and a subclassed model built by that first call is
    watched whole.

    Args:
        options: the monitor's options.
        internal: the monitor's internal switches.
        on_alert: called with every alert row.
    """

    def __init__(self, options: Options, internal: InternalOptions,
                 on_alert: Callable[[dict[str, Any]], None] | None, optimizers: Any = None):
        self._options, self._internal, self._on_alert = options, internal, on_alert
        self._named = check_optimizers(optimizers)
        self.recorder: Recorder | None = None
        self.pipeline: Pipeline | None = None
        self._variables: list[Any] = []
        self._trace: CallTrace | None = None
        self._pending: tuple[Any, Any, Any] | None = None
        self.discard_trace = False  # the current trace bound the recorder: TensorFlow traces the step again
        self.history = RunHistory()  # the run's segments, over every fit and recorder
        self._start: tuple[Any, int] | None = None  # (optimizer, iterations at the last fit's end)
        self._fresh = True  # the recorder has counted no fit yet
        self.tapped: list[tuple[str, Any]] = []  # (group, optimizer) of this fit
        self._tap: Callable[..., Any] | None = None  # the monitor's tap method
        self._model: Any = None
        self._groups: dict[int, str] = {}  # variable key -> the group of the optimizer applying it
        self._open_at_step_end = False
        self._first_batch = False
        self.warned_idle = False

    # ---------------------------------------------------------------- optimizers and hooks

    def install(self, model: Any, strategy: Any, tap: Callable[..., Any], step_end: Callable[[], None],
                claim: Callable[[Any], None] = lambda optimizer: None) -> list[tuple[str, Any]]:
        """Taps every optimizer of this fit and, on one replica, hooks the end of
        ``train_step``: ``tap(optimizer, group, original_apply, grads, variables)``,
        ``step_end()`` after each step; ``claim(optimizer)`` first, for each (it may refuse
        an optimizer another monitor taps). Returns the (group, optimizer) pairs tapped:
        the ``optimizers`` argument's, then the model's (``model.optimizer`` and any
        optimizer among its attributes); under several replicas ``model.optimizer`` only.

        Raises:
            ValueError: no optimizer was found.
        """
        named = self._named
        if strategy is not None:
            # several replicas: one update per step, by model.optimizer (the single-optimizer path)
            found = [("optimizer", model.optimizer)] if getattr(model, "optimizer", None) is not None else []
            if named:
                warnings.warn("GradientMonitor(optimizers=...) is not supported under a tf.distribute "
                              "strategy: only model.optimizer is tapped.", stacklevel=3)
            named = []
        else:
            found = internals.find_optimizers(model)
        attribute = {id(optimizer): name for name, optimizer in found}
        tapped, seen = [], set()
        for k, (name, optimizer) in enumerate(named + found):
            if id(optimizer) not in seen:
                seen.add(id(optimizer))
                tapped.append((name or attribute.get(id(optimizer), f"optimizer_{k}"), optimizer))
        if not tapped:
            raise ValueError("GradientMonitor found no optimizer: model.optimizer is None and no attribute "
                             "of the model is a keras optimizer. Call model.compile(optimizer=...), pass "
                             "GradientMonitor(optimizers=[...]), or use gradwatch.Watch in the train step.")
        for _, optimizer in tapped:
            internals.refuse_double_clipping("GradientMonitor", self._options.clip, optimizer)
        for _, optimizer in tapped:
            claim(optimizer)
        for name, optimizer in tapped:
            internals.install_apply_tap(optimizer, functools.partial(tap, optimizer, name))
        if strategy is None:
            internals.install_step_end_hook(model, step_end)
        self.tapped, self._model, self._first_batch, self.warned_idle = tapped, model, True, False
        self._tap = tap
        return tapped

    def uninstall(self) -> None:
        """Removes the taps and the step-end hook (the model is left as it was found)."""
        owner = getattr(self._tap, "__self__", None)
        for _, optimizer in self.tapped:
            if internals.apply_tap_owner(optimizer) is owner:  # not a tap another monitor installed since
                internals.remove_apply_tap(optimizer)
        if self._model is not None:
            internals.remove_step_end_hook(self._model)

    def note_group(self, group: str, variables: Any) -> None:
        """In the tap, at trace time: the variables an optimizer applies form its group
        (a variable applied by several optimizers stays in the first's)."""
        for variable in variables:
            self._groups.setdefault(internals.variable_key(variable), group)

    def end_step(self) -> None:
        """In the traced step, after ``train_step``: ends the recorder's step with the
        step's loss and, after the first traced step, opens the files (every optimizer
        the step applies is known by then: its group is in ``run.json``)."""
        self.discard_trace = False  # the next trace of the step is the one that runs
        if not self.bound:
            return
        self.recorder.end_step(internals.loss_tracker_totals(self._model))
        if self._open_at_step_end:
            self._open_at_step_end = False
            with tf.init_scope():
                self._set_groups()
                self.pipeline.open()
                self.start_steps()  # still in the first step's trace: before it runs

    def first_batch_warning(self) -> str | None:
        """After a fit's first batch (once): the warning when no tapped optimizer applied
        anything, naming the optimizers found and what to do; else None."""
        if not self._first_batch:
            return None
        self._first_batch = False
        if not self.waiting and (self.recorder is None or self.recorder.observed_steps() > 0
                                 or self.pipeline.steps_seen > 0):
            return None  # steps were observed (or nothing is watched, and that was said)
        self.warned_idle = True
        found = ", ".join(f"{name} ({type(optimizer).__name__})" for name, optimizer in self.tapped)
        return (f"GradientMonitor: the first batch applied no gradient through the optimizers it taps: "
                f"{found}. Nothing is monitored. If model.train_step applies another optimizer, pass "
                "it with GradientMonitor(optimizers=[...]) (or keep it as an attribute of the model); if "
                "it updates the weights without optimizer.apply/apply_gradients, use gradwatch.Watch in it.")

    def fallback_loss_allowed(self) -> bool:
        """Whether the logs' ``loss`` may stand for a window's unknown loss: only under
        Keras's own ``train_step`` (a custom one's ``loss`` is often an epoch's running mean)."""
        return self._model is None or not internals.has_custom_train_step(self._model)

    def _set_groups(self) -> None:
        topology = self.recorder.topology
        for info, variable in zip(topology.variables, self._variables):
            info.group = self._groups.get(internals.variable_key(variable), "")

    @property
    def bound(self) -> bool:
        """Returns whether a recorder is bound for the current fit."""
        return self.recorder is not None and self._pending is None

    @property
    def waiting(self) -> bool:
        """Returns whether the parts wait for the first traced step to bind."""
        return self._pending is not None

    def begin_fit(self, model: Any, optimizer: Any, strategy: Any, iterations_at_end: int) -> bool:
        """Binds now, or prepares to bind at the first traced step. Returns False when
        there is nothing to watch (no variables, and no first step to wait for)."""
        self._model = model
        self._start = (optimizer, iterations_at_end)  # placed at the first step: start_steps
        variables = list(model.trainable_variables)
        same = self.recorder is not None and [id(v) for v in variables] == [id(v) for v in self._variables]
        if same:
            self._open(optimizer, variables, strategy, in_trace=True)
            return True
        if not variables and internals.is_built(model):
            return False  # built, and nothing trainable: no step will create variables
        # the activation probe wraps layers' calls before the first trace: bind a built model now
        built_for_probe = self._options.activation_probe and variables and internals.is_built(model)
        if strategy is None and not built_for_probe:
            # bind in the first trace: the call order and a built subclassed model are known then
            self._trace = CallTrace(model)
            self._trace.install()
            self._pending = (model, optimizer, strategy)
            return True
        if not variables:
            return False
        self._bind(model, optimizer, variables, strategy, None)
        self.note_group("optimizer", variables)  # bound before any step: one optimizer
        self._set_groups()
        self._open(optimizer, variables, strategy)
        return True

    def bind_in_trace(self) -> None:
        """In the first traced step (the tap): binds to the variables the forward pass built."""
        model, optimizer, strategy = self._pending
        self._pending = None
        trace, self._trace = self._trace, None
        trace.remove()
        tracing = tf.inside_function()
        with tf.init_scope():
            variables = list(model.trainable_variables)
            if not variables:
                warnings.warn("GradientMonitor: the model has no trainable variables; there is nothing "
                              "to watch and the monitor stays idle.", stacklevel=2)
                self.recorder = self.pipeline = None
                self._variables = []
                return
            if [id(v) for v in variables] != [id(v) for v in self._variables] or self.recorder is None:
                self._bind(model, optimizer, variables, strategy, trace)
                # A trace that creates variables is traced again before it runs (tf.function
                # keeps only a trace that creates none): this one need not record.
                self.discard_trace = tracing
            # the files open at the end of this step, once every optimizer it applies is known
            self._open(optimizer, variables, strategy, open_files=False)
            self._open_at_step_end = True

    def start_steps(self) -> None:
        """Before the fit's first step (other callbacks' ``on_train_begin`` may have moved the
        optimizer's iterations): places the fit's steps in the run, as a resume or a new segment."""
        if self._start is None or not self.bound:
            return
        optimizer, iterations_at_end = self._start
        self._start = None
        with tf.init_scope():
            iterations = int(internals.iterations(optimizer).numpy())
        continuing = not self._fresh and iterations == iterations_at_end
        self._fresh = False
        self.pipeline.start(iterations, continuing)

    def _bind(self, model: Any, optimizer: Any, variables: list[Any], strategy: Any,
              trace: CallTrace | None) -> None:
        topology = topology_lib.from_model(model, variables, trace)
        if self.pipeline is not None:
            self.pipeline.close()
        # update/weight snapshots from the host, measured in the tap after the update
        self.recorder = Recorder(self._options, host_update_snapshots=True,
                                 front_ends_steps=strategy is None and internals.has_custom_train_step(model))
        activation_layers = (topology_lib.relu_layers(model, topology) if self._options.activation_probe
                             else None)
        self.recorder.bind(topology, variables, strategy=strategy, activation_layers=activation_layers)
        run_info = fit_tap.fit_run_info(model, optimizer, strategy, self.tapped)
        self.pipeline = Pipeline(self._options, self.recorder, run_info, on_alert=self._on_alert,
                                 extra_sinks=self._internal.extra_sinks, history=self.history)
        self._variables = variables
        self._fresh = True

    def _open(self, optimizer: Any, variables: list[Any], strategy: Any, in_trace: bool = False,
              open_files: bool = True) -> None:
        if open_files:
            self.pipeline.open()
        if strategy is not None:
            # one replica builds an optimizer in the tap, as its own apply would
            internals.ensure_built(optimizer, variables, strategy)
        if in_trace and self._options.activation_probe:
            # this trace's forward pass is over: its layers' calls can only be wrapped from the next fit
            logger.info("gradwatch: activation_probe counts from the next fit: this fit's first step "
                        "built the model.")
        else:
            self.recorder.count_activations(True)

    def end_fit(self) -> None:
        """Removes what the fit installed and closes the files (the recorder is kept)."""
        self.uninstall()
        if self._trace is not None:
            self._trace.remove()
            self._trace = None
        self._pending = None
        self._open_at_step_end = False
        self._start = None
        if self.recorder is not None:
            self.recorder.count_activations(False)
        if self.pipeline is not None:
            self.pipeline.close()


def check_optimizers(optimizers: Any) -> list[tuple[str, Any]]:
    """Returns ``GradientMonitor(optimizers=...)`` as (group, optimizer) pairs: a dict of
    name to optimizer, or a list of optimizers (group None: named after the model's
    attribute that holds it, else ``optimizer_<k>``).

    Raises:
        TypeError: not a list or dict of keras optimizers.
    """
    if optimizers is None:
        return []
    if isinstance(optimizers, dict):
        items = list(optimizers.items())
    else:
        items = [(None, value) for value in optimizers]
    import keras

    for name, value in items:
        if not isinstance(name, (str, type(None))) or not isinstance(value, keras.optimizers.Optimizer):
            raise TypeError(f"optimizers must be a list of keras optimizers or a dict of name to optimizer; "
                            f"received {name!r}: {value!r}.")
    return items
