"""Billing: OCPI 2.2.1-style tariffs, costing of finished sessions, and reports.

See docs/billing.md for the model and the rounding rule.
"""

from gateway.billing.cost import PricedSession, make_pricer, price_session
from gateway.billing.tariff import Tariff, TariffBook, parse_tariff, tariff_version

__all__ = [
    "PricedSession",
    "Tariff",
    "TariffBook",
    "make_pricer",
    "parse_tariff",
    "price_session",
    "tariff_version",
]
