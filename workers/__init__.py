"""Consumer-group workers: batch frames from many cameras through the backbone and a shared coreset index."""
