"""The anomaly detector's adapters: its changelog-backed tables."""
