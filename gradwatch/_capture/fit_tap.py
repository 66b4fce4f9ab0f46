"""What ``GradientMonitor``'s tap of ``optimizer.apply`` does inside ``fit``'s step,
and the facts of a fit it reads from Keras."""

from __future__ import annotations

from typing import Any

import keras

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


def lean_eligible(params: dict[str, Any], model: Any, buffered: bool, min_steps: int) -> bool:
    """Returns whether a fit traces a lean step beside the full one: Keras's own
    ``train_step`` (one observation per step: a custom one may apply several
    optimizers, or one several times, and fill the step buffer faster than the host
    counts), one step per
    train-function call (the host then knows every step's place in its window), one
    replica (rows are buffered), and a fit not known to be shorter than ``min_steps``
    (the lean trace is a second trace of the whole train step)."""
    steps, epochs = params.get("steps"), params.get("epochs")
    planned = steps * (epochs - int(params.get("initial_epoch", 0) or 0)) if steps and epochs else None
    return (buffered
            and not internals.has_custom_train_step(model)
            and int(getattr(model, "steps_per_execution", 1) or 1) == 1
            and not getattr(model, "run_eagerly", False)
            and (planned is None or planned >= min_steps))


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
