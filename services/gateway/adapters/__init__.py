"""What the gateway talks to: the upstream services over HTTP and Redis for rate limits."""
