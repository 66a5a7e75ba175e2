"""What the accounts service owns outside the process: its PostgreSQL database and the outbox relay."""
