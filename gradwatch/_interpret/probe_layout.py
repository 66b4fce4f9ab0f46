"""What the probes measure, and how their fetched arrays read as per-layer values.

Pure numpy: the in-graph probes (``gradwatch._capture.probes``) and the host's
interpreter both derive their layouts from the run's ``Topology`` here, so the two
sides agree by construction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch._topology import RELU_FAMILY, Topology

NORMALISERS = frozenset({"BatchNormalization", "LayerNormalization", "GroupNormalization"})

# log10|g| histogram buckets: 4 per decade from 1e-16 to 1e8 (values outside are
# counted in the first / last bucket).
LOG10_LOW, LOG10_HIGH, PER_DECADE = -16.0, 8.0, 4
NUM_LOG_BUCKETS = int((LOG10_HIGH - LOG10_LOW) * PER_DECADE)
NUM_SIGNED_BUCKETS = 30

UPDATE_EVERY = 50  # steps between two update/weight snapshots, after the early ones
#: The update probe's first snapshots (steps from 1): dense early, so a direction test
#: has evidence in short runs; after them one every UPDATE_EVERY steps (51, 101, ...).
#: Two steps apart at least: a custom loop measures a snapshot at the next step.
EARLY_SNAPSHOTS = (1, 3, 5, 7, 9, 12, 15, 18, 22, 26, 30, 35, 40, 45)
# the update probe's result rows per measured variable: the last measurement's sums,
# then the window's count of direction measurements, sum of cosines and of squares
UPDATE_ROWS = ("ratio_du", "ratio_w", "cos_du", "cos_dot", "cos_g", "cos_count", "cos_sum", "cos_sq")


def snapshot_due(step: int) -> bool:
    """Whether the update probe takes a weight snapshot at ``step`` (counted from 1)."""
    return step in EARLY_SNAPSHOTS or (step >= 1 and (step - 1) % UPDATE_EVERY == 0)


def next_snapshot(step: int) -> int:
    """The first step after ``step`` (counted from 1) at which a snapshot is due."""
    later = [s for s in EARLY_SNAPSHOTS if s > step]
    if later:
        return later[0]
    return step + 1 + (-step) % UPDATE_EVERY if step >= 1 else 1

_FLOATING = ("float16", "bfloat16", "float32", "float64")


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


class Track:
    """One layer whose units are tracked: where its unit signal comes from.

    Args:
        layer: the layer's position in the topology.
        slot: the variable whose gradient carries the units (bias, else kernel).
        kernel_mode: True when ``slot`` is a kernel (a unit is a column).
        units: number of units.
        relu: True when a ReLU-family activation follows the layer.
        next_slot: the next layer's kernel (its rows tell a dead unit), or None.
        own_kernel: for a layer not followed by a ReLU, its own kernel: a unit whose
            kernel column has a gradient is not silent, whatever its bias says.
    """

    def __init__(self, layer: int, slot: int, kernel_mode: bool, units: int, relu: bool,
                 next_slot: int | None, own_kernel: int | None = None):
        self.layer, self.slot, self.kernel_mode = layer, slot, kernel_mode
        self.units, self.relu, self.next_slot = units, relu, next_slot
        self.own_kernel = None if relu else own_kernel
        self.offset = 0

    @property
    def evidence(self) -> int | None:
        """The variable whose gradient tells a silent unit on sampled steps: the next
        layer's kernel rows (ReLU layers) or the layer's own kernel columns (others)."""
        return self.next_slot if self.relu else self.own_kernel


def _next_kernel(topology: Topology, later_members: list[list[int]], units: int) -> int | None:
    for later_slots in later_members:
        later_kernels = [s for s in later_slots if len(topology.variables[s].shape) >= 2]
        if later_kernels:
            shape = topology.variables[later_kernels[0]].shape
            # equal: Dense/Conv after Dense/Conv or global pooling; a multiple: a
            # channels-last Flatten in between (row r belongs to unit r % units)
            return later_kernels[0] if shape[-2] % units == 0 else None
    return None


def unit_tracks(topology: Topology) -> list[Track]:
    """Returns the layers whose units are tracked, each with its unit signal's variable."""
    members = topology.layer_members()
    layers = topology.layers
    tracks = []
    for i, layer in enumerate(layers):
        following = layers[i + 1] if i + 1 < len(layers) else None
        if (following is not None and following.class_name in NORMALISERS
                and layer.class_name not in NORMALISERS):
            continue  # the normaliser's beta speaks for these units
        relu = layer.activation in RELU_FAMILY
        variables = topology.variables
        bias = [s for s in members[i] if len(variables[s].shape) == 1
                and _short(variables[s].name) in ("bias", "beta")]
        kernels = [s for s in members[i] if len(variables[s].shape) >= 2]
        if bias:
            slot, kernel_mode, units = bias[0], False, variables[bias[0]].shape[0]
        elif relu and kernels:
            slot, kernel_mode, units = kernels[0], True, variables[kernels[0]].shape[-1]
        else:
            continue
        next_slot = _next_kernel(topology, members[i + 1:], units)
        own = [k for k in kernels if variables[k].shape[-1] == units]
        tracks.append(Track(i, slot, kernel_mode, int(units), relu, next_slot, own[0] if own else None))
    offset = 0
    for track in tracks:
        track.offset = offset
        offset += track.units
    return tracks


