"""Builds the run's ``Topology`` from a live Keras model or raw variables
(the only place that looks at the model's layers)."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from gradwatch._capture import keras_internals as internals
from gradwatch._capture.call_trace import CallTrace, LayerCall
from gradwatch._topology import RELU_FAMILY, LayerInfo, Topology, VariableInfo

# Layers that sit between a layer and its activation without changing which
# units are alive (the activation after them is the layer's activation).
_PASS_THROUGH = {
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "GaussianNoise",
}


def _activation_name(activation: Any) -> str:
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return str(name).lower()


def _layer_activation(layer: Any) -> str | None:
    """The activation a layer applies itself, or None if it applies none."""
    class_name = type(layer).__name__
    if class_name == "ReLU":
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        max_value = getattr(layer, "max_value", None)
        if slope:
            return "leaky_relu"
        return "relu6" if max_value is not None and float(max_value) == 6.0 else "relu"
    if class_name == "LeakyReLU":
        return "leaky_relu"
    if class_name in ("ELU", "PReLU", "Softmax"):
        return class_name.lower()
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    name = _activation_name(activation)
    return None if name == "linear" else name


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        taken.add(name)
        return name
    k = 1
    while f"{name}_{k}" in taken:
        k += 1
    taken.add(f"{name}_{k}")
    return f"{name}_{k}"


def _layer_paths(model: Any, variables: Sequence[Any], owner: dict[int, Any]) -> dict[int, str]:
    """Returns, per owning layer, its path below the model (from its variables' paths)."""
    prefix = f"{model.name}/"
    paths: dict[int, str] = {}
    for var in variables:
        layer = owner.get(internals.variable_key(var))
        if layer is None or id(layer) in paths:
            continue
        path = internals.variable_path(var)
        path = path[len(prefix):] if path.startswith(prefix) else path
        paths[id(layer)] = "/".join(path.split("/")[:-1]) or layer.name
    return paths


def short_names(paths: dict[Any, str]) -> dict[Any, str]:
    """Returns, per key, the shortest trailing part of its path that no other path
    ends with (``key`` alone when unique, else ``block_1/attention/key``)."""
    names: dict[Any, str] = {}
    parts = {key: path.split("/") for key, path in paths.items()}
    for key, mine in parts.items():
        for length in range(1, len(mine) + 1):
            suffix = mine[-length:]
            if not any(other[-length:] == suffix for k, other in parts.items() if k != key):
                names[key] = "/".join(suffix)
                break
        else:  # the same path twice: tell them apart by their order
            names[key] = _unique("/".join(mine), set(names.values()))
    return names


def layer_names(model: Any, variables: Sequence[Any]) -> dict[int, str]:
    """Returns the name of each variable-owning layer (by ``id``) as the run reports it."""
    owner = internals.variable_owners(internals.ordered_layers(model))
    return short_names(_layer_paths(model, variables, owner))


def from_model(model: Any, variables: Sequence[Any], trace: CallTrace | None = None) -> Topology:
    """Topology of a Keras model for the given (trainable) variables.

    Args:
        model: the Keras model.
        variables: the watched variables.
        trace: the model's traced forward pass, if recorded: layers are then ordered
            as first called, and the activation that follows a layer is read from
            the graph's edges; without it, from the model's list of layers.

    Returns:
        The layers input to output and the variables.
    """
    layers = internals.ordered_layers(model)
    owner = internals.variable_owners(layers)
    listed = {id(layer): i for i, layer in enumerate(layers)}
    names = short_names(_layer_paths(model, variables, owner))
    order_key = _order_keys(model, layers, trace)
    prefix = f"{model.name}/"
    taken_variables: set[str] = set()
    layer_infos: dict[str, LayerInfo] = {}
    var_infos: list[VariableInfo] = []
    for var in variables:
        layer = owner.get(internals.variable_key(var))
        path = internals.variable_path(var)
        path = path[len(prefix):] if path.startswith(prefix) else path
        if layer is None:  # a variable no layer owns: its path says where it lives
            parts = path.split("/")
            layer_name = "/".join(parts[:-1]) or parts[0]
            info = LayerInfo(layer_name, (len(layers), 0, len(layers)), "", "", [])
        else:
            layer_name = names[id(layer)]
            call = trace.call_of(layer) if trace is not None else None
            index = order_key[id(layer)]
            activation = (_traced_activation(trace, call) if call is not None
                          else _graph_activation(layer) or _following_activation(layers, listed[id(layer)]))
            info = LayerInfo(layer_name, index, type(layer).__name__, activation, [])
        info = layer_infos.setdefault(layer_name, info)
        var_info = VariableInfo(
            name=_unique(path, taken_variables),
            layer=layer_name,
            shape=[int(d) for d in var.shape],
            dtype=str(getattr(var.dtype, "name", var.dtype)),
            layer_index=info.index,
        )
        info.variables.append(var_info.name)
        var_infos.append(var_info)
    ordered = sorted(layer_infos.values(), key=lambda li: li.index)
    for i, info in enumerate(ordered):
        info.index = i
    renumbered = {info.name: info.index for info in ordered}
    for var_info in var_infos:
        var_info.layer_index = renumbered[var_info.layer]
    return Topology(
        layers=ordered,
        variables=var_infos,
        model_name=str(model.name),
        model_class=type(model).__name__,
    )


def _order_keys(model: Any, layers: list[Any], trace: CallTrace | None) -> dict[int, tuple]:
    """Sort keys, input to output: the position of a layer's first call in the trace, or
    of its nearest called parent (an LSTM's cell, run by a fused kernel, is never
    called itself); without a trace, the model's list of layers."""
    listed = {id(layer): i for i, layer in enumerate(layers)}
    parent: dict[int, Any] = {}
    for layer in [model, *layers]:
        for child in internals.direct_sublayers(layer):
            parent.setdefault(id(child), layer)
    keys = {}
    for layer in layers:
        ancestor, depth = layer, 0
        while trace is not None and ancestor is not None and trace.call_of(ancestor) is None:
            ancestor, depth = parent.get(id(ancestor)), depth + 1
        if trace is None or ancestor is None:
            keys[id(layer)] = (len(layers), 0, listed[id(layer)])
        else:
            keys[id(layer)] = (trace.call_of(ancestor).position, depth, listed[id(layer)])
    return keys


def _combine(paths: list[str]) -> str:
    """One activation for all paths: a ReLU only if every path reaches one first."""
    if not paths:
        return "linear"
    if len(set(paths)) == 1:
        return paths[0]
    return "relu" if all(p in RELU_FAMILY for p in paths) else "linear"


def _consumer_activation(consumer: Any, follow: Any) -> str:
    """What a path through ``consumer`` applies (``follow`` continues past a pass-through)."""
    if type(consumer).__name__ in _PASS_THROUGH:
        return follow(consumer)
    if not internals.owns_variables(consumer) and _layer_activation(consumer):
        return _layer_activation(consumer)
    return "linear"


def _graph_activation(layer: Any, depth: int = 0) -> str | None:
    """The activation that follows a layer along a functional model's edges (None: no edges)."""
    own = _layer_activation(layer)
    if own is not None:
        return own
    consumers = internals.consumers_of(layer)
    if not consumers or depth > 16:
        return None
    return _combine([_consumer_activation(c, lambda c: _graph_activation(c, depth + 1) or "linear")
                     for c in consumers])


def _traced_activation(trace: CallTrace, call: LayerCall, depth: int = 0) -> str:
    """The activation on every path from the layer's output in the traced graph: a
    ReLU only if every consumer reaches a ReLU first (through pass-through layers)."""
    own = _layer_activation(call.layer)
    if own is not None:
        return own
    if depth > 16:
        return "linear"
    calls = {id(c.layer): c for c in call.consumers}
    paths = trace.raw_activations(call) + [
        _consumer_activation(c.layer, lambda layer: _traced_activation(trace, calls[id(layer)], depth + 1))
        for c in call.consumers]
    return _combine(paths)


def _following_activation(layers: Sequence[Any], index: int) -> str:
    own = _layer_activation(layers[index])
    if own is not None:
        return own
    for nxt in layers[index + 1 :]:
        class_name = type(nxt).__name__
        if class_name in _PASS_THROUGH:
            continue
        follow = _layer_activation(nxt) if not internals.owns_variables(nxt) else None
        return follow or "linear"
    return "linear"


def from_variables(variables: Sequence[Any], names: Sequence[str] | None = None) -> Topology:
    """Topology of raw variables that belong to no known model.

    A name ``"block/w"`` puts the variable in layer ``"block"``; a name without
    ``/`` is its own layer.
    """
    taken: set[str] = set()
    var_infos: list[VariableInfo] = []
    layers: dict[str, LayerInfo] = {}
    for i, var in enumerate(variables):
        raw = names[i] if names is not None else internals.variable_path(var)
        parts = raw.split("/")
        layer_name = "/".join(parts[:-1]) if len(parts) > 1 else raw
        name = _unique(raw, taken)
        if layer_name not in layers:
            layers[layer_name] = LayerInfo(layer_name, len(layers), "", "", [])
        layers[layer_name].variables.append(name)
        var_infos.append(
            VariableInfo(
                name=name,
                layer=layer_name,
                shape=[int(d) for d in var.shape],
                dtype=str(getattr(var.dtype, "name", var.dtype)),
                layer_index=layers[layer_name].index,
            )
        )
    return Topology(layers=list(layers.values()), variables=var_infos)


def relu_layers(model: Any, topology: Topology) -> list[tuple[Any, str]]:
    """The model's ReLU-family layers, each with the topology layer that reports it:
    itself, or the nearest layer before it that owns watched variables."""
    named = layer_names(model, model.trainable_variables)
    names = {layer.name for layer in topology.layers}
    found, owner = [], None
    for layer in internals.ordered_layers(model):
        if named.get(id(layer)) in names:
            owner = named[id(layer)]
        if _layer_activation(layer) in RELU_FAMILY and owner is not None:
            found.append((layer, owner))
    return found


# ------------------------------------------------------------ Watch(names=...)


class NameMap(NamedTuple):
    """``Watch(names=...)`` given as a mapping: (variable, name) pairs, checked."""

    pairs: tuple[tuple[Any, str], ...]


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"names must give each variable a str name; received {name!r} "
                        f"({type(name).__name__}) as {where}. Pass names such as 'dense/kernel'.")
    if not name or "" in name.split("/") or name == "*":
        raise ValueError(f"names must be non-empty, without an empty part around '/' (a name reads "
                         f"'layer/variable'), and not '*' (the layer rows' variable); received {name!r} as "
                         f"{where}. Pass names such as 'dense/kernel'.")
    return name


