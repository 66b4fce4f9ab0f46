"""The parts a ``GradientMonitor`` builds for a model: a recorder and its pipeline,
bound when the watched variables exist."""

from __future__ import annotations

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
                 on_alert: Callable[[dict[str, Any]], None] | None):
        self._options, self._internal, self._on_alert = options, internal, on_alert
        self.recorder: Recorder | None = None
        self.pipeline: Pipeline | None = None
        self._variables: list[Any] = []
        self._trace: CallTrace | None = None
        self._pending: tuple[Any, Any, Any] | None = None
        self.history = RunHistory()  # the run's segments, over every fit and recorder
        self._start: tuple[Any, int] | None = None  # (optimizer, iterations at the last fit's end)
        self._fresh = True  # the recorder has counted no fit yet

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
        self._open(optimizer, variables, strategy)
        return True

    def bind_in_trace(self) -> None:
        """In the first traced step (the tap): binds to the variables the forward pass built."""
        model, optimizer, strategy = self._pending
        self._pending = None
        trace, self._trace = self._trace, None
        trace.remove()
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
            self._open(optimizer, variables, strategy)
            self.start_steps()

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
                                 xla_branch_min_variables=self._internal.xla_branch_min_variables)
        activation_layers = (topology_lib.relu_layers(model, topology) if self._options.activation_probe
                             else None)
        self.recorder.bind(topology, variables, strategy=strategy, activation_layers=activation_layers)
        run_info = fit_tap.fit_run_info(model, optimizer, strategy)
        self.pipeline = Pipeline(self._options, self.recorder, run_info, on_alert=self._on_alert,
                                 extra_sinks=self._internal.extra_sinks, history=self.history)
        self._variables = variables
        self._fresh = True

    def _open(self, optimizer: Any, variables: list[Any], strategy: Any, in_trace: bool = False) -> None:
        self.pipeline.open()
        internals.ensure_built(optimizer, variables, strategy)
        if in_trace and self._options.activation_probe:
            # this trace's forward pass is over: its layers' calls can only be wrapped from the next fit
            logger.info("gradwatch: activation_probe counts from the next fit: this fit's first step "
                        "built the model.")
        else:
            self.recorder.count_activations(True)

    def end_fit(self) -> None:
        """Removes what the fit installed and closes the files (the recorder is kept)."""
        if self._trace is not None:
            self._trace.remove()
            self._trace = None
        self._pending = None
        self._start = None
        if self.recorder is not None:
            self.recorder.count_activations(False)
        if self.pipeline is not None:
            self.pipeline.close()
