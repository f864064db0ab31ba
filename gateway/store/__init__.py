"""The durable local buffer (SQLite): sessions, outbox, readings, auth state, small key-values."""

from gateway.store.sqlite import Store

__all__ = ["Store"]
