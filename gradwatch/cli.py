"""The ``gradwatch`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import logging

    from gradwatch.demo import run_demo

    # The demo prints each run's alerts itself; don't echo them a second time.
    logging.getLogger("gradwatch").addHandler(logging.NullHandler())
    logging.getLogger("gradwatch").propagate = False

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Gradient-flow diagnostics for TensorFlow/Keras training runs.",
    )
    from gradwatch import __version__

    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train the worked example and example networks on synthetic data"
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
