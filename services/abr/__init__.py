"""Adaptive bitrate: the linear QoE, BBA / BOLA / RobustMPC, and a trace-driven player simulator (pure).

``qoe.py`` scores a session, ``algorithms.py`` chooses rungs, ``simulator.py`` replays throughput traces
(``traces/synthetic`` ships a few with known answers); ``reelbus abr simulate`` drives them.
"""