def _refuse_repeats(names: Sequence[str], what: str) -> None:
    repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"names must be distinct; {repeated} {what}. Give each variable its own name.")


def check_names(names: Any) -> list[str] | NameMap | None:
    """Checks ``Watch(names=...)`` when the Watch is made (what needs the variables waits
    for ``names_for``).

    Raises:
        TypeError: not a list of str or a mapping from variables to str.
        ValueError: an empty or repeated name, or a variable named twice.
    """
    if names is None:
        return None
    if isinstance(names, Mapping):
        pairs, named = [], set()
        for key, name in names.items():
            variable = internals.as_variable(key)
            if variable is None:
                raise TypeError(
                    f"names must map variables to names; received the key {key!r} ({type(key).__name__}). "
                    "Key by the variables passed to observe(): a tf.Variable (or its .ref()) or a Keras "
                    "variable, e.g. names={w.ref(): 'dense/kernel'}.")
            if named & set(internals.variable_identities(variable)):
                raise ValueError(f"names gives variable {internals.variable_path(variable)!r} two names "
                                 "(two keys stand for it); keep one.")
            named.update(internals.variable_identities(variable))
            where = f"the name of variable {internals.variable_path(variable)!r}"
            pairs.append((variable, _check_name(name, where)))
        _refuse_repeats([name for _, name in pairs], "are given to several variables")
        return NameMap(tuple(pairs))
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of str (one per variable) or a mapping from variable to "
                        f"name; received {names!r} ({type(names).__name__}).")
    checked = [_check_name(name, f"names[{i}]") for i, name in enumerate(names)]
    _refuse_repeats(checked, f"appear more than once in {checked!r}")
    return checked


