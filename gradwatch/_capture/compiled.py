"""XLA clusters for the recorder's small-tensor work, cached per static key."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from typing import Any

from gradwatch._capture import keras_internals as internals

# A branch taken on some steps only (the full pass, the unit and update measures)
# runs as one XLA call from this many variables on: one node in the branch not
# taken instead of hundreds. Each key costs a compile and memory TensorFlow keeps
# for the life of the process, so smaller nets run those branches as plain graph.
XLA_BRANCH_MIN_VARIABLES = 32


class Compiler:
    """Turns functions into cached XLA calls (plain graph where XLA cannot hold them).

    Args:
        num_vars: the number of watched variables (see ``XLA_BRANCH_MIN_VARIABLES``).
        branch_min_variables: overrides ``XLA_BRANCH_MIN_VARIABLES`` (tests use it to
            take both paths on one net).
    """

    def __init__(self, num_vars: int, branch_min_variables: int | None = None):
        self._num_vars = num_vars
        self._branch_min = (XLA_BRANCH_MIN_VARIABLES if branch_min_variables is None
                            else int(branch_min_variables))
        self._jit = os.environ.get("GRADWATCH_JIT", "1") != "0"
        self._cache: dict[Hashable, Any] = {}

    def compiled(self, key: Hashable, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Returns ``fn`` as one XLA cluster, or ``fn`` itself under several replicas
        (a mirrored write is a merge_call, which a nested function cannot hold) or
        with ``GRADWATCH_JIT=0``."""
        if internals.replicas_to_reduce() is not None or not self._jit:
            return fn
        cached = self._cache.get(key)
        if cached is None:
            cached = internals.run_function(fn, jit_compile=True, autograph=False)
            self._cache[key] = cached
        return cached

    def branch(self, key: Hashable, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Returns ``compiled(key, fn)`` for a branch taken on some steps only, on a net
        with enough variables for it to pay; ``fn`` itself below."""
        if self._num_vars < self._branch_min:
            return fn
        return self.compiled(key, fn)
