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

    from gradwatch._report.demo import run_demo

    # The demo prints each run's alerts itself; don't echo them a second time.
    logging.getLogger("gradwatch").addHandler(logging.NullHandler())
    logging.getLogger("gradwatch").propagate = False

    run_demo(args.out)
    return 0


def _data_error(error: Exception) -> int:
    """One line on stderr, no traceback, exit status 2."""
    print(f"gradwatch: error: {error}", file=sys.stderr)
    return 2


_EXTENSIONS = {".html": "html", ".htm": "html", ".md": "md"}


def _report_format(output: str | None, fmt: str | None) -> tuple[str, str]:
    """The report's format from ``--format`` and the ``-o`` extension, and why they are refused ("")."""
    if output is None:
        return fmt or "html", ""
    extension = os.path.splitext(output)[1].lower()
    implied = _EXTENSIONS.get(extension)
    if implied is None:
        return "", (f"-o {output!r}: unknown extension {extension or '(none)'!r}; gradwatch report writes "
                    f"HTML (.html, .htm) or Markdown (.md).")
    if fmt is not None and fmt != implied:
        return "", f"-o {output!r} is {implied} but --format is {fmt}: give a matching extension."
    return implied, ""


def _cmd_report(args: argparse.Namespace) -> int:
    from gradwatch._io.readers import GradwatchDataError
    from gradwatch._report.report import build_report, summary_text

    fmt, refusal = _report_format(args.output, args.format)
    if refusal:
        print(f"gradwatch report: error: {refusal}", file=sys.stderr)
        return 2
    try:
        path, verdicts = build_report(
            args.log_dir, args.output, fmt=fmt, progress=args.progress, source=args.source
        )
    except (GradwatchDataError, OSError) as error:
        return _data_error(error)
    print(summary_text(verdicts), end="")
    print(f"report written to {os.path.abspath(path)}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gradwatch._io.readers import GradwatchDataError
    from gradwatch._report.report import load_all, print_summary

    try:
        verdicts = load_all(args.log_dir, progress=args.progress, source=args.source)
    except (GradwatchDataError, OSError) as error:
        return _data_error(error)
    console = Console() if sys.stdout.isatty() else Console(width=140, soft_wrap=False)
    print_summary(verdicts, console)
    return 1 if any(fails(v, args.fail_on) for v in verdicts) else 0


def _cmd_layout(args: argparse.Namespace) -> int:
    from gradwatch._io.readers import GradwatchDataError
    from gradwatch._sinks.tb_layout import add_layout

    try:
        add_layout(args.log_dir, args.force)
    except (GradwatchDataError, OSError) as error:
        return _data_error(error)
    return 0


def fails(verdicts, fail_on: str) -> bool:
    """Whether a run fails ``gradwatch summary --fail-on``: an error alert was raised (or the run
    diverged); with "warning", also any warning (an alert, or clipping on most steps)."""
    if verdicts.errors_raised or verdicts.divergence is not None:
        return True
    return fail_on == "warning" and any(p.severity == "warning" for p in verdicts.problems)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", choices=("auto", "csv", "events"), default="auto",
        help="read the CSV files or the TensorBoard event files (default auto: CSV when present)",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal or the run is large)",
    )


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

    report = sub.add_parser(
        "report",
        help="write a self-contained HTML (or Markdown) report of one run or of several runs",
        description="Write a report of the run(s) under LOG_DIR: verdicts per layer, gradient-flow heatmap, "
        "gradient norms, update ratios, dead units, clipping, alert timeline and alert table. HTML embeds "
        "its figures (no network); Markdown writes its PNGs into <name>_files/ beside it. "
        "Exit status: 0 written, 2 no readable gradwatch data, or an -o extension other than .html, .htm "
        "or .md.",
    )
    report.add_argument("log_dir", metavar="LOG_DIR", help="a run's log_dir, or a directory of runs")
    report.add_argument("-o", "--output", help="output file (default: LOG_DIR/report.html or .md)")
    report.add_argument("--format", choices=("html", "md"), default=None,
                        help="html (default) or md (default: from the -o extension)")
    _add_common_flags(report)
    report.set_defaults(func=_cmd_report)

    summary = sub.add_parser(
        "summary",
        help="print the verdicts per layer as a terminal table; exit 1 if an error alert was raised",
        description="Print a headline and the verdict of every layer of the run(s) under LOG_DIR. Exit "
        "status: 0 when no run fails, 1 when one does: with --fail-on error (the default) a run fails when "
        "an alert of severity 'error' was raised at some point (even if it later recovered) or the run "
        "diverged; with --fail-on warning also when a warning was raised (an alert, or clipping on most "
        "steps); 2 when LOG_DIR holds no readable gradwatch data or the arguments are wrong. Use it to "
        "gate a CI job.",
    )
    summary.add_argument("log_dir", metavar="LOG_DIR", help="a run's log_dir, or a directory of runs")
    summary.add_argument("--fail-on", choices=("error", "warning"), default="error",
                         help="the least severity that makes the exit status 1 (default: error)")
    _add_common_flags(summary)
    summary.set_defaults(func=_cmd_summary)

    layout = sub.add_parser(
        "layout",
        help="add gradwatch's Custom Scalars dashboard layout to runs written without it",
        description="Write the Custom Scalars layout (gradient norms per layer, update ratios, dead units, "
        "clipping, loss) into every gradwatch run under LOG_DIR whose event files lack one; the per-layer "
        "charts follow the model's layer order. Exit status: 0 done, 2 no gradwatch run under LOG_DIR.",
    )
    layout.add_argument("log_dir", metavar="LOG_DIR", help="a run's log_dir, or a directory of runs")
    layout.add_argument("--force", action="store_true", help="write the layout even if one is there")
    layout.set_defaults(func=_cmd_layout)
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
