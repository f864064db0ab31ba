"""The cloud side: what runs next to the broker, never on the gateway.

``subscriber`` (``evgw consume``) takes finished sessions and site keys from the broker;
``consumer`` checks them and files them in a ``cloudstore`` (tables in ``schema``); ``trust`` and
``trustadmin`` decide and administer which keys may sign a site's records; ``statement`` bills a
month of stored sessions (with ``ocpi`` CDRs). The edge runtime (``gateway.app`` and everything it
wires) never imports this package; the CLI imports it inside the ``consume``, ``trust`` and
``statement`` commands, and ``evgw verify --db`` inside its handler. What both sides need (record
hashing, signatures and rotation statements, payload schemas) lives in ``gateway.records``,
``gateway.billing.signing`` and ``gateway.uplink.schemas``.
"""
