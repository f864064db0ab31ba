"""OCPP-J chargers as devices of the site: the server, its mapping onto the gateway's domain,
and a charge point simulator (``gateway.ocpp.sim``)."""
