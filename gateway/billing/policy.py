"""Which tariff prices a session: the billing section of the site config.

Here, not in ``gateway.config``, so that the tariff book can use it without importing the config
(which imports the tariff checks): no import cycle between the two.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gateway.schema import Model, Text

__all__ = ["TARIFF_ID", "BillingConfig"]

TARIFF_ID = Text(pattern=r"[A-Za-z0-9_-]{1,64}", hint="1 to 64 characters of A-Z a-z 0-9 _ -")


class BillingConfig(Model):
    """Which tariff prices a session: the user's group, else the charger's, else ``default``."""

    default_tariff: Annotated[str, TARIFF_ID] | None = Field(
        default=None, description="tariff when neither group nor charger names one"
    )
    groups: dict[Annotated[str, TARIFF_ID], Annotated[str, TARIFF_ID]] = Field(
        default_factory=dict, description="user group -> tariff id (wins over the charger's tariff)"
    )
