"""The edge node: the MQTT relay, the router with its fast tail, and the OpenAI-compatible HTTP API (``node``)."""
