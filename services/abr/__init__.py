"""Adaptive bitrate: the linear QoE, BBA / BOLA / RobustMPC, a trace-driven player simulator (pure),
and the live ABR service that decides per-session bitrates from telemetry.

``qoe.py`` scores a session, ``algorithms.py`` chooses rungs, ``simulator.py`` replays throughput traces
(``traces/synthetic`` ships a few with known answers); ``reelbus abr simulate`` drives them.
``session.py`` folds a live session's telemetry into the same algorithm input the simulator builds;
``python -m services.abr`` runs the service (``app.py``, ``handlers.py``, ``adapters/store.py``).
"""
