"""The catalog service: titles in PostgreSQL, read through a Redis cache, changes on ``catalog.changes``.

Writes go to PostgreSQL together with a ``TitleChanged`` row in a transactional outbox; a relay
publishes the outbox in order. Every replica consumes ``catalog.changes`` in a consumer group of its
own and invalidates the shared Redis cache from it (Netflix's EVCache pattern).
"""
