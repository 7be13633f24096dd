"""Message contracts shared by ingest, workers and store: message types, key names, connections."""
