"""Validated options shared by ``GradientMonitor`` and ``Watch``."""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

ON_NONFINITE_CHOICES = ("warn", "skip_step", "stop", "raise")
#: The largest step count an option takes: far beyond any run, and exact in int64
#: step arithmetic and in float64 window values.
MAX_STEPS = 10**9


def check_int(name: str, value: Any, minimum: int, maximum: int = MAX_STEPS) -> int:
    """Returns ``value`` when it is an int in [minimum, maximum]; else says so, naming ``name``.

    Raises:
        TypeError: not an int (a bool is not one).
        ValueError: outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int from {minimum} to {maximum:,}; "
                        f"received {value!r} ({type(value).__name__}).")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int from {minimum} to {maximum:,}; received {value!r}.")
    return int(value)


def _check_log_dir(log_dir: Any) -> str:
    """Returns ``log_dir`` as a str when it names a directory that exists or can be made."""
    if not isinstance(log_dir, (str, os.PathLike)) or isinstance(os.fspath(log_dir), bytes):
        raise TypeError("log_dir must be a path (str or os.PathLike) or None; "
                        f"received {log_dir!r} ({type(log_dir).__name__}).")
    path = os.fspath(log_dir)
    if not path or "\0" in path:
        raise ValueError("log_dir must be a non-empty path without NUL characters, or None; "
                         f"received {path!r}.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"log_dir must be a directory; received {path!r}, which is a file. "
                         "Pass a directory path (it is created if missing).")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"log_dir cannot be created: received {path!r}, but {parent!r} is a file. "
                         "Pass a directory path whose existing part is a directory.")
    return path


@dataclasses.dataclass
class Options:
    """Options of one run; see ``GradientMonitor`` for their meaning."""

    log_dir: str | None
    log_every: int = 10
    histogram_every: int = 100
    clip: Any = None
    on_nonfinite: str = "warn"
    append: bool = False
    thresholds: Any = None
    signed_histograms: bool = False
    activation_probe: bool = False

    def __post_init__(self) -> None:
        if self.log_dir is not None:
            self.log_dir = _check_log_dir(self.log_dir)
        self.log_every = check_int("log_every", self.log_every, 1)
        self.histogram_every = check_int("histogram_every", self.histogram_every, 0)
        if self.on_nonfinite not in ON_NONFINITE_CHOICES:
            raise ValueError(
                f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE_CHOICES))}; "
                f"received {self.on_nonfinite!r}."
            )
        from gradwatch.clip import as_clip

        self.clip = as_clip(self.clip)
        from gradwatch._interpret.detectors import Thresholds

        if self.thresholds is None:
            self.thresholds = Thresholds()
        elif not isinstance(self.thresholds, Thresholds):
            raise TypeError(
                "thresholds must be a gradwatch.Thresholds or None; "
                f"received {self.thresholds!r}."
            )
        if not isinstance(self.signed_histograms, bool):
            raise TypeError(f"signed_histograms must be True or False; received {self.signed_histograms!r}.")
        if not isinstance(self.activation_probe, bool):
            raise TypeError(f"activation_probe must be True or False; received {self.activation_probe!r}.")
        if not isinstance(self.append, bool):
            raise TypeError(f"append must be True or False; received {self.append!r}.")

    @property
    def writes(self) -> bool:
        return self.log_dir is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "log_dir": self.log_dir,
            "log_every": self.log_every,
            "histogram_every": self.histogram_every,
            "clip": repr(self.clip) if self.clip is not None else None,
            "on_nonfinite": self.on_nonfinite,
            "append": self.append,
            "signed_histograms": self.signed_histograms,
            "activation_probe": self.activation_probe,
            "thresholds": dataclasses.asdict(self.thresholds),
        }
