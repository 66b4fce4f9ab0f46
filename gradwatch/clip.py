"""Gradient clipping transforms: small, composable, XLA-safe.

Each transform maps a list of (non-None) gradients to clipped gradients and
reports what it did. They are applied by ``GradientMonitor(clip=...)`` inside
the compiled train step and by ``Watch(clip=...)`` in ``observe``; gradwatch
records the statistics *before* clipping and the post-clip norms, scale and how
often clipping fired.

Rules every transform follows:

* Direction is preserved (except ``Value``, which clips entries one by one).
* A gradient with a NaN/Inf entry is returned unchanged: clipping never turns
  a non-finite gradient into finite garbage (the non-finite alert, or
  ``on_nonfinite="skip_step"``, deals with it).
* Clipping twice changes nothing.

Example:
    >>> import gradwatch as gw
    >>> monitor = gw.GradientMonitor(clip=gw.clip.GlobalNorm(1.0))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from gradwatch._capture import stats as stats_lib

__all__ = [
    "Clip",
    "ClipResult",
    "Norms",
    "GlobalNorm",
    "PerVariableNorm",
    "Value",
    "Adaptive",
    "Percentile",
    "Chain",
    "as_clip",
]


class ClipResult(NamedTuple):
    """What a transform returns."""

    grads: list[tf.Tensor | tf.IndexedSlices]
    threshold: tf.Tensor  # float32 scalar: the bound used this step (NaN if per-unit)
    # float32 [n]: the clipped gradients' norms when the transform knows them
    # without another pass over the gradients (None: measure them).
    post_norms: tf.Tensor | None = None


class Norms(NamedTuple):
    """Pre-clip facts the caller already measured (saves a pass over the gradients)."""

    l2: tf.Tensor  # float32 [n], norms of the finite entries
    finite: tf.Tensor  # bool [n], no NaN/Inf entry


def _check_positive(name: str, value: Any, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a positive number; received {value!r}.")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{owner}: {name} must be a finite number > 0; received {value!r}.")
    return float(value)


def _values(grad):
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def _with_values(grad, values):
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    return values


def _dense_norm(grad) -> tf.Tensor:
    """L2 norm of the gradient as the optimizer will apply it (sparse rows summed)."""
    values = stats_lib.summed_rows(grad) if isinstance(grad, tf.IndexedSlices) else grad
    return stats_lib.safe_norm(tf.cast(values, tf.float32))


def scale_gradient(grad, factor: tf.Tensor):
    """Returns ``grad`` (dense or ``IndexedSlices``) multiplied by ``factor``."""
    values = _values(grad)
    return _with_values(grad, values * tf.cast(factor, values.dtype))



class Clip:
    """Base class: ``clip(grads, variables) -> ClipResult``.

    Subclasses that keep state create it lazily in ``build`` (called once,
    outside any trace, with the strategy the step runs under).
    """

    def build(self, strategy: tf.distribute.Strategy | None = None) -> None:
        """Creates the transform's state, if any (once, outside any trace).

        Args:
            strategy: the ``tf.distribute`` strategy the step runs under, if any.
        """
        del strategy

    def __call__(
        self, grads: Sequence[Any], variables: Sequence[Any], norms: Norms | None = None
    ) -> ClipResult:
        """Clips gradients, in-graph.

        Args:
            grads: the gradients (dense or ``IndexedSlices``; none is ``None``).
            variables: their variables (``Adaptive`` reads the weights).
            norms: their pre-clip norms and finiteness, when the caller measured them.

        Returns:
            ``ClipResult(grads, threshold, post_norms)``: the clipped gradients, the
            bound applied (NaN where it is per unit), and the post-clip norms when known.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict[str, Any]:
        return {}


class GlobalNorm(Clip):
    """Scales all gradients together so their global L2 norm is at most ``max_norm``.

    Same update as Keras ``global_clipnorm`` / ``tf.clip_by_global_norm``.

    Args:
        max_norm: the bound, a positive number.
    """

    def __init__(self, max_norm: float):
        self.max_norm = _check_positive("max_norm", max_norm, "GlobalNorm")

    def _config(self):
        return {"max_norm": self.max_norm}

    def __call__(self, grads, variables, norms=None):
        return _clip_global(grads, tf.constant(self.max_norm, tf.float32), norms)


def _known_norms(grads, norms: Norms | None) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-gradient (norm, finite): the caller's, or measured here."""
    if norms is not None:
        return norms.l2, norms.finite
    measured = tf.stack([_dense_norm(g) for g in grads])
    return measured, tf.math.is_finite(measured)


