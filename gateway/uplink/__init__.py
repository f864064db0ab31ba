"""Store-and-forward MQTT uplink: topics, payload schemas, commands, the connection (mqtt.py),
the backlog drain (drain.py) and the one adapter to aiomqtt's insides (pahoport.py). Which
outgoing message goes which way is written down in gateway/outgoing.py."""
