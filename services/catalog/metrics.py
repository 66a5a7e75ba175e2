"""The catalog's Prometheus metrics, served at ``/metrics`` with the bus's."""

from __future__ import annotations

from prometheus_client import Counter

CACHE_HITS = Counter("catalog_cache_hits", "Reads answered from the cache", ["kind"])  # kind: title, list
CACHE_MISSES = Counter("catalog_cache_misses", "Reads that went to PostgreSQL", ["kind"])
CACHE_ERRORS = Counter(
    "catalog_cache_errors", "Cache calls that failed (the read was served from PostgreSQL)", ["op"]
)
INVALIDATIONS = Counter(
    "catalog_cache_invalidations",
    "Change events handled by the cache: outcome=applied, stale (the cache had seen that version) or "
    "ignored (not a catalog title id)",
    ["change", "outcome"],
)
OUTBOX_PUBLISHED = Counter("catalog_outbox_published", "Outbox events acknowledged by the broker")
