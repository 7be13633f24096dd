"""Sinks: verdicts and alarms delivered to the line's systems (webhooks, MQTT, OPC UA), at least once."""
