"""What ``GradientMonitor``'s tap of ``optimizer.apply`` does inside ``fit``'s step,
and the facts of a fit it reads from Keras."""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np

from gradwatch._capture import keras_internals as internals
from gradwatch._capture.recorder import Recorder, StepContext


def observe_and_apply(recorder: Recorder, optimizer: Any, model: Any, on_nonfinite: str, lean: bool,
                      original_apply: Any, grads: Any, trainable_variables: Any,
                      reads_in_time: bool = False) -> Any:
    """Records the step's watched gradients, then applies what the optimizer gets.

    Args:
        recorder: the bound recorder.
        optimizer: the tapped optimizer (one of several: its ``apply`` observes its variables).
        model: the model being fitted (its loss tracker gives the step's loss).
        on_nonfinite: the monitor's mode; other than "warn", a non-finite step is not applied.
        lean: trace the lean step.
        original_apply: the optimizer's own ``apply``.
        grads: the gradients ``apply`` was called with.
        trainable_variables: their variables (None: the optimizer's own list).
        reads_in_time: the host reads before the step buffer fills (``Recorder.observe``).

    Returns:
        What ``original_apply`` returned.
    """
    grads = list(grads)
    if trainable_variables is None:
        trainable_variables = internals.trainable_variables_of(optimizer)
    trainable_variables = list(trainable_variables)
    internals.build_for_apply(optimizer, trainable_variables)
    watched = [i for i, v in enumerate(trainable_variables) if recorder.watches(v)]
    loss_scaled = internals.is_loss_scale_optimizer(optimizer)
    guard = on_nonfinite != "warn"
    context = StepContext(
        learning_rate=internals.learning_rate(optimizer),
        loss_scale=internals.loss_scale(optimizer),
        loss_totals=internals.loss_tracker_totals(model),
        overflow_skips=loss_scaled or guard,
    )
    watched_grads = [grads[i] for i in watched]
    slots = recorder.slots_of(watched_grads, [trainable_variables[i] for i in watched])
    observed = recorder.observe(watched_grads, slots, context, lean=lean, fold_when_full=not reads_in_time)
    for k, i in enumerate(watched):
        grads[i] = observed.grads[k]
    if loss_scaled:
        # the LossScaleOptimizer skips non-finite steps itself (and lowers its scale);
        # under several replicas make sure it sees what any replica saw
        if internals.replicas_to_reduce() is not None:
            grads = internals.poison_unless_finite(grads, observed.finite)
        result = original_apply(grads, trainable_variables)
    elif guard:
        # the host learns of a NaN only later, so the update of a non-finite step is
        # never applied (weights and optimizer state untouched, on every replica)
        result = internals.apply_if_finite(original_apply, grads, trainable_variables, observed.finite)
    else:
        result = original_apply(grads, trainable_variables)
    recorder.after_update()  # the update probe reads the weights it just moved
    return result


#: The lean step's first call (its trace, and its XLA compile under jit) took this share
#: of the fit's first step on the benchmark models, jit off: MLP 0.55 of 1.41 s, LSTM 0.84
#: of 1.79 s, CNN 0.79 of 1.92 s, transformer 1.33 of 3.26 s, 24-layer MLP 1.94 of 6.59 s,
#: 100-layer net 21.8 of 52.6 s (0.29-0.47).
LEAN_TRACE_SHARE = 0.45
#: ... and a lean step saves at most this share of a full one: the MLP 2% (jit off) and
#: 3.6% (jit on), the 24-layer net 3-5%, the 100-layer net 3.5% (benchmarks/results/step_ab-*).
LEAN_SAVING = 0.03
#: ... and at most this many seconds a step per second of the full step's first call.
#: What the lean step leaves out is per-op work (conditionals not taken, their inputs),
#: which grows with the graph the first call traces, not with the step's arithmetic: on
#: a model whose step is mostly compute the lean step saves next to nothing (CNN and
#: transformer: lean and full steps within 0.5% of each other; the LSTM's lean steps
#: were 3% slower), while the MLP saves ~0.15 ms a step on a 1.4 s first call and the
#: 24-layer net ~0.5 ms on 6.6 s (benchmarks/README.md, fourteenth session). A lean step
#: then pays for its trace after ~5,600 steps at most, whatever the model.
LEAN_SAVING_PER_TRACE_SECOND = 8e-5
#: Full steps timed (after the first call) before the lean step is decided on.
LEAN_TIMED_STEPS = 8


