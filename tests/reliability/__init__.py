"""The fault matrix and the soak: ``python -m tests.reliability --cycles N``
(docs/RELIABILITY.md).

A simulated site (gateway/sim over Modbus TCP and RTU on a pty) runs EVs that charge with RFID;
the real gateway process (``python -m gateway run``) reads it and publishes through a TCP fault
proxy to a real mosquitto; a persistent MQTT subscriber records what the cloud gets. Faults are
applied one kind after the other; afterwards every session the simulator produced must have
reached the subscriber exactly once after dedup by session_id, with the simulator's energy, seq
gap-free and the hash chain intact.
"""
