"""A local, Antenna-compatible server: REST API, JetStream job streams, an embedded nats-server, demo images."""
