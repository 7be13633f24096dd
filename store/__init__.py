"""Results store: per-frame results in, alarm events out (Pub/Sub live, a durable stream reliable)."""
