"""What a whole ``fit`` costs with gradwatch, against plain ``model.fit``: the gate of ``make bench``.

The gate (issue 29): every configuration trains the same model in one long ``fit``
(``--steps`` timed steps after ``--warmup`` untimed ones, 1,000 and 50 by default);
a step's time runs from one batch end to the next, so it holds everything a
callback does around the step (gradwatch's host read, its weight snapshots). Per
fit, steps over 20x the fit's median step are left out of its mean and counted as
one-off seconds, with the warm-up's excess and the time ``fit`` spends outside its
steps (traces, XLA compiles, the first and last reads, closing the files):

    one_off = fit wall time - steps x (mean of the kept steps)

Each (model, jit) cell runs in a fresh process (a process that traced many models
before, as this script's earlier cells did, times later ones differently: TensorFlow
keeps every function and XLA program). Within it, configurations run interleaved for
``--reps`` repetitions (8), the model dropped after each fit, in the orders of a
balanced Latin square (``balanced_orders``): every configuration runs at every place
in a repetition, and after every other configuration, equally often. (A rotation
put ``plain`` right after a gradwatch fit in most repetitions, and the fit after a
gradwatch fit ran slower here: the floor came out at 0.92-0.94.) Per
repetition, a configuration's mean step over plain's mean step of the same
repetition is its ratio; the table shows the median over repetitions. A second plain
model (``plain:control``) gives the floor, plain against plain; a table is valid when
the floor is 1.00 +- 0.02. Beside the mean: the ratio of median steps ("typical":
the lean steps that make most of a long fit) and the extra one-off seconds against
plain's: the median of the per-repetition differences, and the difference of each
configuration's least one-off ("least": a slow neighbour minute lands on one fit's
one-off; the ~2.4 s that tf.data's autotuning added after some fits is gone, see
``dataset``). Results go
to ``benchmarks/results/bench-<date>-<time>.json``.

Usage:
    python benchmarks/overhead.py                 # the whole table, jit off and on (make bench)
    python benchmarks/overhead.py --quick         # MLP, jit off, 3 repetitions of 300 steps
    python benchmarks/overhead.py --models mlp,transformer --jit on --reps 4
    python benchmarks/overhead.py --cells mlp:off,mlp:on,lstm:off   # these cells, in this order
    python benchmarks/overhead.py --print FILE    # the table of an earlier results file
    python benchmarks/overhead.py --cells mlp:on --configs gradwatch,norms_floor   # beside exact norms alone
    python benchmarks/overhead.py --models lstm --jit off --baseline 21a37f1   # before against after
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from long_run import rss_mib  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch._capture import stats  # noqa: E402
from gradwatch._capture.keras_internals import in_xla_context  # noqa: E402
from gradwatch._internal_options import InternalOptions  # noqa: E402

# step_ab.py's short runs stand in for a long training run: a fit of fewer than
# lean_min_steps planned steps would not trace the lean step, nor one shorter than the
# lean step's break-even (fit_tap.LeanDecision).
LONG_RUN = InternalOptions(lean_min_steps=0, lean_break_even=False)
CONTROL = "plain:control"  # a second plain model: the floor
WARMUP = 50  # untimed steps at the start of a fit (traces, compiles: one-off seconds)
OUTLIER = 20.0  # a step over this many times the fit's median is a one-off
BATCH_SIZE = 128

logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the nets raise alerts: keep the table readable


def mlp(second_bias="zeros"):
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu", bias_initializer=second_bias),
            keras.layers.Dense(10),
        ]
    ), (784,), 10


def cnn():
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    ), (32, 32, 3), 10


def deep24():
    layers = [keras.Input((256,))]
    layers += [keras.layers.Dense(256, activation="relu") for _ in range(24)]
    layers += [keras.layers.Dense(10)]
    return keras.Sequential(layers), (256,), 10


def lstm():
    return keras.Sequential(
        [keras.Input((20, 32)), keras.layers.LSTM(64), keras.layers.Dense(10)]
    ), (20, 32), 10


def res100():
    inputs = keras.Input((64,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    for _ in range(100):
        h = keras.layers.Add()([h, keras.layers.Dense(64, activation="relu")(h)])
        h = keras.layers.LayerNormalization()(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs), (64,), 10


VOCAB, SEQUENCE, WIDTH = 2000, 32, 64


def transformer():
    """A transformer encoder block, the kind of model most users train now: token and
    position embeddings, multi-head self-attention, a feed-forward block, LayerNorms."""
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, WIDTH)(tokens)
    positions = keras.layers.Embedding(SEQUENCE, WIDTH)(keras.ops.arange(SEQUENCE))
    h = h + positions
    attended = keras.layers.MultiHeadAttention(num_heads=4, key_dim=WIDTH // 4)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    fed = keras.layers.Dense(2 * WIDTH, activation="relu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(WIDTH)(fed))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, outputs), (SEQUENCE,), 10


def mlp_dead():
    """The MLP with its second hidden layer dead from the start (every unit's bias
    -1e4): that layer and the one below it get all-zero gradients on every step, the
    case gradwatch is there to diagnose (not in the default table; ``--models``)."""
    return mlp(second_bias=keras.initializers.Constant(-1e4))


# the issue's six models make the default table
TABLE_MODELS = ("mlp", "lstm", "transformer", "deep24", "cnn", "res100")  # the cheapest first
MODELS = {"mlp": mlp, "cnn": cnn, "deep24": deep24, "lstm": lstm, "res100": res100,
          "transformer": transformer, "mlp_dead": mlp_dead}


def make_data(name, n, seed=0):
    """Returns (x, y) of ``n`` examples for model ``name``: tokens for the transformer,
    normal floats for the others, integer labels."""
    _, shape, classes = MODELS[name]()
    rng = np.random.default_rng(seed)
    if name == "transformer":
        x = rng.integers(0, VOCAB, size=(n, *shape)).astype("int32")
    else:
        x = rng.normal(size=(n, *shape)).astype("float32")
    return x, rng.integers(0, classes, size=n)


class StepTimer(keras.callbacks.Callback):
    """The last callback: each step's time runs from the last batch end to this one, so
    it holds what every other callback does around the step."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._last = 0.0

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


