"""The dashboard's outside world: Kafka (admin API and a group-less tail) and Zipkin's query API."""
