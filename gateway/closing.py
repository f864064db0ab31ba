"""One base for resources used as ``async with Resource(...) as r``: entering gives the object
itself, leaving (normally, on an error or on cancellation) awaits its ``close()``."""

from __future__ import annotations

from typing import Self

__all__ = ["AsyncClosing"]


class AsyncClosing:
    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
