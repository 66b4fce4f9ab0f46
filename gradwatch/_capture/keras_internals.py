"""Every touch of Keras (and tf.distribute) private internals lives here.

gradwatch needs four things Keras does not expose: a tap on the optimizer's
``apply`` (the only place the real per-step gradients pass through in
``model.fit``), a way to force the train function to be traced again, the loss
tracker's running totals (the per-step loss in-graph), and the layers that own
each variable.  ``check_internals`` verifies all of them on the installed Keras
and is exercised by a test, so a Keras release that moves them fails loudly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

TAP_ATTRIBUTE = "apply"
_TAP_MARK = "_gradwatch_tap"


def check_backend() -> None:
    """Raises a clear error on a Keras backend other than TensorFlow."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"gradwatch captures gradients inside TensorFlow graphs, but Keras is running "
            f"on the {backend!r} backend. Set KERAS_BACKEND=tensorflow before importing "
            "keras to use gradwatch."
        )


def check_internals() -> list[str]:
    """Returns the internals this Keras version lacks (empty when all are present)."""
    missing = []
    optimizer_cls = keras.optimizers.Optimizer
    if not callable(getattr(optimizer_cls, "apply", None)):
        missing.append("Optimizer.apply")
    if not callable(getattr(optimizer_cls, "apply_gradients", None)):
        missing.append("Optimizer.apply_gradients")
    model_cls = keras.Model
    if not callable(getattr(model_cls, "make_train_function", None)):
        missing.append("Model.make_train_function")
    if not callable(getattr(keras.layers.Layer, "_flatten_layers", None)):
        missing.append("Layer._flatten_layers")
    probe = keras.layers.Dense(1)
    probe.build((None, 1))
    for attribute in ("_trainable_variables", "_non_trainable_variables"):
        if not isinstance(getattr(probe, attribute, None), list):
            missing.append(f"Layer.{attribute}")
    lso = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD())
    lso.build([keras.Variable(0.0)])
    for attribute in ("inner_optimizer", "dynamic_scale"):
        if getattr(lso, attribute, None) is None:
            missing.append(f"LossScaleOptimizer.{attribute}")
    tracker_owner = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    tracker_owner.compile(optimizer="sgd", loss="mse")
    if loss_tracker_totals(tracker_owner) is None:
        missing.append("Model._loss_tracker.total/count")
    return missing


# --------------------------------------------------------------------- tap


def install_apply_tap(optimizer: Any, tap: Callable[..., Any]) -> None:
    """Routes ``optimizer.apply`` (and so ``apply_gradients``) through ``tap``.

    ``tap(original_apply, grads, trainable_variables)`` must call the original.
    The tap is an instance attribute, so removing it restores the class method.
    """
    remove_apply_tap(optimizer)
    original = getattr(optimizer, TAP_ATTRIBUTE)

    def tapped_apply(grads, trainable_variables=None):
        return tap(original, grads, trainable_variables)

    setattr(tapped_apply, _TAP_MARK, True)
    # the object whose method taps (through a functools.partial too): apply_tap_owner
    tapped_apply.gradwatch_owner = getattr(tap, "__self__", None) or getattr(getattr(tap, "func", None),
                                                                             "__self__", None)
    optimizer.__dict__[TAP_ATTRIBUTE] = tapped_apply


def remove_apply_tap(optimizer: Any) -> bool:
    """Removes a gradwatch tap from the optimizer; True if one was there."""
    current = optimizer.__dict__.get(TAP_ATTRIBUTE)
    if current is not None and getattr(current, _TAP_MARK, False):
        del optimizer.__dict__[TAP_ATTRIBUTE]
        return True
    return False


def apply_tap_owner(optimizer: Any) -> Any:
    """Returns the object whose method the optimizer's gradwatch tap calls (None: no tap)."""
    current = optimizer.__dict__.get(TAP_ATTRIBUTE)
    return getattr(current, "gradwatch_owner", None) if getattr(current, _TAP_MARK, False) else None


def has_apply_tap(optimizer: Any) -> bool:
    return getattr(optimizer.__dict__.get(TAP_ATTRIBUTE), _TAP_MARK, False)