class NormsFloor(keras.callbacks.Callback):
    """Exact per-step norms and nothing else: each gradient's sum of squares (``L2Loss``;
    under XLA gradwatch's ``stats.row_sums``, the cheapest way there), written as one row
    of a 64-row buffer variable every step (the rows are never read). The floor of what
    any exact per-step capture costs (configuration ``norms_floor``)."""

    ROWS = 64

    def set_model(self, model):
        super().set_model(model)
        optimizer = model.optimizer
        buffer = tf.Variable(tf.zeros([self.ROWS, len(model.trainable_variables)]), trainable=False)
        count = tf.Variable(0, dtype=tf.int32, trainable=False)
        original = optimizer.apply

        def squares_of(g):
            if in_xla_context():
                return stats.row_sums(tf.square(tf.reshape(tf.cast(g, tf.float32), [1, -1])))[0]
            return 2.0 * tf.nn.l2_loss(g)

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            squares = tf.stack([squares_of(g) for g in grads])
            row = count.assign_add(1) % self.ROWS
            buffer.scatter_nd_update(tf.reshape(row, [1, 1]), tf.expand_dims(squares, 0))
            return original(grads, trainable_variables)

        optimizer.apply = apply


class NaiveRecompute(keras.callbacks.Callback):
    """What gradient tools without in-graph capture do: after every step, recompute the
    gradients on a sample batch with a tf.function GradientTape and fetch per-variable norms."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = tf.constant(x), tf.constant(y)
        self._fn = None

    def on_train_batch_end(self, batch, logs=None):
        if self._fn is None:
            model = self.model

            @tf.function
            def norms(x, y):
                with tf.GradientTape() as tape:
                    loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                return [tf.norm(g) for g in grads if g is not None]

            self._fn = norms
        [n.numpy() for n in self._fn(self.x, self.y)]


def configurations(log_root, sample, internal=None):
    """Returns {name: a function that makes the fit's callbacks}. ``internal``: the
    monitors' ``InternalOptions`` (``LONG_RUN`` for step_ab.py's short runs; the
    gate's fits are long enough for the defaults)."""

    def plain():
        return []

    def gradwatch_default():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), internal=internal)]

    def gradwatch_clip():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), clip=gw.clip.GlobalNorm(1.0),
                                   internal=internal)]

    def gradwatch_hist_every_step():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), histogram_every=1,
                                   internal=internal)]

    def gradwatch_activations():
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), activation_probe=True,
                                   internal=internal)]

    def gradwatch_no_lean():
        # every step a full step: what the lean step's second trace saves at run time
        no_lean = dataclasses.replace(internal or InternalOptions(), lean_steps=False)
        return [gw.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), internal=no_lean)]

    def naive_recompute():
        return [NaiveRecompute(*sample)]

    def keras_tensorboard():
        return [keras.callbacks.TensorBoard(log_dir=tempfile.mkdtemp(dir=log_root), histogram_freq=1,
                                            update_freq="batch")]

    return {
        "plain": plain,
        CONTROL: plain,
        "gradwatch": gradwatch_default,
        "gradwatch+clip": gradwatch_clip,
        "gradwatch+hist_every_step": gradwatch_hist_every_step,
        "gradwatch+activation_probe": gradwatch_activations,
        "gradwatch+no_lean": gradwatch_no_lean,
        "naive_recompute": naive_recompute,
        "norms_floor": lambda: [NormsFloor()],
        "keras_tensorboard_hist": keras_tensorboard,
    }


