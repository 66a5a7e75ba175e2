"""What the history service owns of the outside world: its Cassandra keyspace."""
