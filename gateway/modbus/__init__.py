"""Modbus: from a profile (data) to values on the wire and back.

- ``types``/``codec``: register types and their encoding (no I/O).
- ``plan``: which read requests fetch a profile's registers.
- ``adapter``: the one module that touches pymodbus beyond its public API (the version pin's
  reason).
- ``bus``: one object per RS-485 line or TCP endpoint (serialised requests, timeouts, reopen,
  inter-frame gap); ``BusPool`` shares them between devices.
- ``driver``: one device (profile-driven reads and control writes); ``Chargers`` for sessions.
- ``poller``: the scheduling loop (phases, missed slots, heartbeats).
- ``scan``: identify devices on an endpoint or line; ``commands``: ``evgw read`` / ``evgw scan``.

Imports flow one way: commands -> scan, poller -> driver -> bus -> adapter.
"""
