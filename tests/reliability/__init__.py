"""The fault matrix and the soak: ``python -m tests.reliability --cycles N``
(docs/RELIABILITY.md).

A simulated site (gateway/sim over Modbus TCP and RTU on a pty) runs EVs that charge with RFID;
the real gateway process (``python -m gateway run``) reads it and publishes through a TCP fault
proxy to a real mosquitto; a persistent MQTT subscriber records what the cloud gets. Faults are
applied one kind after the other; afterwards every session the simulator produced must have
reached the subscriber exactly once after dedup by session_id, with the simulator's energy, seq
gap-free and the hash chain intact.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the test helpers (mqtt_broker, test_uplink_support) are plain modules in tests/, as pytest
# sees them
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
