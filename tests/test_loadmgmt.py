"""LoadBalancer decisions (tables, fake time) and LoadManager against a recording ChargerControl."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.errors import DeviceError
from gateway.loadmgmt import ChargerSpec, LoadBalancer, LoadManager, LoadSettings, Mode
from gateway.model import ChargerStatus, DeviceSample

C = ChargerStatus.CHARGING
SUS_EV = ChargerStatus.SUSPENDED_EV
AVAILABLE = ChargerStatus.AVAILABLE


def grid(l1: float, l2: float, l3: float, ts: float = 0.0, online: bool = True) -> DeviceSample:
    values = {"current_l1_a": l1, "current_l2_a": l2, "current_l3_a": l3} if online else {}
    return DeviceSample("grid", ts, online, values)


def charger(
    device_id: str,
    status: ChargerStatus = C,
    currents: Sequence[float] = (0.0, 0.0, 0.0),
    ts: float = 0.0,
    online: bool = True,
    power_w: float | None = None,
) -> DeviceSample:
    values: dict[str, Any] = {}
    if power_w is None:
        values = {f"current_l{i + 1}_a": a for i, a in enumerate(currents)}
    else:
        values = {"power_w": power_w}
    return DeviceSample(device_id, ts, online, values, status=status if online else None)


def balancer(
    max_a: float = 32.0,
    meter: str | None = None,
    specs: Sequence[ChargerSpec] | None = None,
    **kw: Any,
) -> LoadBalancer:
    if specs is None:
        specs = [ChargerSpec(d, step_a=0.1) for d in ("cp1", "cp2", "cp3")]
    return LoadBalancer(LoadSettings(max_a, meter, **kw), specs)


def feed(b: LoadBalancer, *samples: DeviceSample) -> None:
    for s in samples:
        b.update(s)


def settle(b: LoadBalancer, now: float) -> dict[str, float]:
    """Decide and confirm every write (a charger that accepts everything)."""
    d = b.decide(now)
    for dev, amps in d.writes.items():
        b.confirm(dev, amps, now)
    return dict(d.targets)


# -- shares ----------------------------------------------------------------------------------
SHARE_CASES = [
    # (id, max_a, specs (id, max_a, step_a), statuses, expected targets)
    (
        "equal thirds, 0.1 A steps",
        32,
        [("cp1", 32, 0.1), ("cp2", 32, 0.1), ("cp3", 32, 0.1)],
        {"cp1": C, "cp2": C, "cp3": C},
        {"cp1": 10.6, "cp2": 10.6, "cp3": 10.6},
    ),
    (
        "rounded down to whole amps",
        32,
        [("cp1", 32, 1), ("cp2", 32, 1), ("cp3", 32, 1)],
        {"cp1": C, "cp2": C, "cp3": C},
        {"cp1": 10, "cp2": 10, "cp3": 10},
    ),
    (
        "capped one frees room",
        32,
        [("cp1", 8, 1), ("cp2", 32, 1), ("cp3", 32, 1)],
        {"cp1": C, "cp2": C, "cp3": C},
        {"cp1": 8, "cp2": 12, "cp3": 12},
    ),
    (
        "all capped below budget",
        63,
        [("cp1", 16, 1), ("cp2", 16, 1), ("cp3", 16, 1)],
        {"cp1": C, "cp2": C, "cp3": C},
        {"cp1": 16, "cp2": 16, "cp3": 16},
    ),
    ("single charger gets its max", 63, [("cp1", 32, 1)], {"cp1": C}, {"cp1": 32}),
    (
        "standby EV is held at its minimum",
        32,
        [("cp1", 32, 1), ("cp2", 32, 1)],
        {"cp1": C, "cp2": SUS_EV},
        {"cp1": 26, "cp2": 6},
    ),
    (
        "idle charger is parked at its minimum, outside the budget",
        16,
        [("cp1", 32, 1), ("cp2", 32, 1)],
        {"cp1": C, "cp2": AVAILABLE},
        {"cp1": 16, "cp2": 6},
    ),
    (
        "below minimum: one pauses, the others share",
        16,
        [("cp1", 32, 1), ("cp2", 32, 1), ("cp3", 32, 1)],
        {"cp1": C, "cp2": C, "cp3": C},
        {"paused": 1, "share": 8},
    ),
    (
        "below minimum: standby pauses first",
        14,
        [("cp1", 32, 1), ("cp2", 32, 1), ("cp3", 32, 1)],
        {"cp1": C, "cp2": SUS_EV, "cp3": C},
        {"cp1": 7, "cp2": 0, "cp3": 7},
    ),
    (
        "not even one minimum: all paused",
        6.5,
        [("cp1", 32, 1), ("cp2", 32, 1)],
        {"cp1": C, "cp2": C},
        {"paused": 1, "share": 6},
    ),
]


@pytest.mark.parametrize(
    ("max_a", "specs", "statuses", "expected"),
    [c[1:] for c in SHARE_CASES],
    ids=[c[0] for c in SHARE_CASES],
)
def test_static_shares(
    max_a: float,
    specs: list[tuple[str, float, float]],
    statuses: dict[str, ChargerStatus],
    expected: dict[str, float],
) -> None:
    b = balancer(max_a, specs=[ChargerSpec(d, max_a=m, step_a=s) for d, m, s in specs])
    feed(b, *(charger(d, st) for d, st in statuses.items()))
    d = b.decide(0.0)
    assert d.mode == Mode.STATIC
    if "paused" in expected:
        running = [a for a in d.targets.values() if a > 0]
        assert len(d.paused) == expected["paused"]
        assert all(d.targets[p] == 0 for p in d.paused)
        assert running and all(a == expected["share"] for a in running)
    else:
        assert dict(d.targets) == expected
    wanting = [dev for dev, st in statuses.items() if st.plugged]
    assert sum(d.targets[dev] for dev in wanting) <= max_a


def test_metered_base_load_is_grid_minus_chargers() -> None:
    b = balancer(32, "grid", margin_a=1.0)
    # Two EVs draw 10 A on each phase; the rest of the building 5/3/1 A.
    feed(
        b,
        charger("cp1", C, (10, 10, 10)),
        charger("cp2", C, (10, 10, 10)),
        charger("cp3", AVAILABLE),
        grid(25, 23, 21),
    )
    d = b.decide(0.0)
    assert d.mode == Mode.METERED
    assert d.base_a == pytest.approx((5, 3, 1))
    assert d.available_a == pytest.approx((26, 28, 30))
    assert d.targets["cp1"] == d.targets["cp2"] == 13.0  # L1 is the tight phase
    assert d.targets["cp3"] == 6.0  # parked
    assert not d.over_limit


def test_grid_over_limit_is_flagged_and_limits_drop() -> None:
    b = balancer(32, "grid", specs=[ChargerSpec("cp1", step_a=1), ChargerSpec("cp2", step_a=1)])
    feed(b, charger("cp1", C, (32, 32, 32)), charger("cp2", C, (32, 32, 32)), grid(66, 66, 66))
    assert b.over_limit()
    d = b.decide(0.0)
    assert d.over_limit
    assert d.targets == {"cp1": 14.0, "cp2": 14.0}  # (32 - 1 margin - 2 base) / 2, floored


def test_one_phase_chargers_leave_other_phases_to_three_phase_ones() -> None:
    specs = [ChargerSpec("cp1", step_a=1), ChargerSpec("cp2", step_a=1)]
    b = balancer(32, "grid", specs=specs, margin_a=0.0)
    # cp1 charges a one-phase car on L1; the building loads L2 and L3.
    feed(b, charger("cp1", C, (10, 0, 0)), charger("cp2", C, (10, 10, 10)), grid(20, 20, 20))
    d = b.decide(0.0)
    assert d.available_a == pytest.approx((32, 22, 22))
    assert d.targets == {"cp1": 16.0, "cp2": 16.0}
    # Had cp1 been counted on three phases, both would get 11 A.
    b2 = balancer(32, "grid", specs=specs, margin_a=0.0)
    feed(b2, charger("cp1", C, (0, 0, 0)), charger("cp2", C, (10, 10, 10)), grid(10, 20, 20))
    assert b2.decide(0.0).targets == {"cp1": 11.0, "cp2": 11.0}


def test_one_phase_chargers_on_the_same_phase_share_it() -> None:
    b = balancer(24, specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2", "cp3")])
    feed(
        b, charger("cp1", C, (8, 0, 0)), charger("cp2", C, (8, 0, 0)), charger("cp3", C, (8, 8, 8))
    )
    assert b.decide(0.0).targets == {"cp1": 8.0, "cp2": 8.0, "cp3": 8.0}
    # The phases seen stay known while the car is plugged, even when it stops drawing.
    feed(b, charger("cp1", ChargerStatus.SUSPENDED_EVSE, (0, 0, 0)))
    assert b._phases("cp1") == frozenset({0})
    feed(b, charger("cp1", AVAILABLE))
    assert b._phases("cp1") == frozenset({0, 1, 2})


def test_power_only_charger_counts_a_third_per_phase() -> None:
    b = balancer(32, "grid", specs=[ChargerSpec("cp1", step_a=1)], margin_a=0.0)
    feed(b, charger("cp1", C, power_w=6900), grid(12, 12, 12))  # 10 A per phase
    d = b.decide(0.0)
    assert d.base_a == pytest.approx((2, 2, 2))
    assert d.targets == {"cp1": 30.0}


def test_uncontrolled_charger_is_a_fixed_load_in_static_mode() -> None:
    specs = [ChargerSpec("cp1", step_a=1), ChargerSpec("cp2", step_a=1, controllable=False)]
    b = balancer(32, specs=specs)
    feed(b, charger("cp1", C), charger("cp2", C, (16, 16, 16)))
    d = b.decide(0.0)
    assert d.available_a == (16, 16, 16)
    assert d.targets == {"cp1": 16.0}  # nothing is ever written to cp2


def test_uncontrolled_charger_stays_in_the_measured_base_load() -> None:
    specs = [ChargerSpec("cp1", step_a=1), ChargerSpec("cp2", step_a=1, controllable=False)]
    b = balancer(32, "grid", specs=specs, margin_a=0.0)
    feed(b, charger("cp1", C, (6, 6, 6)), charger("cp2", C, (16, 16, 16)), grid(22, 22, 22))
    d = b.decide(0.0)
    assert d.base_a == pytest.approx((16, 16, 16))
    assert d.targets == {"cp1": 16.0}


# -- the meter fails -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grid_sample", "failsafe_a", "expected"),
    [
        (grid(0, 0, 0, online=False), None, 6.0),
        (grid(5, 5, 5, ts=-100.0), None, 6.0),  # silent for 100 s: stale
        (None, None, 6.0),  # never answered since start
        (grid(0, 0, 0, online=False), 8.0, 8.0),
    ],
    ids=["offline", "stale", "never-seen", "configured-failsafe"],
)
def test_meter_lost_falls_back_to_minimum(
    grid_sample: DeviceSample | None, failsafe_a: float | None, expected: float
) -> None:
    specs = [ChargerSpec(d, step_a=1) for d in ("cp1", "cp2", "cp3")]
    b = balancer(32, "grid", specs=specs, failsafe_current_a=failsafe_a)
    feed(b, *(charger(d, C, (10, 10, 10)) for d in ("cp1", "cp2", "cp3")))
    if grid_sample is not None:
        b.update(grid_sample)
    d = b.decide(0.0)
    assert d.mode == Mode.FAILSAFE
    assert d.targets == {"cp1": expected, "cp2": expected, "cp3": expected}


def test_failsafe_still_respects_the_limit_with_many_chargers() -> None:
    specs = [ChargerSpec(d, step_a=1) for d in ("cp1", "cp2", "cp3")]
    b = balancer(16, "grid", specs=specs)
    feed(b, *(charger(d, C) for d in ("cp1", "cp2", "cp3")), grid(0, 0, 0, online=False))
    d = b.decide(0.0)
    assert sorted(d.targets.values()) == [0.0, 6.0, 6.0]


def test_meter_back_raises_only_after_the_raise_interval() -> None:
    specs = [ChargerSpec("cp1", step_a=1)]
    b = balancer(32, "grid", specs=specs, raise_every_s=10)
    feed(b, charger("cp1", C, (6, 6, 6)), grid(0, 0, 0, online=False))
    assert settle(b, 0.0) == {"cp1": 6.0}
    feed(b, grid(8, 8, 8, ts=3.0))
    d = b.decide(3.0)
    assert d.mode == Mode.METERED and d.targets == {"cp1": 29.0} and d.writes == {}
    assert b.decide(10.0).writes == {"cp1": 29.0}


# -- hysteresis ------------------------------------------------------------------------------
def test_hysteresis_small_changes_and_slow_raises() -> None:
    b = balancer(32, "grid", specs=[ChargerSpec("cp1", step_a=0.1)], margin_a=0.0)
    feed(b, charger("cp1", C, (20, 20, 20)), grid(30, 30, 30))  # base 10 -> 22 A
    assert b.decide(0.0).writes == {"cp1": 22.0}
    b.confirm("cp1", 22.0, 0.0)
    feed(b, grid(29.5, 29.5, 29.5, ts=20))  # 22.5 A: less than 1 A more
    assert b.decide(20.0).writes == {}
    feed(b, grid(25, 25, 25, ts=20))  # 27 A: 5 A more, last change 20 s ago: written
    assert b.decide(20.0).writes == {"cp1": 27.0}
    b.confirm("cp1", 27.0, 20.0)
    feed(b, grid(21, 21, 21, ts=25))  # 31 A, but only 5 s after the last change
    assert b.decide(25.0).writes == {}
    assert b.decide(29.9).writes == {}
    assert b.decide(30.0).writes == {"cp1": 31.0}
    b.confirm("cp1", 31.0, 30.0)
    feed(b, grid(30.5, 30.5, 30.5, ts=30))  # 21.5 A: lowered at once
    assert b.decide(30.5).writes == {"cp1": 21.5}
    b.confirm("cp1", 21.5, 30.5)
    feed(b, grid(30.9, 30.9, 30.9, ts=31))  # 21.1 A: 0.4 A lower, but over the limit: written
    assert b.decide(31.0).writes == {"cp1": 21.1}


def test_small_decreases_kept_while_they_fit() -> None:
    b = balancer(32, specs=[ChargerSpec(d, step_a=0.1) for d in ("cp1", "cp2")])
    feed(b, charger("cp1", C), charger("cp2", C))
    assert settle(b, 0.0) == {"cp1": 16.0, "cp2": 16.0}
    b.confirm("cp1", 15.0, 0.0)  # as if 15 A had been written last
    b.confirm("cp2", 15.0, 0.0)
    # cp1 now capped at 14.5: it may keep 15 (15 + 15 <= 32), cp2 rises to 17.5 only after 10 s.
    b.set_cap("cp1", 14.5)
    assert b.decide(1.0).writes == {}
    # Once cp2 may rise, 15 + 17.5 > 32: the small decrease goes out with it.
    assert b.decide(11.0).writes == {"cp1": 14.5, "cp2": 17.5}


def test_refresh_rewrites_unchanged_limits() -> None:
    b = balancer(32, specs=[ChargerSpec("cp1", step_a=1)], refresh_s=60)
    feed(b, charger("cp1", C))
    assert settle(b, 0.0) == {"cp1": 32.0}
    assert b.decide(30.0).writes == {}
    d = b.decide(60.0)
    assert d.writes == {"cp1": 32.0} and d.changed == {}


def test_offline_charger_gets_its_limit_again_when_back() -> None:
    b = balancer(32, specs=[ChargerSpec("cp1", step_a=1)])
    feed(b, charger("cp1", C))
    settle(b, 0.0)
    feed(b, charger("cp1", online=False))
    assert b.decide(1.0).writes == {}  # nothing is written to a silent charger
    feed(b, charger("cp1", C))
    assert b.decide(2.0).writes == {"cp1": 32.0}


def test_static_mode_reserves_the_last_limit_of_a_silent_charger() -> None:
    b = balancer(32, specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2")])
    feed(b, charger("cp1", C), charger("cp2", C))
    assert settle(b, 0.0) == {"cp1": 16.0, "cp2": 16.0}
    feed(b, charger("cp2", online=False))
    d = b.decide(20.0)
    assert d.targets == {"cp1": 16.0}  # cp2 may still draw the 16 A it was given
    assert d.writes == {}


def test_static_mode_reserves_the_maximum_of_a_charger_never_seen() -> None:
    specs = [ChargerSpec("cp1", step_a=1), ChargerSpec("cp2", max_a=20, step_a=1)]
    b = balancer(32, specs=specs)
    feed(b, charger("cp1", C))
    assert b.decide(0.0).targets == {"cp1": 12.0}


def test_unauthorized_charger_is_left_alone_and_its_share_goes_to_others() -> None:
    b = balancer(32, specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2")])
    feed(b, charger("cp1", C), charger("cp2", ChargerStatus.SUSPENDED_EVSE))
    b.set_authorized("cp2", False)
    d = b.decide(0.0)
    assert d.targets == {"cp1": 32.0}
    assert "cp2" not in d.writes


def test_paused_charger_stays_paused_without_rotation() -> None:
    b = balancer(16, specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2", "cp3")])
    feed(b, *(charger(d, C) for d in ("cp1", "cp2", "cp3")))
    first = settle(b, 0.0)
    paused = [d for d, a in first.items() if a == 0]
    assert len(paused) == 1
    for t in (100.0, 1000.0, 5000.0):
        assert settle(b, t) == first


def test_rotation_hands_the_pause_on() -> None:
    b = balancer(16, specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2", "cp3")], rotate_s=600)
    feed(b, *(charger(d, C) for d in ("cp1", "cp2", "cp3")))
    seen: set[str] = set()
    for t in range(0, 4000, 10):
        targets = settle(b, float(t))
        assert sum(targets.values()) <= 16
        assert sorted(targets.values()) in ([0.0, 8.0, 8.0], [6.0, 8.0, 8.0], [0.0, 6.0, 8.0])
        seen.update(d for d, a in targets.items() if a == 0)
    assert seen == {"cp1", "cp2", "cp3"}


# -- LoadManager -----------------------------------------------------------------------------
class Recorder:
    """A ChargerControl that records calls; ``fail`` makes one device's writes fail."""

    def __init__(self, controllable: Sequence[str] = ("cp1", "cp2", "cp3")) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.controllable = set(controllable)
        self.fail: set[str] = set()

    def can_control(self, device_id: str) -> bool:
        return device_id in self.controllable

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        self.calls.append(("enable", device_id, enabled))

    async def set_current_limit(self, device_id: str, current_a: float) -> None:
        if device_id in self.fail:
            raise DeviceError(device_id, "timeout", "no answer")
        self.calls.append(("limit", device_id, current_a))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def manager(
    max_a: float = 32.0, specs: Sequence[ChargerSpec] | None = None, **kw: Any
) -> tuple[LoadManager, Recorder, FakeClock]:
    specs = specs or [ChargerSpec(d, step_a=1) for d in ("cp1", "cp2", "cp3")]
    rec, clock = Recorder(), FakeClock()
    b = LoadBalancer(LoadSettings(max_a, "grid", **kw), specs)
    return LoadManager(None, b, rec, clock, interval_s=0.05), rec, clock


