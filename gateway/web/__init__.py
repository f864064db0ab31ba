"""The gateway's web side: a live status page, a JSON API with server-sent events and Prometheus
metrics (``web:`` in the site config). ``gateway.web.server`` needs aiohttp; ``users`` only the
standard library, so the config checker can read a users file without loading a web stack."""
