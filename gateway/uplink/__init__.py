"""Store-and-forward MQTT uplink: topics, payload schemas, commands and the client."""