async def test_failed_write_is_retried_and_does_not_stop_the_others() -> None:
    load, rec, clock = manager()
    for d in ("cp1", "cp2", "cp3"):
        load.on_sample(charger(d, C, ts=clock.now))
    load.on_sample(grid(2, 2, 2, ts=clock.now))
    rec.fail.add("cp2")
    with capture_logs() as logs:
        await load.evaluate()
        await load.evaluate()
    assert ("limit", "cp1", 9.0) in rec.calls and ("limit", "cp3", 9.0) in rec.calls
    assert load.write_failures == 2  # retried at the next evaluation
    failed = [e for e in logs if e["event"] == "load_limit_write_failed"]
    assert len(failed) == 1  # logged once per change
    rec.fail.clear()
    await load.evaluate()
    assert ("limit", "cp2", 9.0) in rec.calls


async def test_limits_logged_only_on_change_and_lowered_first() -> None:
    load, rec, clock = manager(specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2")])
    load.on_sample(charger("cp1", C, ts=clock.now))
    load.on_sample(charger("cp2", AVAILABLE, ts=clock.now))
    load.on_sample(grid(0, 0, 0, ts=clock.now))
    with capture_logs() as logs:
        await load.evaluate()
        await load.evaluate()
        clock.now += 1
        load.on_sample(charger("cp2", C, ts=clock.now))  # a car arrives at cp2
        rec.calls.clear()
        await load.evaluate()
        # cp1 drops at once, then cp2 gets its share (a new car is not held back).
        assert rec.calls == [("limit", "cp1", 15.0), ("limit", "cp2", 15.0)]
        clock.now += 1
        load.on_sample(charger("cp2", AVAILABLE, ts=clock.now))  # and leaves again
        load.on_sample(grid(0, 0, 0, ts=clock.now))
        rec.calls.clear()
        await load.evaluate()
        assert rec.calls == [("limit", "cp2", 6.0)]  # parked; cp1 may rise only 10 s later
        clock.now += 9
        load.on_sample(grid(0, 0, 0, ts=clock.now))
        rec.calls.clear()
        await load.evaluate()
        assert rec.calls == [("limit", "cp1", 31.0)]
    changes = [e["limits"] for e in logs if e["event"] == "load_limits_changed"]
    assert changes == [
        {"cp1": 31.0, "cp2": 6.0},
        {"cp1": 15.0, "cp2": 15.0},
        {"cp2": 6.0},
        {"cp1": 31.0},
    ]


async def test_over_limit_wakes_the_loop_at_once() -> None:
    load, rec, clock = manager(specs=[ChargerSpec("cp1", step_a=1)])
    load.interval_s = 30.0
    load.on_sample(charger("cp1", C, (31, 31, 31), ts=clock.now))
    load.on_sample(grid(31, 31, 31, ts=clock.now))
    task = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(0.05)
        assert rec.calls == [("limit", "cp1", 31.0)]
        load.on_sample(grid(40, 40, 40, ts=clock.now))  # the building took 9 A more
        await asyncio.sleep(0.05)
        assert rec.calls[-1] == ("limit", "cp1", 22.0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class SlowRecorder(Recorder):
    """Limit writes that take a while, as on a busy RS-485 line."""

    async def set_current_limit(self, device_id: str, current_a: float) -> None:
        await asyncio.sleep(0.2)
        await super().set_current_limit(device_id, current_a)


async def test_wake_up_during_slow_writes_is_not_lost() -> None:
    """The loop used to clear its wake-up after evaluating: an over-limit sample that arrived
    while the limit writes were out was forgotten until the next interval (30 s here)."""
    b = LoadBalancer(LoadSettings(32.0, "grid"), [ChargerSpec("cp1", step_a=1)])
    rec, clock = SlowRecorder(), FakeClock()
    load = LoadManager(None, b, rec, clock, interval_s=30.0)
    load.on_sample(charger("cp1", C, (31, 31, 31), ts=clock.now))
    load.on_sample(grid(31, 31, 31, ts=clock.now))
    task = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(0.1)  # the first write (31 A) is under way
        assert rec.calls == []
        load.on_sample(grid(40, 40, 40, ts=clock.now))  # the building took 9 A more
        async with asyncio.timeout(2.0):
            while not rec.calls or rec.calls[-1] != ("limit", "cp1", 22.0):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert rec.calls == [("limit", "cp1", 31.0), ("limit", "cp1", 22.0)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_session_disable_is_forwarded_and_never_undone() -> None:
    load, rec, clock = manager(specs=[ChargerSpec(d, step_a=1) for d in ("cp1", "cp2")])
    load.on_sample(charger("cp1", C, ts=clock.now))
    load.on_sample(charger("cp2", C, ts=clock.now))
    load.on_sample(grid(0, 0, 0, ts=clock.now))
    await load.evaluate()
    await load.set_enabled("cp2", False)
    assert rec.calls[-1] == ("enable", "cp2", False)
    rec.calls.clear()
    for _ in range(3):
        clock.now += 20
        load.on_sample(charger("cp2", ChargerStatus.SUSPENDED_EVSE, ts=clock.now))
        load.on_sample(grid(0, 0, 0, ts=clock.now))
        await load.evaluate()
    assert all(call[1] != "cp2" for call in rec.calls)
    assert ("limit", "cp1", 31.0) in rec.calls
    # Allowed again: without an enable register the limit write itself resumes it.
    rec.calls.clear()
    await load.set_enabled("cp2", True)
    assert ("enable", "cp2", True) not in rec.calls
    assert rec.calls == [("limit", "cp1", 15.0), ("limit", "cp2", 15.0)]


async def test_enable_register_charger_gets_its_limit_before_it_is_enabled() -> None:
    specs = [ChargerSpec("cp1", step_a=1), ChargerSpec("cp2", step_a=1, enable_register=True)]
    load, rec, clock = manager(specs=specs)
    load.on_sample(charger("cp1", C, ts=clock.now))
    load.on_sample(charger("cp2", ChargerStatus.PREPARING, ts=clock.now))
    load.on_sample(grid(0, 0, 0, ts=clock.now))
    await load.set_enabled("cp2", False)
    await load.evaluate()
    rec.calls.clear()
    clock.now += 60
    load.on_sample(grid(0, 0, 0, ts=clock.now))
    await load.set_enabled("cp2", True)
    assert rec.calls == [("limit", "cp1", 15.0), ("limit", "cp2", 15.0), ("enable", "cp2", True)]


async def test_enable_fails_when_the_limit_write_fails() -> None:
    load, rec, clock = manager(specs=[ChargerSpec("cp1", step_a=1)])
    load.on_sample(charger("cp1", ChargerStatus.PREPARING, ts=clock.now))
    load.on_sample(grid(0, 0, 0, ts=clock.now))
    await load.set_enabled("cp1", False)
    rec.fail.add("cp1")
    with pytest.raises(DeviceError):
        await load.set_enabled("cp1", True)


async def test_uncontrolled_charger_calls_pass_through() -> None:
    specs = [ChargerSpec("cp1", step_a=1), ChargerSpec("cp9", controllable=False)]
    load, rec, _ = manager(specs=specs)
    await load.set_enabled("cp9", False)
    await load.set_current_limit("cp9", 10)
    assert rec.calls == [("enable", "cp9", False), ("limit", "cp9", 10)]


def test_from_config_reads_profiles_and_site_limits(
    tmp_path: Any, shipped_profiles: dict[str, Any]
) -> None:
    from gateway.config import load_config

    path = tmp_path / "site.yaml"
    path.write_text(
        """
site: {id: s1}
storage: {path: ./b.db}
devices:
  - {id: cp1, driver: webasto-next, host: 127.0.0.1, port: 1502}
  - {id: cp2, driver: keba-p30, host: 127.0.0.1, port: 1503, max_current_a: 16}
  - {id: cp3, driver: alfen-eve, host: 127.0.0.1, port: 1504}
  - {id: grid, driver: eastron-sdm630, bus: gw, unit: 2}
buses:
  - {id: gw, type: rtu-over-tcp, host: 127.0.0.1, tcp_port: 1505}
grid: {max_current_a: 40, meter: grid}
"""
    )
    config = load_config(path)
    b = LoadBalancer.from_config(config, shipped_profiles, lambda d: d != "cp3", margin_a=2.0)
    assert b.settings.max_current_a == 40 and b.settings.grid_meter == "grid"
    assert b.settings.margin_a == 2.0
    assert b.specs["cp1"] == ChargerSpec("cp1", 6, 32, 1.0, True, True, False)
    assert b.specs["cp2"] == ChargerSpec("cp2", 6, 16, 0.001, True, True, True)
    assert b.specs["cp3"].controllable is False and b.specs["cp3"].step_a == 0.1
    assert set(b.specs) == {"cp1", "cp2", "cp3"}


def test_no_raise_while_a_draw_change_may_not_be_in_the_meter_yet() -> None:
    b = balancer(32, "grid", specs=[ChargerSpec("cp1", step_a=1)], margin_a=0.0)
    feed(b, charger("cp1", C, (0, 0, 0), ts=0.0), grid(4, 4, 4, ts=0.1))
    assert settle(b, 0.1) == {"cp1": 28.0}
    b.confirm("cp1", 6.0, 0.1)  # as if it had been parked at 6 A
    # cp1's car starts (6 A) at the next poll; the meter still shows the old figure.
    feed(b, charger("cp1", C, (6, 6, 6), ts=20.0), grid(4, 4, 4, ts=20.1))
    d = b.decide(20.1)
    assert d.settling and d.writes == {}  # base looks like 0: no raise on that
    feed(b, charger("cp1", C, (6, 6, 6), ts=20.2), grid(10, 10, 10, ts=20.3))
    d = b.decide(20.3)
    assert not d.settling and d.base_a == pytest.approx((4, 4, 4))
    assert d.writes == {"cp1": 28.0}
    # A charger sample newer than the meter's is not matched with it.
    feed(b, charger("cp1", C, (20, 20, 20), ts=21.0))
    assert b.decide(20.5).base_a == pytest.approx((4, 4, 4))
