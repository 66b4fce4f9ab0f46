"""The run's topology: watched variables, their layers and what follows them.

Pure data (no TensorFlow): ``gradwatch._capture.model_topology`` builds it from a
live model or raw variables.

Detectors, the report and the TensorBoard plugin see the model only through
this metadata (written to ``run.json``), never through the live model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Activations whose dead units are dead ReLUs (not leaky ReLU, ELU, GELU).
RELU_FAMILY = frozenset({"relu", "relu6"})



@dataclasses.dataclass
class VariableInfo:
    """One watched variable."""

    name: str  # e.g. "dense_1/kernel" (unique within the run)
    layer: str  # owning layer, e.g. "dense_1"
    shape: list[int]
    dtype: str
    layer_index: int  # position of the layer, input to output
    # the optimizer that updates it, by its attribute on the model ("optimizer",
    # "d_optimizer", ...); "" where none applied it (or runs before groups existed)
    group: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LayerInfo:
    """One layer that owns watched variables."""

    name: str
    index: int
    class_name: str
    activation: str  # the activation applied to this layer's output ("" if unknown)
    variables: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Topology:
    """Layers in input-to-output order and the watched variables."""

    layers: list[LayerInfo]
    variables: list[VariableInfo]
    model_name: str = ""
    model_class: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_class": self.model_class,
            "layers": [layer.to_json() for layer in self.layers],
            "variables": [v.to_json() for v in self.variables],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        return cls(
            layers=[LayerInfo(**layer) for layer in data.get("layers", [])],
            variables=[VariableInfo(**v) for v in data.get("variables", [])],
            model_name=data.get("model_name", ""),
            model_class=data.get("model_class", ""),
        )

    @property
    def variable_names(self) -> list[str]:
        return [v.name for v in self.variables]

    def layer_positions(self) -> dict[str, int]:
        """Returns each layer's name mapped to its position, input to output."""
        return {layer.name: i for i, layer in enumerate(self.layers)}

    def layer_members(self) -> list[list[int]]:
        """Returns, for each layer in order, the indices of its watched variables."""
        positions = self.layer_positions()
        members: list[list[int]] = [[] for _ in self.layers]
        for slot, variable in enumerate(self.variables):
            members[positions[variable.layer]].append(slot)
        return members

    def variable_sizes(self) -> list[int]:
        """Returns the number of entries of each watched variable (1 for a scalar)."""
        return [math.prod(v.shape) for v in self.variables]
