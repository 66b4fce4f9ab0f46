"""What gradwatch adds to the XLA compile of a ``jit_compile=True`` fit's train step:
the compile's seconds, as TensorFlow itself logs them ("Compilation of XLA executable
time"), and the step's size after XLA's optimizations: its HLO instructions and the
machine-code kernels XLA's CPU backend generates (one LLVM module each). On this CPU the
compile is mostly the kernels' code generation, ~20 ms a kernel, so the kernel count is
the jit-on one-off's measure that does not depend on how busy the machine is.

Each fit runs in a fresh process (the log level and the dump directory are read when
TensorFlow starts), timed without a dump (writing one takes seconds of its own: the
transformer's monitored compile at 00ddba7 read 14.3 s with it, 8.7 s without) and counted in one
more fit with it: plain, then ``GradientMonitor()`` with some probes' in-step work
left out (``first_call_parts.leave_out``), a fit of 1,050 planned steps stopped after 3
(the gate's fits: Keras's own step, which traces no in-step fold). The kernels are
also counted per conditional branch of the step, labelled by the TensorFlow op names
inside them.

Usage:
    python benchmarks/xla_compile.py mlp
    python benchmarks/xla_compile.py transformer --variants full,no-update,no-histogram,no-unit --reps 2
    PYTHONPATH=/path/to/older/checkout python benchmarks/xla_compile.py mlp   # another revision
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CALLED = re.compile(r"(?:true_computation|false_computation|body|condition)=%([\w.\-]+)")
COMPILE_LINE = re.compile(r"Compilation of XLA executable time: [0-9.]+ \w+ \((\d+) us\)")


def child(model_name: str, variant: str) -> None:
    """One fit in this process (TensorFlow's logging and dump were set by the parent)."""
    import logging

    import keras
    from first_call_parts import leave_out
    from overhead import BATCH_SIZE, MODELS, dataset

    import gradwatch as gw

    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    if variant != "plain":
        leave_out(set(variant.split(",")) - {"full"})

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch >= 2:
                self.model.stop_training = True

    keras.utils.set_random_seed(0)
    model, _, _ = MODELS[model_name]()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    callbacks = [Stop()] + ([gw.GradientMonitor(log_dir=tempfile.mkdtemp())] if variant != "plain" else [])
    model.fit(dataset(model_name, BATCH_SIZE), steps_per_epoch=1050, epochs=1, verbose=0, callbacks=callbacks)


def parse_module(dump: str) -> tuple[dict[str, list[str]], set[str], str]:
    """The train step's optimized HLO (computation -> lines), its kernels' names, the entry."""
    texts = [p for p in glob.glob(os.path.join(dump, "*one_step_on_data*cpu_after_optimizations.txt"))]
    if len(texts) != 1:
        raise RuntimeError(f"expected one compiled train step in {dump}, found {len(texts)}")
    kernels = set()
    for path in glob.glob(os.path.join(dump, "*one_step_on_data*_kernel_module.ir-with-opt.ll")):
        match = re.search(r"__\.\d+\.(.*)_kernel_module\.ir-with-opt\.ll$", os.path.basename(path))
        if match:
            kernels.add(match.group(1))
    computations: dict[str, list[str]] = {}
    current, entry = None, ""
    with open(texts[0]) as handle:
        for line in handle:
            line = line.rstrip("\n")
            header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
            if header and not line.startswith(" "):
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
                continue
            if line.strip() == "}":
                current = None
            elif current is not None:
                computations[current].append(line)
    return computations, kernels, entry


def branch_kernels(computations, kernels, entry) -> list[tuple[str, int]]:
    """Kernels of each top-level conditional (all its branches, nested ones included),
    labelled by the most common op-name scope inside (gradwatch's ops are named
    ``gradwatch/<part>/...``), and of the rest of the step."""

    def walk(name, seen):
        if name in seen or name not in computations:
            return
        seen.add(name)
        for line in computations[name]:
            for target in CALLED.findall(line):
                walk(target, seen)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                for target in re.findall(r"%([\w.\-]+)", branches.group(1)):
                    walk(target, seen)

    def own_kernels(name):
        found, scopes = 0, collections.Counter()
        for line in computations[name]:
            defined = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
            if defined and defined.group(1) in kernels:
                found += 1
                scope = re.search(r'op_name="([^"]*)"', line)
                scopes["/".join(scope.group(1).split("/")[:2]) if scope else "?"] += 1
        return found, scopes

    rows = []
    entry_kernels, scopes = own_kernels(entry)
    ours = sum(n for scope, n in scopes.items() if scope.startswith("gradwatch"))
    rows.append(("step, outside conditionals: gradwatch's", ours))
    rows.append(("step, outside conditionals: the rest", entry_kernels - ours))
    for line in computations[entry]:
        if " conditional(" not in line:
            continue
        seen: set[str] = set()
        targets = re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", line)
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
            targets += re.findall(r"%([\w.\-]+)", branches.group(1))
        for target in targets:
            walk(target, seen)
        total, scopes = 0, collections.Counter()
        for name in seen:
            found, named = own_kernels(name)
            total += found
            scopes.update(named)
        label = scopes.most_common(1)[0][0] if scopes else "?"
        rows.append((f"conditional {label}", total))
    return rows


def run_child(model_name: str, variant: str, dump: str | None) -> str:
    """One fit in a fresh process; returns its log (stderr)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="device_compiler=1")
    if dump is not None:
        env["XLA_FLAGS"] = f"--xla_dump_to={dump} --xla_dump_hlo_as_text"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), HERE) if p)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", model_name, variant],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stderr


def compile_seconds(model_name: str, variant: str) -> float:
    """The XLA compile's seconds of one fit, without a dump (writing one takes seconds of its own)."""
    compiles = [int(m.group(1)) for m in COMPILE_LINE.finditer(run_child(model_name, variant, None))]
    if not compiles:
        raise RuntimeError("no XLA compile logged")
    return sum(compiles) / 1e6


def kernels(model_name: str, variant: str) -> tuple[int, int, list[tuple[str, int]]]:
    """(HLO instructions, kernels, kernels per branch) of the compiled step, from a dump."""
    with tempfile.TemporaryDirectory() as dump:
        run_child(model_name, variant, dump)
        computations, names, entry = parse_module(dump)
        instructions = sum(len(lines) for lines in computations.values())
        return instructions, len(names), branch_kernels(computations, names, entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--variants", default="full",
                        help="variants separated by '+', each 'full' or parts left out, "
                             "e.g. full+no-update,no-histogram")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("variant", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.variant)
        return
    plain_s = statistics.median(compile_seconds(args.model, "plain") for _ in range(args.reps))
    plain = kernels(args.model, "plain")
    print(f"{args.model} jit on, plain: XLA compile {plain_s:.2f} s (median of {args.reps}), "
          f"{plain[0]} HLO instructions, {plain[1]} kernels")
    for variant in args.variants.split("+"):
        seconds = statistics.median(compile_seconds(args.model, variant) for _ in range(args.reps))
        instructions, count, branches = kernels(args.model, variant)
        print(f"  {variant}: XLA compile {seconds:.2f} s, extra {seconds - plain_s:+.2f} s; "
              f"{instructions} HLO instructions ({instructions - plain[0]:+d}), "
              f"{count} kernels ({count - plain[1]:+d})")
        for label, found in branches:
            print(f"      {label:45s} {found:4d} kernels")


if __name__ == "__main__":
    main()
