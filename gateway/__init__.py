"""ev-site-gateway: edge gateway for EV charging sites."""

__version__ = "0.1.0"