def _clip_global(grads, max_norm: tf.Tensor, norms: Norms | None = None) -> ClipResult:
    l2, finite = _known_norms(grads, norms)
    total = stats_lib.global_norm(l2)
    clip = tf.reduce_all(finite) & tf.math.is_finite(total) & (total > max_norm)
    factor = tf.where(clip, max_norm / tf.where(total > 0.0, total, 1.0), 1.0)
    return ClipResult([scale_gradient(g, factor) for g in grads], max_norm, l2 * factor)


class PerVariableNorm(Clip):
    """Scales each gradient so its own L2 norm is at most ``max_norm``.

    Same update as Keras ``clipnorm`` / ``tf.clip_by_norm`` (for dense gradients).

    Args:
        max_norm: the bound, a positive number.
    """

    def __init__(self, max_norm: float):
        self.max_norm = _check_positive("max_norm", max_norm, "PerVariableNorm")

    def _config(self):
        return {"max_norm": self.max_norm}

    def __call__(self, grads, variables, norms=None):
        max_norm = tf.constant(self.max_norm, tf.float32)
        l2, finite = _known_norms(grads, norms)
        clip = finite & tf.math.is_finite(l2) & (l2 > max_norm)
        factors = tf.where(clip, max_norm / tf.where(l2 > 0.0, l2, 1.0), 1.0)
        out = [scale_gradient(grad, factors[i]) for i, grad in enumerate(grads)]
        return ClipResult(out, max_norm, l2 * factors)


class Value(Clip):
    """Clips every entry to ``[-limit, limit]`` (Keras ``clipvalue``).

    NaN stays NaN and +/-Inf stays non-finite: a gradient with a non-finite
    entry is returned unchanged.

    Args:
        limit: the bound on each entry's magnitude, a positive number.
    """

    def __init__(self, limit: float):
        self.limit = _check_positive("limit", limit, "Value")

    def _config(self):
        return {"limit": self.limit}

    def __call__(self, grads, variables, norms=None):
        out = []
        for grad in grads:
            values = _values(grad)
            limit = tf.cast(self.limit, values.dtype)
            finite = tf.reduce_all(tf.math.is_finite(values))
            clipped = tf.where(finite, tf.clip_by_value(values, -limit, limit), values)
            out.append(_with_values(grad, clipped))
        return ClipResult(out, tf.constant(self.limit, tf.float32))


def _unit_norms(values: tf.Tensor) -> tf.Tensor:
    """Norm of each output unit: over every axis but the last (elementwise for rank <= 1)."""
    if values.shape.rank is None or values.shape.rank <= 1:
        return tf.abs(values)
    axes = list(range(values.shape.rank - 1))
    return tf.sqrt(tf.reduce_sum(tf.square(values), axis=axes, keepdims=True))


class Adaptive(Clip):
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021).

    Per output unit, the gradient's norm is clipped to
    ``clipping * max(||w_unit||, eps)``, where the unit norm runs over every
    axis of the variable except the last (a Dense or Conv kernel's output
    units; biases and scalars elementwise).

    Args:
        clipping: the largest allowed ratio ||g_unit|| / ||w_unit||.
        eps: floor of the weight norm, so zero-initialised weights can move.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3):
        self.clipping = _check_positive("clipping", clipping, "Adaptive")
        self.eps = _check_positive("eps", eps, "Adaptive")

    def _config(self):
        return {"clipping": self.clipping, "eps": self.eps}

    def __call__(self, grads, variables, norms=None):
        out = []
        for grad, variable in zip(grads, variables):
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            values = tf.cast(grad, tf.float32)
            weights = tf.cast(tf.convert_to_tensor(variable), tf.float32)
            max_norm = self.clipping * tf.maximum(_unit_norms(weights), self.eps)
            grad_norm = _unit_norms(values)
            factor = tf.where(
                grad_norm > max_norm, max_norm / tf.maximum(grad_norm, 1e-30), tf.ones_like(grad_norm)
            )
            finite = tf.reduce_all(tf.math.is_finite(values))
            clipped = tf.where(finite, values * factor, values)
            out.append(tf.cast(clipped, grad.dtype))
        return ClipResult(out, tf.constant(float("nan"), tf.float32))


#: The most past norms ``Percentile`` keeps (4 MB, one sort of them per step).
MAX_HISTORY = 10**6


