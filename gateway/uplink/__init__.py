"""Store-and-forward MQTT uplink: topics, payload schemas, commands, the connection loop
(mqtt.py) over one paho client on its own network thread (link.py), the backlog drain
(drain.py), and the one adapter to aiomqtt's insides the cloud consumer uses (pahoport.py).
Which outgoing message goes which way is written down in gateway/outgoing.py."""
