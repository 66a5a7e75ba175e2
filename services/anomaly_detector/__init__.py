"""Streaming anomaly detection for univariate time series, and the NAB benchmark's scoring.

- :mod:`.detector`: :class:`Detector`, ``update(timestamp, value) -> score in [0, 1]``, one per series,
  with a small JSON-able state (``to_dict`` / ``from_dict``) for a live service to keep.
- :mod:`.scoring`: the Numenta Anomaly Benchmark's scoring rules (windows, scaled sigmoid, profiles,
  threshold optimisation, normalisation).
- :mod:`.corpus`: reading a NAB-layout corpus and running a detector over it.
- :mod:`.baselines`: NAB's null and windowed Gaussian detectors, for comparison.

Those four are pure Python, no I/O beyond reading a corpus, no dependency on the bus. The live
service (``python -m services.anomaly_detector``, a faust stream processor on ``services.bus.streams``):

- :mod:`.rules`: the anomaly rules, pure (account sharing, impossible travel, decline bursts, the
  detector on service and node series, sustained mount stalls), with :mod:`.geo` for countries;
- :mod:`.handlers`: one function per input, of (event, dependencies); :mod:`.adapters.tables`: the
  rules' state in changelog-backed tables; :mod:`.app`, :mod:`.settings`: the wiring.
"""

from services.anomaly_detector.detector import Detector, DetectorConfig

__all__ = ["Detector", "DetectorConfig"]