def apply_if_finite(apply_fn: Callable[..., Any], grads, variables, finite: tf.Tensor) -> None:
    """Runs ``apply_fn(grads, variables)`` only when ``finite`` (in-graph), on every replica.

    Under a multi-replica strategy the decision is taken once, in cross-replica
    context (a cond whose branch calls ``merge_call`` is not allowed in replica
    context), as Keras's LossScaleOptimizer does; ``finite`` is the same on every
    replica since it comes from the all-reduced gradient.
    """
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:

        def cross_replica(distribution, finite, grads, variables):
            decision = distribution.experimental_local_results(finite)[0]

            def apply_everywhere():
                distribution.extended.call_for_each_replica(apply_fn, args=(grads, variables))
                return tf.constant(True)

            tf.cond(decision, apply_everywhere, lambda: tf.constant(False))

        context.merge_call(cross_replica, args=(finite, grads, variables))
        return

    def apply_now():
        apply_fn(grads, variables)
        return tf.constant(True)

    tf.cond(finite, apply_now, lambda: tf.constant(False))


def run_function(fn: Any, **kwargs: Any) -> Any:
    """``tf.function(fn, **kwargs)`` for a function each run (recorder, probe, watch)
    creates anew. TensorFlow counts traces per Python code object, not per
    ``tf.function``, so a process that trains several models (the demo, a
    hyperparameter loop) would be warned of "excessive retracing" for what is one
    trace per run; that warning is turned off for these functions only."""
    function = tf.function(fn, **kwargs)
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    return function


class HostFunction:
    """A ``run_function`` of no arguments that the host calls (the recorder's read, the
    update probe's snapshot): after its first call, outside any ``tf.distribute``
    strategy, it calls its traced graph directly. ``tf.function``'s dispatch (binding
    the arguments, hashing the call's context to find the trace) was ~200 of the
    MLP's ~580 us read here (benchmarks/README.md); under a strategy the call's context
    may change the trace, so the ``tf.function`` is called as it is."""

    def __init__(self, fn: Callable[[], Any]):
        self.function = run_function(fn, autograph=False)
        self._concrete = None

    def __call__(self) -> Any:
        if tf.distribute.has_strategy() or not tf.executing_eagerly():
            return self.function()
        if self._concrete is None:
            self._concrete = self.function.get_concrete_function()
        return self._concrete()