class Percentile(Clip):
    """AutoClip (Seetharaman et al. 2020): clip the global norm to the ``p``-th
    percentile of the global norms seen so far.

    The history is a ring buffer of the last ``history`` global norms, kept
    in-graph (bounded memory); the current step's norm is added before the
    percentile is taken, as in the paper. Non-finite norms are not recorded.

    Args:
        p: percentile in (0, 100].
        history: number of past norms kept, at most ``MAX_HISTORY`` (10**6).
    """

    def __init__(self, p: float = 10.0, history: int = 1000):
        self.p = _check_positive("p", p, "Percentile")
        if self.p > 100:
            raise ValueError(f"Percentile: p must be in (0, 100]; received {p!r}.")
        if isinstance(history, bool) or not isinstance(history, int) or not 1 <= history <= MAX_HISTORY:
            raise ValueError(
                f"Percentile: history must be an int from 1 to {MAX_HISTORY:,} (the norms are kept "
                f"and sorted in-graph every step); received {history!r}.")
        self.history = history
        self._norms: tf.Variable | None = None
        self._count: tf.Variable | None = None

    def _config(self):
        return {"p": self.p, "history": self.history}

    def build(self, strategy=None):
        if self._norms is not None:
            return
        from gradwatch._capture.keras_internals import replica_variable

        self._norms = replica_variable(tf.zeros([self.history]), "gradwatch_autoclip", strategy)
        self._count = replica_variable(tf.constant(0, tf.int64), "gradwatch_autoclip_n", strategy)

    def threshold_after(self, norm: tf.Tensor) -> tf.Tensor:
        """Records ``norm`` (if finite) and returns the p-th percentile of the history."""
        self.build()
        finite = tf.math.is_finite(norm)
        count = self._count.read_value()
        slot = tf.math.floormod(count, self.history)
        stored = tf.where(finite, norm, self._norms[slot])
        norms = tf.tensor_scatter_nd_update(self._norms.read_value(), [[slot]], [stored])
        count = count + tf.cast(finite, tf.int64)
        self._norms.assign(norms)
        self._count.assign(count)
        valid = tf.minimum(count, self.history)
        # Unused slots are +inf so they sort last; numpy's linear interpolation.
        mask = tf.range(self.history, dtype=tf.int64) < valid
        ordered = tf.sort(tf.where(mask, norms, float("inf")))
        position = (self.p / 100.0) * tf.cast(tf.maximum(valid - 1, 0), tf.float32)
        low = tf.cast(tf.floor(position), tf.int32)
        high = tf.minimum(low + 1, tf.cast(tf.maximum(valid - 1, 0), tf.int32))
        frac = position - tf.floor(position)
        value = ordered[low] * (1.0 - frac) + ordered[high] * frac
        return tf.where(valid > 0, value, float("inf"))

    def __call__(self, grads, variables, norms=None):
        l2, finite = _known_norms(grads, norms)
        total = tf.where(tf.reduce_all(finite), stats_lib.global_norm(l2), float("nan"))
        return _clip_global(grads, self.threshold_after(total), Norms(l2, finite))


class Chain(Clip):
    """Applies several transforms in order (e.g. ``Chain(Value(1.0), GlobalNorm(5.0))``).

    Args:
        *clips: the transforms (or numbers, each a ``GlobalNorm`` bound), first applied first.
    """

    def __init__(self, *clips: Clip):
        if not clips:
            raise ValueError("Chain needs at least one clip transform; received none.")
        self.clips = tuple(as_clip(c) for c in clips)

    def _config(self):
        return {"clips": self.clips}

    def __repr__(self):
        return f"Chain({', '.join(repr(c) for c in self.clips)})"

    def build(self, strategy=None):
        for clip in self.clips:
            clip.build(strategy)

    def __call__(self, grads, variables, norms=None):
        threshold = tf.constant(float("nan"), tf.float32)
        post = None
        for position, clip in enumerate(self.clips):
            # only the first transform sees the caller's norms: later ones see clipped grads
            grads, threshold, post = clip(grads, variables, norms if position == 0 else None)
        return ClipResult(list(grads), threshold, post)


def as_clip(value: Any) -> Clip | None:
    """Turns a ``clip=`` argument into a transform.

    Args:
        value: None, a positive number (the global-norm bound) or a ``Clip``.

    Returns:
        None, ``GlobalNorm(value)`` or the ``Clip`` itself.

    Raises:
        TypeError: any other value.
    """
    if value is None or isinstance(value, Clip):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"clip must be a finite number > 0 (the global-norm bound), a gradwatch.clip "
                             f"transform or None; received {value!r}.")
        return GlobalNorm(value)
    raise TypeError(
        "clip must be None, a positive number (the global-norm bound) or a gradwatch.clip "
        f"transform (GlobalNorm, PerVariableNorm, Value, Adaptive, Percentile, Chain); "
        f"received {value!r} ({type(value).__name__})."
    )
