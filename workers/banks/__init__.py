"""Memory banks in service: the registry in Redis with its signing (registry), the worker's cache of loaded
scorers (cache) and the queue of good frames for the next bank update (updates)."""