class LeanDecision:
    """Whether a fit's lean step pays for its trace yet: it is traced only once the
    full steps it saves outweigh what its first call costs, both estimated from the
    fit's own first call (its trace) and typical full step. With the fit's length known,
    that is decided once; with an unknown length, the lean step is traced once the full
    steps' extra cost so far reaches its trace's (ski rental: never more than twice the
    best choice's cost). A 1,050-step fit of the 100-layer net then saves ~22 s of its
    ~45 s of one-off seconds.

    Args:
        always: trace the lean step from the first chance (a seam for tests and the step A/B).
    """

    def __init__(self, always: bool = False):
        self.lean = always
        self._times: list[float] = []
        self._steps_done = 0
        self._step: float | None = None  # the typical full step, once timed
        self._never = False  # a fit of known length that the lean step does not pay in

    def time(self, call: Any) -> Any:
        """Runs one full train-function call, timed while the decision is open."""
        if self.lean or len(self._times) > LEAN_TIMED_STEPS:
            return call()
        start = time.perf_counter()
        try:
            return call()
        finally:
            self._times.append(time.perf_counter() - start)

    def decide(self, steps: int, params: dict[str, Any]) -> bool:
        """After a batch of ``steps`` steps (of the fit whose ``params`` give its length):
        returns (and keeps, once True) whether the lean step pays now."""
        self._steps_done += steps
        if self.lean or self._never or len(self._times) <= LEAN_TIMED_STEPS:
            return self.lean
        if self._step is None:  # the timed steps are all in: their median is final
            self._step = float(np.median(self._times[1:]))
        planned = planned_steps(params)
        steps_left = None if planned is None else max(planned - self._steps_done, 0)
        self.lean = lean_pays(self._times[0], self._step, self._steps_done, steps_left)
        # with the length known the steps left only shrink: a lean step that does not pay
        # now never will, and the host stops asking (a median at every batch end: 13 us)
        self._never = not self.lean and steps_left is not None
        return self.lean


def lean_pays(first_call: float, step: float, steps_done: int, steps_left: int | None) -> bool:
    """Whether tracing the lean step now costs less than it saves (``LeanDecision``).

    Args:
        first_call: seconds of the fit's first train-function call (the full step's trace).
        step: seconds of a typical full step.
        steps_done: the fit's steps so far.
        steps_left: the fit's steps to come, None when unknown.
    """
    trace = max(first_call - step, 0.0)
    cost = LEAN_TRACE_SHARE * trace
    saving = min(LEAN_SAVING * step, LEAN_SAVING_PER_TRACE_SECOND * trace)
    if steps_left is None:
        return steps_done * saving >= cost
    return steps_left * saving > cost


def planned_steps(params: dict[str, Any]) -> int | None:
    """The steps ``fit`` plans (its ``params``), None when unknown."""
    steps, epochs = params.get("steps"), params.get("epochs")
    return steps * (epochs - int(params.get("initial_epoch", 0) or 0)) if steps and epochs else None


def host_counts_steps(model: Any, buffered: bool) -> bool:
    """Returns whether the host sees every step of a fit as it ends: Keras's own
    ``train_step`` (one observation per step: a custom one may apply several
    optimizers, or one several times, and fill the step buffer faster than the host
    counts), one step per train-function call (the host then knows every step's place
    in its window), one replica (rows are buffered), and compiled steps. Such a fit's
    host reads before its step buffer fills, so its steps trace no fold of a full buffer
    (``Recorder.observe(fold_when_full=False)``)."""
    return (buffered
            and not internals.has_custom_train_step(model)
            and int(getattr(model, "steps_per_execution", 1) or 1) == 1
            and not getattr(model, "run_eagerly", False))


def lean_eligible(params: dict[str, Any], model: Any, buffered: bool, min_steps: int) -> bool:
    """Returns whether a fit traces a lean step beside the full one: the host counts
    its steps (``host_counts_steps``), and the fit is not known to be shorter than
    ``min_steps`` (the lean trace is a second trace of the whole train step)."""
    planned = planned_steps(params)
    return host_counts_steps(model, buffered) and (planned is None or planned >= min_steps)


def fit_run_info(model: Any, optimizer: Any, strategy: Any,
                 tapped: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """Returns the ``run.json`` entries a fit adds: optimizer(s), precision, strategy,
    compile options, and where the ``loss`` column comes from."""
    policy = keras.mixed_precision.dtype_policy()
    return {
        "optimizers": [{"group": name, "class": type(internals.base_optimizer(opt)).__name__}
                       for name, opt in tapped or []],
        "loss": loss_source(model),
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


def loss_source(model: Any) -> dict[str, str]:
    """Returns the ``run.json`` ``loss`` entry: where the ``loss`` column comes from, and
    why it may be NaN."""
    if not internals.has_custom_train_step(model):
        return {"source": "keras_loss_tracker",
                "note": "the mean over each window's steps of the step's loss (Keras's loss tracker)"}
    return {"source": "keras_loss_tracker",
            "note": (f"{type(model).__name__}.train_step is the model's own: the loss column is the mean "
                     "over each window's steps of the loss the step adds to Keras's loss tracker (as "
                     "Keras's default train_step does, or a train_step that updates the metric named "
                     "'loss' of model.metrics). Where the train_step does not update it, the loss is NaN: "
                     "what a train_step returns (e.g. its own Mean tracker's result) is a running mean "
                     "over the epoch, not the step's loss, and is not used.")}
