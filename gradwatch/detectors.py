"""The detectors' thresholds, the one public name of the detectors
(``gw.detectors.Thresholds``, also ``gw.Thresholds``)."""

from gradwatch._interpret.detectors import Thresholds

__all__ = ["Thresholds"]