def cond(pred: tf.Tensor, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """``tf.cond`` whose branch not taken costs nothing on a step.

    TensorFlow lowers a ``tf.cond`` in a graph to Switch/Merge nodes, so on every
    step the executor sends a dead signal through each node of the branch not
    taken: gradwatch's rare branches (the full pass, the histograms, the unit and
    update measures) are several hundred nodes, visited on every step. Kept as a
    functional ``If`` op, only the branch taken runs. Under XLA (``jit_compile``)
    the cond is left as it is: XLA compiles it into its own conditional.
    """
    graph = tf.compat.v1.get_default_graph()
    if tf.executing_eagerly() or in_xla_context():
        return tf.cond(pred, true_fn, false_fn)
    known = len(graph.get_operations())
    result = tf.cond(pred, true_fn, false_fn)
    from tensorflow.core.framework import attr_value_pb2

    for op in graph.get_operations()[known:]:
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return result


def in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (``jit_compile=True``)."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def poison_unless_finite(grads, finite: tf.Tensor):
    """Makes every gradient NaN unless ``finite``: a LossScaleOptimizer under a
    multi-replica strategy checks only the first replica's gradients, so this makes
    a non-finite step (seen on any replica) skip, with its loss scale lowered, on all."""
    factor = tf.where(finite, 1.0, float("nan"))
    out = []
    for grad in grads:
        if grad is None:
            out.append(None)
        elif isinstance(grad, tf.IndexedSlices):
            out.append(tf.IndexedSlices(grad.values * tf.cast(factor, grad.values.dtype),
                                        grad.indices, grad.dense_shape))
        else:
            out.append(grad * tf.cast(factor, grad.dtype))
    return out


def retrace_train_function(model: Any) -> None:
    """Forces ``fit`` to trace its train function again (so a new tap is traced in)."""
    model.make_train_function(force=True)


def forget_train_function(model: Any) -> None:
    """Drops the traced train function so the next ``fit`` traces a clean one."""
    model.train_function = None


def plain_train_function(model: Any) -> Any:
    """Traces and returns an untapped train function (set as ``model.train_function``)."""
    model.make_train_function(force=True)
    return model.train_function


# --------------------------------------------------------------- optimizer


def find_optimizers(model: Any) -> list[tuple[str, Any]]:
    """The optimizers a model holds: ``model.optimizer`` and every optimizer among its
    attributes (``self.d_optimizer`` set in a subclassed model's ``compile``), as
    (attribute name, optimizer), each once. Keras does not track a model's own
    optimizers; a train_step that applies them reads them from these attributes."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    candidates = [("optimizer", getattr(model, "optimizer", None))] + list(vars(model).items())
    for name, value in candidates:
        if isinstance(value, keras.optimizers.Optimizer) and id(value) not in seen:
            seen.add(id(value))
            found.append((name.lstrip("_") or name, value))
    return found


def build_for_apply(optimizer: Any, variables: Sequence[Any]) -> None:
    """In the tap, before reading a ``LossScaleOptimizer``'s scale: builds it with the
    variables its ``apply`` was called with, as that ``apply`` would first do itself
    (so gradwatch builds nothing the user's step would not)."""
    if is_loss_scale_optimizer(optimizer) and not getattr(optimizer, "built", True):
        optimizer.build(list(variables))
        optimizer.built = True


_STEP_HOOK = "train_step"


def install_step_end_hook(model: Any, hook: Callable[[], None]) -> None:
    """Runs ``hook()`` (in the traced train function) after each ``model.train_step``:
    ``fit`` calls ``self.train_step`` inside its step function, so an instance
    attribute wraps the user's own (or Keras's) step; removed by ``remove_step_end_hook``."""
    remove_step_end_hook(model)
    original = model.train_step

    def train_step(data):
        logs = original(data)
        hook()
        return logs

    setattr(train_step, _TAP_MARK, True)
    model.__dict__[_STEP_HOOK] = train_step


def remove_step_end_hook(model: Any) -> None:
    """Removes a gradwatch step-end hook, restoring the model's own ``train_step``."""
    current = model.__dict__.get(_STEP_HOOK)
    if current is not None and getattr(current, _TAP_MARK, False):
        del model.__dict__[_STEP_HOOK]


def has_custom_train_step(model: Any) -> bool:
    """Whether the model's class overrides ``train_step`` (a GAN, a VAE, ...)."""
    return type(model).train_step is not keras.Model.train_step


def ensure_built(optimizer: Any, variables: Sequence[Any], strategy: Any = None) -> None:
    """Builds the optimizer now (as its first ``apply`` would) so the tap can
    read its loss scale and iterations while the train function is traced (only
    under a multi-replica strategy, where it cannot be built in the replica step)."""
    if getattr(optimizer, "built", True):
        return
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        optimizer.build(list(variables))
    optimizer.built = True


def is_loss_scale_optimizer(optimizer: Any) -> bool:
    return isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)


def base_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds iterations and learning rate (inner of a LossScaleOptimizer)."""
    while is_loss_scale_optimizer(optimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def loss_scale(optimizer: Any) -> tf.Tensor | None:
    """The factor the gradients reaching ``optimizer.apply`` are multiplied by."""
    scale = None
    if is_loss_scale_optimizer(optimizer):
        scale = tf.cast(tf.convert_to_tensor(optimizer.dynamic_scale), tf.float32)
    factor = getattr(base_optimizer(optimizer), "loss_scale_factor", None)
    if factor is not None:
        factor_t = tf.constant(float(factor), tf.float32)
        scale = factor_t if scale is None else scale * factor_t
    return scale


def optimizer_clipping(optimizer: Any) -> dict[str, float]:
    """The clipping the optimizer applies itself (after gradwatch sees the gradients)."""
    inner = base_optimizer(optimizer)
    out = {}
    for name in ("clipnorm", "global_clipnorm", "clipvalue"):
        value = getattr(inner, name, None)
        if value is not None:
            out[name] = float(value)
    return out


def refuse_double_clipping(front: str, clip: Any, optimizer: Any) -> None:
    """Raises when both gradwatch and the optimizer would clip the same gradients."""
    own = optimizer_clipping(optimizer)
    if clip is None or not own:
        return
    settings = ", ".join(f"{k}={v}" for k, v in own.items())
    raise ValueError(
        f"{front}(clip={clip!r}) and the optimizer's own clipping ({settings}) would clip twice. "
        "Remove one: build the optimizer without clipnorm/global_clipnorm/clipvalue, or pass "
        f"clip=None to {front}."
    )


def iterations(optimizer: Any) -> tf.Tensor:
    return tf.convert_to_tensor(base_optimizer(optimizer).iterations)


def learning_rate(optimizer: Any) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(base_optimizer(optimizer).learning_rate), tf.float32)


def trainable_variables_of(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "_trainable_variables", []) or [])


# ------------------------------------------------------------------- model


def loss_tracker_totals(model: Any) -> tuple[tf.Tensor, tf.Tensor] | None:
    """(total, count) of the model's running-mean loss tracker, if it has one."""
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:
        return None
    total = getattr(tracker, "total", None)
    count = getattr(tracker, "count", None)
    if total is None or count is None:
        return None
    return tf.convert_to_tensor(total), tf.convert_to_tensor(count)


def ordered_layers(model: Any) -> list[Any]:
    """All layers below the model, input to output, parents before children."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def is_built(model: Any) -> bool:
    """Whether the model and every layer below it are built (their variables exist)."""
    return bool(getattr(model, "built", False)) and all(
        getattr(layer, "built", True) for layer in ordered_layers(model))


def direct_sublayers(layer: Any) -> list[Any]:
    """The layers directly below ``layer`` (not theirs)."""
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=False)) if flatten is not None else []


def consumers_of(layer: Any) -> list[Any]:
    """The layers a functional model feeds this layer's output to (its graph's edges);
    empty where the model has no graph (subclassed) or the layer is last."""
    consumers = []
    for node in getattr(layer, "_outbound_nodes", None) or []:
        operation = getattr(node, "operation", None)
        if operation is not None and operation not in consumers:
            consumers.append(operation)
    return consumers


def owns_variables(layer: Any) -> bool:
    return bool(
        getattr(layer, "_trainable_variables", None)
        or getattr(layer, "_non_trainable_variables", None)
    )


def variable_key(variable: Any) -> int:
    return id(variable)


def as_variable(key: Any) -> Any:
    """Returns the variable a ``names`` key stands for (a ``tf.Variable``, its ``.ref()``,
    or a Keras variable), or None when it stands for none."""
    deref = getattr(key, "deref", None)
    if callable(deref):
        key = deref()
    return key if isinstance(key, (tf.Variable, keras.Variable)) else None


def variable_identities(variable: Any) -> tuple[int, ...]:
    """The keys of a variable: its own, and for a Keras variable the ``tf.Variable`` it holds."""
    if isinstance(variable, keras.Variable):
        return variable_key(variable), variable_key(variable.value)
    return (variable_key(variable),)


def variable_owners(layers: Sequence[Any]) -> dict[int, Any]:
    """Maps each variable (by ``variable_key``) to the innermost layer that created it."""
    owner: dict[int, Any] = {}
    for layer in layers:
        own = list(getattr(layer, "_trainable_variables", []) or []) + list(
            getattr(layer, "_non_trainable_variables", []) or []
        )
        for variable in own:
            owner[variable_key(variable)] = layer
    return owner


def variable_path(variable: Any) -> str:
    """A Keras variable's path, or a raw tf.Variable's name without ``:0``."""
    path = getattr(variable, "path", None)
    if isinstance(path, str) and path:
        return path
    name = getattr(variable, "name", "") or "variable"
    return name[:-2] if name.endswith(":0") else name


# ------------------------------------------------------------- distribution


def current_strategy() -> tf.distribute.Strategy | None:
    """The strategy whose scope (or replica context) is active, if not the default."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    return None


