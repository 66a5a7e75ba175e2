"""The gateway: the one public entry. Verifies tokens, rate-limits, and forwards to the services."""
