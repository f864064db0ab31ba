"""Simulated chargers and meters served over real Modbus (tests, `evgw simulate`, `evgw demo`)."""
