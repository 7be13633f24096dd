"""Camera processes: OpenCV sources push frames into Redis Streams."""