#: Early in a run a unit whose gradient was exactly zero on every step since the first
#: counts (dead, or silent) once there are this many steps, before ``dead_steps``.
EARLY_DEAD_STEPS = 8


def dead_after(dead_steps: int, steps_seen: int) -> int:
    """The zero-gradient run after which a unit counts: ``dead_steps``, or, while fewer
    steps have been seen (at least ``EARLY_DEAD_STEPS``), every step seen so far."""
    return min(dead_steps, steps_seen) if steps_seen >= EARLY_DEAD_STEPS else dead_steps


def early_read_due(steps_seen: int, steps_since_read: int, dead_steps: int) -> bool:
    """Whether the end of an epoch reads the window now: once in a run, for the window in
    which the early dead-unit rule became possible (``EARLY_DEAD_STEPS``), within the
    first ``dead_steps`` steps, so a short first epoch reports what it found."""
    return (0 < steps_since_read and EARLY_DEAD_STEPS <= steps_seen <= dead_steps
            and steps_seen - steps_since_read < EARLY_DEAD_STEPS)


def decode_units(tracks: list[Track], num_layers: int, fetched: tuple[np.ndarray, np.ndarray],
                 dead_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads the unit probe's counters as per-layer fractions.

    Args:
        tracks: ``unit_tracks(topology)``.
        num_layers: the topology's number of layers.
        fetched: (consecutive zero-gradient steps per unit, silent flag per unit).
        dead_steps: steps of zero gradient after which a unit counts.

    Returns:
        (dead_frac, no_signal_frac) per layer in topology order; NaN where not tracked.
    """
    dead = np.full(num_layers, np.nan)
    no_signal = np.full(num_layers, np.nan)
    run, silent = fetched
    silent = silent > 0.5
    for track in tracks:
        part = slice(track.offset, track.offset + track.units)
        quiet = run[part] >= dead_steps
        if track.relu:
            dead[track.layer] = _share(quiet & silent[part])
            no_signal[track.layer] = _share(quiet & ~silent[part])
        elif track.own_kernel is not None:
            no_signal[track.layer] = _share(quiet & silent[part])
        else:
            no_signal[track.layer] = _share(quiet)
    return dead, no_signal


def _share(mask: np.ndarray) -> float:
    """The share of True in ``mask`` (``np.mean``'s value; ~1 against ~10 us a call, two a layer)."""
    return np.count_nonzero(mask) / mask.size if mask.size else math.nan


def update_slots(topology: Topology) -> list[int]:
    """Returns the variables the update probe measures (the floating-point ones)."""
    return [i for i, v in enumerate(topology.variables) if v.dtype in _FLOATING]


class UpdateDecoding:
    """Reads the update probe's result rows as update ratios and cosines per column.

    Args:
        topology: the run's topology.
    """

    def __init__(self, topology: Topology):
        members = topology.layer_members()
        # the ratio of a layer is its kernels' (zero-initialised biases would dominate)
        kernels = [[i for i in m if len(topology.variables[i].shape) >= 2] or m for m in members]
        num_vars = len(topology.variables)
        # [layers, variables] 0/1: a layer's sums are one matrix product
        self._members = np.zeros((len(members), num_vars))
        self._kernels = np.zeros((len(members), num_vars))
        for layer, (member, kernel) in enumerate(zip(members, kernels)):
            self._members[layer, member] = 1.0
            self._kernels[layer, kernel] = 1.0
        self._slots = update_slots(topology)
        self._num_vars = num_vars

    def evidence(self, measured: np.ndarray, names: list[str]) -> dict[str, tuple[int, float, float]]:
        """Returns, per measured variable name, the window's direction measurements:
        (count, sum of cosines, sum of squared cosines)."""
        counts, sums, squares = np.nan_to_num(measured.astype(np.float64)[5:8, :len(self._slots)])
        return {names[slot]: (int(counts[k]), float(sums[k]), float(squares[k]))
                for k, slot in enumerate(self._slots) if counts[k] > 0}

    def decode(self, measured: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (update_ratio, update_cos) per column: the variables, then their layers."""
        rows = np.full((len(UPDATE_ROWS), self._num_vars), np.nan)
        rows[:, self._slots] = measured.astype(np.float64)[:, :len(self._slots)]
        ratio_du, ratio_w, cos_du, cos_dot, cos_g = rows[:5]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            var_ratio = np.where(ratio_w > 0, np.sqrt(ratio_du / ratio_w), np.nan)
            var_cos = cos_dot / (np.sqrt(cos_du) * np.sqrt(cos_g))
        var_cos = np.where(np.isfinite(var_cos) & (cos_du > 0) & (cos_g > 0), var_cos, np.nan)
        kernels, members = self._kernels, self._members
        du, w = kernels @ np.nan_to_num(ratio_du), kernels @ np.nan_to_num(ratio_w)
        ratio_measured = kernels @ (~np.isnan(ratio_w)) > 0
        d, dot, g = (members @ np.nan_to_num(x) for x in (cos_du, cos_dot, cos_g))
        cos_measured = members @ (~np.isnan(cos_g)) > 0
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            layer_ratio = np.where(ratio_measured & (w > 0), np.sqrt(du / w), np.nan)
            layer_cos = np.where(cos_measured & (d > 0) & (g > 0), dot / (np.sqrt(d) * np.sqrt(g)), np.nan)
        layer_cos = np.where(np.isfinite(layer_cos), layer_cos, np.nan)
        return np.concatenate([var_ratio, layer_ratio]), np.concatenate([var_cos, layer_cos])


def decode_histograms(topology: Topology, fetched: tuple[np.ndarray, ...], signed: bool
                      ) -> list[dict[str, Any]]:
    """Reads the histogram probe's counts as one histogram per layer (and kind).

    Args:
        topology: the run's topology.
        fetched: (step, log10|g| counts, signed counts, signed bounds); step -1: none.
        signed: whether signed histograms were counted.

    Returns:
        The last histogram step's histograms, per layer; empty when none was taken.
    """
    step = int(fetched[0])
    if step < 0:
        return []
    counts = fetched[1].astype(np.float64)
    edges = LOG10_LOW + np.arange(NUM_LOG_BUCKETS + 1) / PER_DECADE
    out = []
    for layer_index, (layer, members) in enumerate(zip(topology.layers, topology.layer_members())):
        total = counts[members].sum(axis=0)
        buckets = total[:NUM_LOG_BUCKETS]
        nonzero = np.nonzero(buckets)[0]
        lo, hi = (nonzero[0], nonzero[-1] + 1) if len(nonzero) else (0, 1)
        tallies = {"zeros": int(total[NUM_LOG_BUCKETS]), "nonfinite": int(total[NUM_LOG_BUCKETS + 1])}
        out.append({"step": step, "layer": layer.name, "kind": "log10_abs",
                    "edges": edges[lo:hi + 1], "counts": buckets[lo:hi], **tallies})
        if signed:
            bound = float(fetched[3][layer_index])
            out.append({"step": step, "layer": layer.name, "kind": "signed",
                        "edges": np.linspace(-bound, bound, NUM_SIGNED_BUCKETS + 1),
                        "counts": fetched[2].astype(np.float64)[members].sum(axis=0), **tallies})
    return out
