"""Adds gradwatch's Custom Scalars dashboard layout to runs written without it.

Kept for old instructions: the command is installed with the package, ``gradwatch layout
LOG_DIR [--force]`` (``gradwatch/_sinks/tb_layout.py``).
"""

from __future__ import annotations

import sys

from gradwatch.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs ``gradwatch layout`` with ``argv``; returns its exit status."""
    return cli_main(["layout", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
