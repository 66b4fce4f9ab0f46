"""The graph nodes gradwatch adds to a fit's train step, per part: what its first call
pays for. Here each node costs ~0.3-0.5 ms of trace and about as much of graph
optimization at the first call, so a part's nodes are its share of the one-off seconds
(``first_call_parts.py`` times them; this counts them, which does not depend on the
machine's speed).

A fit of 1,050 planned steps from the gate's pipeline (``overhead.dataset``) stops after
3 steps; every node created while a labelled part runs is counted to it (a part inside
another counts to the inner one), the rest to "step" (Keras's own, and the parts not
labelled). The plain fit of the same model gives Keras's own count. Run it on another revision by putting that
revision first on ``PYTHONPATH``.

Usage:
    python benchmarks/traced_nodes.py transformer
    PYTHONPATH=/path/to/older/checkout python benchmarks/traced_nodes.py mlp
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from overhead import BATCH_SIZE, MODELS, dataset  # noqa: E402
from tensorflow.python.framework import ops  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._capture import measure, probes, recorder, stats  # noqa: E402

logging.getLogger("gradwatch").setLevel(logging.ERROR)

#: (label, owner, method): the parts counted, inner ones after the ones that call them.
PARTS = [
    ("observe (sums of squares, buffer row)", recorder.Recorder, "observe"),
    ("read function", recorder.Recorder, "_read_all"),
    ("careful pass: branches", measure._DensePasses, "rare"),
    ("careful pass: zero check", measure._DensePasses, "settled"),  # before 2026-12-07's eleventh session
    ("careful pass: largest magnitudes (zero check)", stats, "group_max_abs"),  # since
    ("careful pass: finite pass (sampled step)", measure._DensePasses, "finite"),
    ("careful pass: full pass", measure._DensePasses, "full"),
    ("sparse gradients", measure, "_measure_sparse"),
    ("update measure", probes.UpdateProbe, "measure_after_update"),
    ("update measure: change sums", probes.UpdateProbe, "_change_sums"),
    ("histograms", probes.HistogramProbe, "record"),
    ("dead units", probes.UnitProbe, "record"),
]


class Counter:
    """Counts the nodes created in any graph, to the innermost labelled part running."""

    def __init__(self):
        self.nodes: collections.Counter = collections.Counter()
        self.branches: collections.Counter = collections.Counter()
        self.stack = ["step"]
        create = ops.Graph._create_op_internal
        counter = self

        def counted(graph, op_type, *args, **kwargs):
            counter.nodes[counter.stack[-1]] += 1
            if op_type in ("If", "StatelessIf", "Case", "StatelessCase"):
                counter.branches[counter.stack[-1]] += 1
            return create(graph, op_type, *args, **kwargs)

        ops.Graph._create_op_internal = counted

    def label(self, name: str, owner, method: str) -> None:
        original = getattr(owner, method, None)
        if original is None:  # a part another revision does not have
            return

        @functools.wraps(original)
        def labelled(*args, **kwargs):
            self.stack.append(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()

        setattr(owner, method, labelled)  # a module's function: its callers look it up there


class StopAfter(keras.callbacks.Callback):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 >= self.steps:
            self.model.stop_training = True


def fit(name: str, counter: Counter, monitored: bool) -> collections.Counter:
    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[name]()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    callbacks = [StopAfter(3)] + ([gw.GradientMonitor(log_dir=tempfile.mkdtemp())] if monitored else [])
    data = dataset(name, BATCH_SIZE)
    counter.nodes.clear()
    counter.branches.clear()
    model.fit(data, steps_per_epoch=1050, epochs=1, verbose=0, callbacks=callbacks)
    return collections.Counter(counter.nodes), collections.Counter(counter.branches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    args = parser.parse_args()
    counter = Counter()
    plain, _ = fit(args.model, counter, monitored=False)
    for name, owner, method in PARTS:
        counter.label(name, owner, method)
    nodes, branches = fit(args.model, counter, monitored=True)
    keras_nodes = plain["step"]
    print(f"{args.model}: Keras's own step and the fit's other functions {keras_nodes} nodes")
    gradwatch_total = sum(nodes.values()) - keras_nodes
    print(f"  {'gradwatch, all parts':45s} {gradwatch_total:6d} nodes")
    print(f"  {'  outside the parts below':45s} {nodes['step'] - keras_nodes:6d}")
    for name, _, _ in PARTS:
        print(f"  {'  ' + name:45s} {nodes[name]:6d} nodes  {branches[name]:3d} conditionals")


if __name__ == "__main__":
    main()
