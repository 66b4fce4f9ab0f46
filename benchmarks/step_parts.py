"""What each part of a monitored step costs, in one process: ``step_ab.py``'s interleaved
steps with the current code beside copies of it that leave one part of the step's work
out, and beside the floor of exact per-step norms.

Configurations (each its own model and monitor, steps called in turn, ``step_ab.py``):

- ``plain`` and ``plain:control``: no monitor, twice (the instrument's floor);
- ``norms floor``: the least an exact per-step capture can do: a callback whose tap of
  ``optimizer.apply`` takes each gradient's sum of squares (``L2Loss``; under XLA ``stats.row_sums``;
  ``overhead.NormsFloor``) and writes them as
  one row of a buffer variable, nothing else. What gradwatch's step costs above it is
  what the rest of its work (statistics, probes, bookkeeping) costs;
- ``gradwatch``: ``GradientMonitor()`` of the working tree;
- ``without <part>``: ``GradientMonitor()`` of git revision ``--revision`` (default HEAD,
  imported as its own package, one copy per configuration) with that part's in-step
  work replaced by nothing: ``rare passes`` (the conditional finite and careful passes
  over the gradients), ``update measure``, ``histograms``, ``unit probe``, or all four
  (``without all four``). A part's cost is its configuration's distance below
  ``gradwatch`` (which equals the revision's when the working tree is clean).

Every configuration runs full steps only (no lean step), as the gate's 1,050-step fits do.

Usage:
    python benchmarks/step_parts.py mlp --steps 1500
    python benchmarks/step_parts.py transformer --steps 600 --jit
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import baseline  # noqa: E402
import step_ab  # noqa: E402
from first_call_parts import leave_out  # noqa: E402
from overhead import NormsFloor  # noqa: E402

#: part -> its name in ``first_call_parts.leave_out``
PARTS = {"rare passes": "no-rare", "update measure": "no-update", "histograms": "no-histogram",
         "unit probe": "no-unit"}
ALL = "all four"


def extra_configurations(revision: str, parts: list[str]):
    """Returns step_ab's ``extra``: the floor and one package copy per left-out part."""

    def extra(log_root, internal):
        configs = {"norms floor": lambda: [NormsFloor()]}
        for k, part in enumerate(parts):
            name = f"gradwatch_part{k}"
            package = baseline.load(revision, name)
            leave_out(set(PARTS.values()) if part == ALL else {PARTS[part]}, name)
            options = importlib.import_module(f"{name}._internal_options")
            copied = options.InternalOptions(lean_steps=False, lean_min_steps=0, lean_break_even=False)

            def make(package=package, copied=copied):
                return [package.GradientMonitor(log_dir=tempfile.mkdtemp(dir=log_root), internal=copied)]

            configs[f"without {part}"] = make
        return configs

    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--revision", default="HEAD", help="the revision the parts are left out of")
    parser.add_argument("--parts", default=",".join(list(PARTS) + [ALL]),
                        help="comma-separated: " + ", ".join(list(PARTS) + [ALL]))
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS) - {ALL}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    configs = ["norms floor", "gradwatch"] + [f"without {p}" for p in parts]
    argv = [args.model, "--full", "--control", "--steps", str(args.steps), "--configs", ",".join(configs)]
    if args.jit:
        argv.append("--jit")
    step_ab.main(argv, extra=extra_configurations(args.revision, parts))


if __name__ == "__main__":
    sys.exit(main())
