"""Every touch of aiomqtt's insides, in one place (aiomqtt 2.5 over paho-mqtt 2.2).

The cloud consumer (gateway/cloud/subscriber.py) receives through aiomqtt and must acknowledge a
message only once it is stored: its PUBACK must not go out before its database has the record.
aiomqtt has no public way to say so, so ``manual_acks`` reaches the paho client it keeps in its
private ``_client`` and uses paho's public API there (``Client.manual_ack_set``, ``Client.ack``).
tests/test_uplink_pahoport.py checks it against a real broker: an upgrade of aiomqtt or paho that
moves any of it fails there, by name. Widening the aiomqtt or paho-mqtt pin in pyproject.toml
starts with that test.

(The gateway's own uplink does not use aiomqtt: gateway/uplink/link.py says why.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

__all__ = ["manual_acks"]


def _paho(client: aiomqtt.Client) -> paho.Client:
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client):
        raise RuntimeError(
            "aiomqtt.Client no longer keeps its paho client in _client: "
            "gateway/uplink/pahoport.py needs updating for this aiomqtt version"
        )
    return inner


def manual_acks(client: aiomqtt.Client) -> Callable[[int, int], Any]:
    """Turn paho's automatic PUBACKs off for ``client`` (call before connecting); returns
    ``ack(mid, qos)`` to send one once the message is safe."""
    inner = _paho(client)
    inner.manual_ack_set(True)
    return inner.ack