SUPPORTED_STRATEGIES = (
    "OneDeviceStrategy",
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "CollectiveAllReduceStrategy",  # MultiWorkerMirroredStrategy's implementation class
)


def check_strategy(strategy: Any) -> None:
    """Raises a clear error for a tf.distribute strategy gradwatch was not built for."""
    if strategy is None:
        return
    name = type(strategy).__name__
    if name not in SUPPORTED_STRATEGIES:
        raise ValueError(
            f"gradwatch supports the default strategy, {', '.join(SUPPORTED_STRATEGIES[:3])}; "
            f"the model runs under {name}, whose gradient aggregation it has not been checked "
            "against. Train without gradwatch under this strategy, or under one of those."
        )


def model_strategy(model: Any) -> tf.distribute.Strategy | None:
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        return None
    default = tf.distribute.get_strategy() if not tf.distribute.has_strategy() else None
    if default is not None and strategy is default:
        return None
    if type(strategy).__name__ in ("_DefaultDistributionStrategy",):
        return None
    return strategy


def replica_variable(initial_value: Any, name: str, strategy: Any = None) -> tf.Variable:
    """A gradwatch-owned variable that every replica may write in-graph.

    Created outside any trace (``init_scope``) and, under a strategy, mirrored
    with the first replica's write kept: gradwatch only writes values derived
    from all-reduced gradients, which are the same on every replica.
    """
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with tf.init_scope(), scope:
        return tf.Variable(
            initial_value,
            name=name,
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )


def is_chief(strategy: Any = None) -> bool:
    """Whether this process writes: True unless a multi-worker strategy says another
    task is the chief (the task of type "chief", else worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None:
        return True
    task_type, task_id = getattr(resolver, "task_type", None), getattr(resolver, "task_id", None)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    try:
        has_chief = "chief" in resolver.cluster_spec().as_dict()
    except (ValueError, AttributeError):
        has_chief = False
    return task_type == "worker" and not has_chief and int(task_id or 0) == 0


def replicas_to_reduce() -> tf.distribute.ReplicaContext | None:
    """The replica context to all-reduce in, when running on several replicas."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context
