"""The model's real forward pass, as traced: which layers are called in which order,
and which layer call consumed which layer's output (the graph's edges)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from gradwatch._capture import keras_internals as internals

# Ops that apply an activation themselves (a raw ``tf.nn.relu`` in a subclassed call).
ACTIVATION_OPS = {"Relu": "relu", "Relu6": "relu6", "LeakyRelu": "leaky_relu", "Elu": "elu",
                  "Selu": "selu", "Softplus": "softplus", "Sigmoid": "sigmoid", "Tanh": "tanh"}
# Ops a tensor passes through unchanged in what is zero (autocast, identities).
_TRANSPARENT_OPS = {"Cast", "Identity"}


class LayerCall:
    """One layer's first call: its position, its name scope, and its outputs."""

    def __init__(self, layer: Any, position: int, scope: str, outputs: list[Any]):
        self.layer, self.position, self.scope, self.outputs = layer, position, scope, outputs
        self.consumers: list[LayerCall] = []


def _tensors(structure: Any) -> list[Any]:
    return [t for t in tf.nest.flatten(structure) if tf.is_tensor(t) and hasattr(t, "ref")]


class CallTrace:
    """Records the first call of every layer below a model during a forward pass.

    ``install`` wraps each layer's ``call`` (an instance attribute, removed by
    ``remove``); the wrappers add no op to the graph.

    Args:
        model: the Keras model.
    """

    def __init__(self, model: Any):
        self._layers = internals.ordered_layers(model)
        self._calls: dict[int, LayerCall] = {}
        self._producer: dict[Any, LayerCall] = {}
        self._originals: list[Any] = []

    @property
    def calls(self) -> list[LayerCall]:
        """Returns the recorded calls, in the order the layers were first called."""
        return sorted(self._calls.values(), key=lambda c: c.position)

    def install(self) -> None:
        """Wraps every layer's ``call`` to record its first call."""
        self.remove()
        for layer in self._layers:
            if "call" in layer.__dict__:
                continue  # already wrapped (another probe): leave it as it is
            original = layer.call

            def call(*args, __original=original, __layer=layer, **kwargs):
                scope = _name_scope()
                out = __original(*args, **kwargs)
                self._record(__layer, scope, (args, kwargs), out)
                return out

            self._originals.append(layer)
            layer.__dict__["call"] = call

    def remove(self) -> None:
        """Restores every wrapped layer's own ``call``."""
        for layer in self._originals:
            layer.__dict__.pop("call", None)
        self._originals = []

    def _record(self, layer: Any, scope: str, inputs: Any, out: Any) -> None:
        if id(layer) in self._calls:
            return
        record = LayerCall(layer, len(self._calls), scope, _tensors(out))
        self._calls[id(layer)] = record
        for tensor in _tensors(inputs):
            producer = self._producer.get(_source(tensor).ref())
            if producer is not None and record not in producer.consumers:
                producer.consumers.append(record)
        for tensor in record.outputs:
            self._producer.setdefault(tensor.ref(), record)

    def call_of(self, layer: Any) -> LayerCall | None:
        """Returns the layer's recorded first call, if it was called."""
        return self._calls.get(id(layer))

    def raw_activations(self, record: LayerCall) -> list[str]:
        """Returns the activations applied to the layer's outputs by ops outside any
        recorded layer (a ``tf.nn.relu`` written in a model's ``call``); "linear" for
        any other such consumer."""
        found = []
        for tensor in record.outputs:
            for op in _consumers(tensor):
                if any(op.name.startswith(c.scope + "/") for c in record.consumers if c.scope):
                    continue  # an op of a recorded consumer layer
                if op.name.startswith(record.scope + "/") and record.scope:
                    continue  # the layer's own ops
                found.append(ACTIVATION_OPS.get(op.type, "linear"))
        return found


def _name_scope() -> str:
    try:
        return tf.compat.v1.get_default_graph().get_name_scope()
    except Exception:  # noqa: BLE001 - eager: no graph scope
        return ""


def _source(tensor: Any) -> Any:
    """The tensor before autocasts and identities (what the previous layer returned)."""
    seen = 0
    while seen < 8 and getattr(tensor, "op", None) is not None and not tf.executing_eagerly():
        op = tensor.op
        if op.type not in _TRANSPARENT_OPS or not op.inputs:
            break
        tensor = op.inputs[0]
        seen += 1
    return tensor


def _consumers(tensor: Any) -> list[Any]:
    if tf.executing_eagerly() or not hasattr(tensor, "consumers"):
        return []
    try:
        ops = list(tensor.consumers())
    except (AttributeError, ValueError, NotImplementedError):
        # an eager tensor, from a call recorded outside a trace (a functional model
        # called once eagerly after ``Watch(model=...)``, before its traced step)
        return []
    out = []
    for op in ops:  # look through autocasts and identities
        if op.type in _TRANSPARENT_OPS:
            for output in op.outputs:
                out += _consumers(output)
        else:
            out.append(op)
    return out
