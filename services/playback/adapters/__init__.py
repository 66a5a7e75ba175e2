"""What playback owns of the outside world: its PostgreSQL database, its outbox relay, its view of
Kafka offsets."""