def names_for(names: list[str] | NameMap | None, variables: Sequence[Any]) -> list[str] | None:
    """The names of the variables a Watch observed first, from its checked ``names``.

    Raises:
        ValueError: a list of another length; mapping keys that match none of
            ``variables``; a given name equal to another variable's own name.
    """
    if names is None or not isinstance(names, NameMap):
        if names is not None and len(names) != len(variables):
            raise ValueError(
                f"names has {len(names)} entries but observe() got {len(variables)} variables; "
                "give one name per variable, in the same order.")
        return names
    by_identity = {identity: k for k, (variable, _) in enumerate(names.pairs)
                   for identity in internals.variable_identities(variable)}
    found = [next((by_identity[i] for i in internals.variable_identities(v) if i in by_identity), None)
             for v in variables]
    unmatched = [internals.variable_path(v) for k, (v, _) in enumerate(names.pairs) if k not in found]
    if unmatched:
        raise ValueError(
            f"names has keys that match none of the {len(variables)} variables passed to observe(): "
            f"{unmatched}. Key by the variables you pass (the tf.Variable, its .ref(), or the Keras "
            "variable).")
    given = [names.pairs[k][1] if k is not None else None for k in found]
    own = [internals.variable_path(v) for v, name in zip(variables, given) if name is None]
    clashes = sorted({name for name in given if name is not None} & set(own))
    if clashes:
        raise ValueError(f"names gives {clashes}, the own name of another variable passed to observe(); "
                         "name that variable too, or choose another name.")
    return [name if name is not None else internals.variable_path(v) for v, name in zip(variables, given)]
