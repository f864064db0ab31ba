"""Modbus transport (buses), register codecs and the generic profile engine."""
