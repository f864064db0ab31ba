"""Tariff evaluation is bounded (MAX_ELEMENTS) and runs off the event loop: pricing a day-long
session against the largest tariff allowed leaves the loop responsive (it used to block it for
the whole evaluation, ~1 s here, while devices went unpolled)."""

from __future__ import annotations

import asyncio
import time

from gateway.billing.cost import make_pricer, off_the_loop
from gateway.billing.tariff import MAX_ELEMENTS
from gateway.model import MeterPoint

T0 = 1_790_000_000.0


def _largest_tariff() -> dict[str, object]:
    """MAX_ELEMENTS elements, all but the last restricted to a 14-minute window of the day."""
    elements: list[dict[str, object]] = []
    for i in range(MAX_ELEMENTS - 1):
        h, m = divmod(i * 14, 60)
        h2, m2 = divmod(i * 14 + 14, 60)
        elements.append(
            {
                "components": [{"type": "energy", "price": f"0.{10 + i % 80:02d}"}],
                "restrictions": {
                    "start_time": f"{h % 24:02d}:{m:02d}",
                    "end_time": f"{h2 % 24:02d}:{m2:02d}",
                },
            }
        )
    elements.append({"components": [{"type": "energy", "price": "0.40"}]})
    return {"currency": "EUR", "elements": elements}


async def _max_loop_gap(work: asyncio.Future[object] | asyncio.Task[object]) -> float:
    """The longest the loop went without running a 5 ms ticker while ``work`` ran."""
    gap = 0.0
    last = time.perf_counter()
    while not work.done():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        gap = max(gap, now - last)
        last = now
    await work
    return gap


async def test_a_session_day_against_the_largest_tariff_keeps_the_loop_responsive() -> None:
    tariff = _largest_tariff()
    points = [MeterPoint(T0 + 60 * i, 8 * i, True, 480.0) for i in range(1, 1441)]
    pricer = make_pricer("Europe/Berlin")
    pricer(tariff, points[:5], T0, T0 + 300)  # parsed and cached, as after the first session

    start = time.perf_counter()
    periods, cost = pricer(tariff, points, T0, T0 + 86_400)
    blocking_s = time.perf_counter() - start
    assert cost is not None and len(periods) == MAX_ELEMENTS + 1

    threaded = off_the_loop(pricer)
    task = asyncio.ensure_future(threaded(tariff, points, T0, T0 + 86_400))
    gap = await _max_loop_gap(task)
    assert task.result() == (periods, cost)  # the same answer
    # Run inline, the loop would have stood still for the whole evaluation.
    assert blocking_s > 0.1, blocking_s
    assert gap < max(0.1, blocking_s / 3), (gap, blocking_s)
