"""The device agent: sensor readings in over MQTT, the device segment run locally, answers out (``agent``)."""
