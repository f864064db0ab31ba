"""The durable local buffer (SQLite): sessions, outbox, readings, auth state, small key-values."""

from gateway.store.sqlite import SESSION_STREAM, SESSION_TOPIC, Store

__all__ = ["SESSION_STREAM", "SESSION_TOPIC", "Store"]
