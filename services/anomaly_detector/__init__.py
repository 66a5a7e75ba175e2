"""Streaming anomaly detection for univariate time series, and the NAB benchmark's scoring.

- :mod:`.detector`: :class:`Detector`, ``update(timestamp, value) -> score in [0, 1]``, one per series,
  with a small JSON-able state (``to_dict`` / ``from_dict``) for a live service to keep.
- :mod:`.scoring`: the Numenta Anomaly Benchmark's scoring rules (windows, scaled sigmoid, profiles,
  threshold optimisation, normalisation).
- :mod:`.corpus`: reading a NAB-layout corpus and running a detector over it.
- :mod:`.baselines`: NAB's null and windowed Gaussian detectors, for comparison.

Pure Python, no I/O beyond reading a corpus, no dependency on the bus.
"""

from services.anomaly_detector.detector import Detector, DetectorConfig

__all__ = ["Detector", "DetectorConfig"]
