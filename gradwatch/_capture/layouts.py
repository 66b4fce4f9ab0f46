"""The packed layouts the recorder keeps in ``tf.Variable``s, each defined once by name.

A ``Layout`` names the entries of a packed vector (or the rows of a packed matrix)
and packs and unpacks it, so no code addresses an entry by number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradwatch._capture.array_ops import TF, ArrayOps
from gradwatch._io.schema import GLOBAL_ACCUMULATORS, VAR_ACCUMULATORS


class Layout:
    """Named entries of a packed tensor, in a fixed order.

    Args:
        names: the entries, in their packed order.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Returns the position of entry ``name``."""
        return self._index[name]

    def pack(self, values: Mapping[str, Any], axis: int = 0, xp: ArrayOps = TF) -> tf.Tensor:
        """Returns the entries stacked along ``axis`` in layout order (every name required)."""
        missing = set(self.names) - set(values)
        if missing:
            raise KeyError(f"pack() misses entries {sorted(missing)}")
        return xp.stack([values[name] for name in self.names], axis=axis)

    def unpack(self, packed: tf.Tensor, axis: int = 0, xp: ArrayOps = TF) -> dict[str, tf.Tensor]:
        """Returns the entries of a packed tensor by name (one unstack)."""
        return dict(zip(self.names, xp.unstack(packed, num=len(self.names), axis=axis)))

    def unpack_numpy(self, packed: np.ndarray) -> dict[str, Any]:
        """Returns the entries of a fetched packed array by name (rows for a matrix)."""
        return {name: packed[i] for i, name in enumerate(self.names)}


#: The recorder's int64 step state: the last step number (a front places a fit's
#: first step with ``Recorder.start_at``), the rows waiting in the step buffer, the
#: steps of the current window, and whether one of them was non-finite. Where a front
#: ends its steps itself (``Recorder.end_step``: a fit step may apply several
#: optimizers, or one several times), ``in_step`` is 1
#: once the step has a row (the next observation continues it) and ``step_row`` is
#: the buffer row of its first observation (-1: none, or already folded).
STEP_STATE = Layout(("step", "buffered", "window_steps", "nonfinite", "in_step", "step_row"))

#: Per variable, what a step measures (a buffer row holds these as a [rows, V] block):
#: the raw statistics (sum of squares, then the full pass's values, zeros on a step
#: that does not take it), the clip rows, and whether the gradient was present.
RAW_STATS = Layout(("sum_sq", "l2", "max_abs", "mean_abs", "zero_frac", "nonfinite"))
STEP_VALUES = Layout(RAW_STATS.names + ("clip_scale", "clip_fired", "present"))

#: A step's scalars, after its per-variable block. The loss is two values: the
#: step's mean loss and LOSS_GIVEN, a loss tracker's (total, count), or (NaN,
#: LOSS_UNKNOWN); the step's loss is worked out when the step is folded.
#: ``new_step`` is 1 for a row that starts a step, 0 for a further observation in
#: the same step (another optimizer, or the same one applied again).
STEP_SCALARS = Layout(("loss_a", "loss_b", "learning_rate", "loss_scale", "clip_threshold", "skipped",
                       "new_step"))
LOSS_GIVEN, LOSS_UNKNOWN = -1.0, -2.0

#: Window accumulators: per column (variables, then layers), and globals.
WINDOW_COLUMNS = Layout(VAR_ACCUMULATORS)
WINDOW_GLOBALS = Layout(GLOBAL_ACCUMULATORS)


class StepRow:
    """Packs and unpacks one step's buffer row: a [``STEP_VALUES``, V] block, flattened,
    then the ``STEP_SCALARS``.

    Args:
        num_vars: the number of watched variables.
    """

    def __init__(self, num_vars: int):
        self.num_vars = num_vars
        self.width = len(STEP_VALUES) * num_vars + len(STEP_SCALARS)

    def gather_index(self, index: np.ndarray, present_slots: Sequence[int], source_size: int
                     ) -> np.ndarray:
        """Returns the static gather index that builds a row from one source vector.

        The source is ``[measured values..., scalars..., 0.0, 1.0]``: ``index[r, k]``
        locates value row r of the k-th present gradient among the measured values
        (its ``RAW_STATS`` rows, then the clip rows if any). Absent variables read
        zeros; without clip rows the clip scale reads 1 and fired 0.
        """
        num_scalars = len(STEP_SCALARS)
        zero = source_size + num_scalars
        one = zero + 1
        layout = np.full((len(STEP_VALUES), self.num_vars), zero, np.int64)
        for k, slot in enumerate(present_slots):
            layout[: index.shape[0], slot] = index[:, k]
            layout[STEP_VALUES.index("present"), slot] = one
        if index.shape[0] == len(RAW_STATS):
            layout[STEP_VALUES.index("clip_scale")] = one
        return np.concatenate([layout.reshape(-1), np.arange(source_size, source_size + num_scalars)])

    def build(self, measured: tf.Tensor, index: np.ndarray, present_slots: Sequence[int],
              scalars: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Returns the row: one concat and one gather with static indices."""
        source = tf.concat([measured, STEP_SCALARS.pack(scalars), tf.constant([0.0, 1.0])], axis=0)
        gather = self.gather_index(index, present_slots, int(measured.shape[0]))
        return tf.gather(source, tf.constant(gather, tf.int32))

    def scalar_column(self, name: str) -> int:
        """Returns the position of scalar ``name`` (``STEP_SCALARS``) in a row."""
        return len(STEP_VALUES) * self.num_vars + STEP_SCALARS.index(name)

    def split_rows(self, rows: tf.Tensor, xp: ArrayOps = TF
                   ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        """Returns (per-variable value blocks [V, R] by name, scalars [R] by name) of
        R rows ([R, width])."""
        block = len(STEP_VALUES) * self.num_vars
        stacked = xp.reshape(rows[:, :block], [-1, len(STEP_VALUES), self.num_vars])
        values = xp.rows_to_columns(stacked)
        return STEP_VALUES.unpack(values, xp=xp), STEP_SCALARS.unpack(rows[:, block:], axis=1, xp=xp)
