"""Helpers shared by the test files; pytest collects nothing here.

- ``mqtt_broker``: a real mosquitto per test, a test PKI, a TCP fault proxy; the broker fixtures.
- ``uplink``: a recording cloud subscriber, a command target, session records, payload checks.
- ``records``: a valid typed session record with overrides, for tests that finish sessions.
- ``consumer``: sealed, signed session chains for the consumer, statement and verify tests.
- ``sessions``: the session pipeline over real Modbus, wired as the app wires it.
- ``web``: a simulated site and the gateway with its web server.
- ``tiers``: the e2e and slow tiers and the guard that keeps the inner loop in-process (a plugin).
"""
