"""The Redis runtime every process shares: connections (single Redis or Cluster), consumer-group streams and
the serve loop, dead letters, Prometheus metrics, health endpoints and `patchcore status`."""
