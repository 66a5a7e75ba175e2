"""history: viewing history per profile, after Netflix's LiveVH / CompressedVH split, in Cassandra."""