def baseline_configuration(revision, log_root):
    """The default ``GradientMonitor`` of git revision ``revision`` (see baseline.py)."""
    import baseline

    base = baseline.load(revision)
    return lambda: [base.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root))]


def timed_fit(model_name, callbacks, data, steps, jit_compile):
    """One fit of ``WARMUP + steps`` steps, the model dropped after it. Returns each
    step's seconds (``StepTimer``), the fit's wall seconds and its process CPU seconds."""
    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[model_name]()
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    timer = StepTimer()
    callbacks = callbacks + [timer]
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(data, steps_per_epoch=WARMUP + steps, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    del model, callbacks
    keras.backend.clear_session()
    gc.collect()
    return timer.times, wall, cpu


def run_once(model_name, make_callbacks, data, steps, batch_size, jit_compile):
    """One fit of ``WARMUP + steps`` steps. Returns its summary (see ``summarise``)."""
    times, wall, _ = timed_fit(model_name, make_callbacks(), data, steps, jit_compile)
    return summarise(times, wall)


def summarise(times, wall):
    """Returns a fit's figures: the mean and median of its steps after the warm-up
    (steps over ``OUTLIER`` x the median left out of the mean), and its one-off seconds."""
    steady = times[WARMUP:]
    median = statistics.median(steady)
    kept = [t for t in steady if t <= OUTLIER * median]
    mean = statistics.mean(kept)
    return {"mean_ms": mean * 1e3, "median_ms": median * 1e3, "outliers": len(steady) - len(kept),
            "one_off_s": wall - len(times) * mean, "wall_s": wall,
            "warmup_s": sum(times[:WARMUP])}


def dataset(name, batch_size):
    """32 distinct batches, repeated: the fit reads from a pipeline, as training does.

    tf.data's autotuning is off: with it, deleting the fit's iterator after the last
    callback took ~2.4 s in about a third of the fits here (plain ones as much), at
    random, which made the one-off seconds bimodal (2 of 8 plain MLP fits, 8 of 8 with
    it off gave none). A fixed prefetch of 2 has nothing to tune."""
    x, y = make_data(name, 32 * batch_size)
    options = tf.data.Options()
    options.autotune.enabled = False
    return (tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat().prefetch(2)
            .with_options(options))


def cell(runs, config):
    """Returns a configuration's table cell: per repetition, its mean and median over
    plain's of the same repetition, and its one-off seconds less plain's; medians
    over the repetitions."""
    base, mine = runs["plain"], runs[config]
    return {
        "mean_ratio": statistics.median(m["mean_ms"] / b["mean_ms"] for m, b in zip(mine, base)),
        "median_ratio": statistics.median(m["median_ms"] / b["median_ms"] for m, b in zip(mine, base)),
        "extra_one_off_s": statistics.median(m["one_off_s"] - b["one_off_s"] for m, b in zip(mine, base)),
        # a slow minute of this shared machine can land on one fit's one-off: the least
        # one-off of each configuration is the fairer comparison of what it adds
        "extra_least_one_off_s": min(m["one_off_s"] for m in mine) - min(b["one_off_s"] for b in base),
        "mean_ms": statistics.median(m["mean_ms"] for m in mine),
        "per_rep_mean_ratio": [m["mean_ms"] / b["mean_ms"] for m, b in zip(mine, base)],
    }


def print_table(results, header=True):
    """Prints the gate's table: one line per model, jit setting and configuration."""
    if header:
        print(f"{'model':12s} {'jit':4s} {'configuration':26s} {'mean':>6s} {'typical':>8s} "
              f"{'floor':>6s} {'one-off+s':>9s} {'least+s':>8s} {'plain ms':>9s}")
    plain_least = {}
    for r in results:
        if "plain_runs" in r:
            plain_least[(r["model"], r["jit_compile"])] = min(p["one_off_s"] for p in r["plain_runs"])
    for r in results:
        least = r.get("extra_least_one_off_s")
        if least is None and (r["model"], r["jit_compile"]) in plain_least:
            least = min(m["one_off_s"] for m in r["runs"]) - plain_least[(r["model"], r["jit_compile"])]
        print(f"{r['model']:12s} {('on' if r['jit_compile'] else 'off'):4s} {r['config']:26s} "
              f"{r['mean_ratio']:6.3f} {r['median_ratio']:8.3f} {r['floor']:6.3f} "
              f"{r['extra_one_off_s']:9.2f} {least if least is not None else float('nan'):8.2f} "
              f"{r['plain_mean_ms']:9.2f}", flush=True)


def balanced_orders(n):
    """Returns orders of ``range(n)`` (n for even n, 2n for odd) in which each item takes
    each place equally often and follows each other item equally often (a Williams
    design): a fit's slowdown from the fit before it falls evenly on every configuration."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(item + shift) % n for item in first] for shift in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def measure_cell(name, jit_compile, args, log_root):
    """Runs one model's configurations interleaved for ``args.reps`` repetitions (in
    this process). Returns the table rows of that cell."""
    steps, batch_size = args.steps, BATCH_SIZE
    configs = configurations(log_root, make_data(name, batch_size))
    if args.baseline:
        configs["baseline"] = baseline_configuration(args.baseline, log_root)
    wanted = ["plain", CONTROL, *[c for c in args.configs.split(",") if c]]
    wanted += ["baseline"] if args.baseline else []
    unknown = set(wanted) - set(configs)
    if unknown:
        raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {sorted(configs)}")
    data = dataset(name, batch_size)
    runs = {c: [] for c in wanted}
    orders = balanced_orders(len(wanted))
    for rep in range(args.reps):
        for k in orders[rep % len(orders)]:
            config = wanted[k]
            runs[config].append(run_once(name, configs[config], data, steps, batch_size, jit_compile))
    floor = cell(runs, CONTROL)["mean_ratio"]
    plain_mean = statistics.median(r["mean_ms"] for r in runs["plain"])
    rows = [{"model": name, "jit_compile": jit_compile, "config": config, "floor": floor,
             "plain_mean_ms": plain_mean, **cell(runs, config), "runs": runs[config]}
            for config in wanted[1:]]
    rows[0]["plain_runs"] = runs["plain"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLP, jit off, 3 repetitions of 300 steps")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (1000)")
    parser.add_argument("--jit", choices=["off", "on", "both"], default=None,
                        help="jit_compile of the model (default: both; off with --quick)")
    parser.add_argument("--cells", default=None,
                        help="model:jit pairs in this order (mlp:off,mlp:on,...), instead of --models/--jit")
    parser.add_argument("--configs", default="gradwatch,gradwatch+hist_every_step",
                        help="comma-separated configurations beside plain and plain:control")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--print", metavar="FILE", help="print the table of a results file and exit")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the default monitor of git revision REV (configuration 'baseline')")
    parser.add_argument("--cell-json", metavar="FILE", help=argparse.SUPPRESS)  # one cell, in this process
    args = parser.parse_args()
    if args.print:
        with open(args.print) as f:
            print_table(json.load(f)["results"])
        return
    args.reps = args.reps or (3 if args.quick else 8)
    args.steps = args.steps or (300 if args.quick else 1000)
    if args.cell_json:
        name, jit = args.cells.split(":")
        rows = measure_cell(name, jit == "on", args, tempfile.mkdtemp(prefix="gradwatch-bench-"))
        with open(args.cell_json, "w") as f:
            json.dump({"rows": rows, "rss_mib": rss_mib(),
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
        return
    if args.cells:
        cells = [tuple(c.split(":")) for c in args.cells.split(",")]
    else:
        names = args.models.split(",") if args.models else (["mlp"] if args.quick else list(TABLE_MODELS))
        jit = args.jit or ("off" if args.quick else "both")
        cells = [(n, j) for j in {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[jit] for n in names]
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = os.path.join(args.out, f"bench-{stamp}.json")
    results, rss_after = [], []

    def write():
        """(Re)writes the results file after every cell, so a stopped run keeps them."""
        with open(path, "w") as f:
            json.dump({"date": stamp, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                       "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                                    "gradwatch": gw.__version__},
                       "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
                       "batch_size": BATCH_SIZE, "steps": args.steps, "warmup": WARMUP, "reps": args.reps,
                       "outlier_factor": OUTLIER, "one_process_per_cell": True,
                       "order": "balanced Latin square (balanced_orders)",
                       "rss_after_each_cell_mib": rss_after, "results": results}, f, indent=2)

    print_table([])  # the header
    for name, jit in cells:
        # each cell in a fresh process, as a user's training runs: a process that has
        # traced many models before (TensorFlow keeps every function and XLA program)
        # times later cells differently
        cell_json = os.path.join(tempfile.mkdtemp(prefix="gradwatch-cell-"), "cell.json")
        command = [sys.executable, os.path.abspath(__file__), "--cells", f"{name}:{jit}", "--cell-json",
                   cell_json, "--reps", str(args.reps), "--steps", str(args.steps), "--configs", args.configs]
        command += ["--baseline", args.baseline] if args.baseline else []
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(cell_json) as f:
            measured = json.load(f)
        print_table(measured["rows"], header=False)
        results.extend(measured["rows"])
        rss_after.append([jit == "on", name, measured["rss_mib"]])
        write()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
