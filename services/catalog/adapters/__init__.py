"""What the catalog owns outside itself: PostgreSQL (titles, outbox) and the Redis cache."""
