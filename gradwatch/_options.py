"""Validated options shared by ``GradientMonitor`` and ``Watch``."""

from __future__ import annotations

import dataclasses
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
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int from {minimum} to {maximum:,}; "
                        f"received {value!r} ({type(value).__name__}).")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int from {minimum} to {maximum:,}; received {value!r}.")
    return value


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
            if not isinstance(self.log_dir, (str, os.PathLike)):
                raise TypeError(
                    "log_dir must be a path (str or os.PathLike) or None; "
                    f"received {self.log_dir!r} ({type(self.log_dir).__name__})."
                )
            self.log_dir = os.fspath(self.log_dir)
            if os.path.exists(self.log_dir) and not os.path.isdir(self.log_dir):
                raise ValueError(
                    f"log_dir must be a directory; received {self.log_dir!r}, which is a file. "
                    "Pass a directory path (it is created if missing)."
                )
        check_int("log_every", self.log_every, 1)
        check_int("histogram_every", self.histogram_every, 0)
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
