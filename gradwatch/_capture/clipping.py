"""Clipping inside the step: the user's ``gradwatch.clip`` transform applied to the
global, unscaled gradients whose norms were just measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from gradwatch import clip as clip_lib
from gradwatch._capture import stats as stats_lib


def clip_measured(clip: clip_lib.Clip, stat_grads: Sequence[Any], variables: Sequence[Any],
                  l2: tf.Tensor, nonfinite: tf.Tensor, loss_scale: tf.Tensor | None,
                  replica_context: Any) -> tuple[list[Any], tf.Tensor, tf.Tensor, tf.Tensor]:
    """Clips the measured gradients.

    Args:
        clip: the transform.
        stat_grads: the gradients as measured (global under several replicas, loss-scaled).
        variables: their variables.
        l2: their unscaled norms, just measured.
        nonfinite: their non-finite entry counts.
        loss_scale: the loss scale the gradients carry, or None.
        replica_context: the replica context under several replicas, else None.

    Returns:
        (gradients for the optimizer, post/pre norm ratio per gradient, 1.0 where
        clipping changed a gradient, the clip bound).
    """
    unscaled = stat_grads if loss_scale is None else [clip_lib.scale_gradient(g, 1.0 / loss_scale)
                                                      for g in stat_grads]
    # the norms were just measured: norm-based transforms need no second pass
    result = clip(unscaled, list(variables), clip_lib.Norms(l2, nonfinite == 0.0))
    post_l2 = result.post_norms
    if post_l2 is None:
        post_l2 = stats_lib.exact_norms(stats_lib.group_gradients(result.grads))
    ratio = tf.where(l2 > 0.0, post_l2 / tf.where(l2 > 0.0, l2, 1.0), 1.0)
    ratio = tf.where(tf.math.is_finite(ratio), ratio, 1.0)
    fired = tf.cast(ratio < 1.0 - 1e-6, tf.float32)
    # back to what the optimizer expects, in one multiply: the loss scale again, and
    # under several replicas each replica's share (the optimizer sums them again)
    factor = loss_scale
    if replica_context is not None:
        share = tf.constant(1.0 / replica_context.num_replicas_in_sync)
        factor = share if factor is None else factor * share
    handed = result.grads
    if factor is not None:
        handed = [clip_lib.scale_gradient(g, factor) for g in handed]
    return handed, tf.minimum(ratio, 1.0), fired, result.threshold
