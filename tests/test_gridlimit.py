"""Which limit is in force (pure logic, a given clock), and what the balancer does with it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.gridlimit import CloudLimit, GridLimits, LimitValue, ScheduleRule
from gateway.loadmgmt import ChargerSpec, LoadBalancer, LoadSettings
from gateway.model import ChargerStatus, DeviceSample

TZ = ZoneInfo("Europe/Berlin")


def at(text: str) -> float:
    """Local Berlin time -> Unix seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=TZ).timestamp()


EVENING = ScheduleRule.from_config(
    {
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "start": "17:00",
        "end": "20:00",
        "max_current_a": 25,
        "reason": "evening peak",
    }
)
NIGHT = ScheduleRule.from_config(
    {"days": ["sat"], "start": "22:00", "end": "06:00", "max_power_w": 13_800}
)


@pytest.mark.parametrize(
    ("local", "site_a", "source"),
    [
        ("2026-06-01 16:59", 63.0, "connection"),  # Monday
        ("2026-06-01 17:00", 25.0, "schedule"),
        ("2026-06-01 19:59", 25.0, "schedule"),
        ("2026-06-01 20:00", 63.0, "connection"),
        ("2026-06-06 18:00", 63.0, "connection"),  # Saturday: not an evening-rule day
        ("2026-06-06 23:00", 20.0, "schedule"),  # 13.8 kW / (230 V x 3)
        ("2026-06-07 05:59", 20.0, "schedule"),  # Sunday morning: Saturday's night rule
        ("2026-06-07 06:00", 63.0, "connection"),
        ("2026-06-07 23:00", 63.0, "connection"),  # Sunday night: no rule
    ],
)
def test_schedule_by_local_weekday_and_time(local: str, site_a: float, source: str) -> None:
    limits = GridLimits(63.0, timezone="Europe/Berlin", schedule=[EVENING, NIGHT])
    eff = limits.effective(at(local))
    assert (round(eff.site_a, 6), eff.source) == (site_a, source)


def test_the_lowest_source_wins_and_a_cloud_limit_expires() -> None:
    limits = GridLimits(
        63.0,
        timezone="Europe/Berlin",
        schedule=[EVENING],
        signal_value=LimitValue(power_w=4_200 * 3),  # 18.26 A
        signal_reason="ripple control",
    )
    t = at("2026-06-01 18:00")
    eff = limits.effective(t)  # the relay was not read yet: when_offline 'limit' applies it
    assert eff.source == "signal" and eff.reason == "ripple control (I/O module unreadable)"
    limits.set_signal(False)
    assert limits.effective(t).source == "schedule"
    limits.set_signal(True)
    assert limits.effective(t).source == "signal" and limits.effective(t).signal is True
    limits.set_cloud(CloudLimit("site", LimitValue(10), t + 60, "test", "r1", t))
    limits.set_cloud(CloudLimit("cp1", LimitValue(6), None, None, "r2", t))
    eff = limits.effective(t)
    assert (eff.site_a, eff.source, eff.reason, eff.expires_at) == (10, "cloud", "test", t + 60)
    assert dict(eff.chargers) == {"cp1": 6}
    assert limits.expire(t + 59) == []
    assert [c.request_id for c in limits.expire(t + 60)] == ["r1"]
    assert limits.effective(t + 60).source == "signal"
    # A source can only lower the connection's limit.
    limits.set_cloud(CloudLimit("site", LimitValue(100), None, None, "r3", t))
    assert limits.effective(t + 61).site_a == pytest.approx(18.26, abs=0.01)
    limits.clear_cloud("cp1")
    assert limits.effective(t + 61).chargers == {}


def test_ties_name_the_grid_operator_and_cloud_limits_survive_a_restart() -> None:
    limits = GridLimits(32.0, signal_value=LimitValue(32.0), signal_when_offline="ignore")
    assert limits.effective(0).source == "connection"  # unread relay ignored by policy
    limits.set_cloud(CloudLimit("site", LimitValue(32.0), 500.0, "same", "r1", 0.0))
    assert limits.effective(1).source == "cloud"
    again = GridLimits(32.0)
    again.load([c.to_json() for c in limits.cloud_limits()])
    assert again.cloud_limits() == limits.cloud_limits()


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"max_current_a": 1, "max_power_w": 2},
        {"max_current_a": -1},
        {"max_power_w": float("nan")},
    ],
)
def test_a_limit_is_one_number(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LimitValue.from_mapping(bad)


def _sample(device: str, ts: float, amps: float, status: ChargerStatus | None) -> DeviceSample:
    values = {f"current_l{p}_a": amps for p in (1, 2, 3)}
    return DeviceSample(device, ts, True, values, status=status)


def test_the_balancer_shares_the_lower_limit_and_honours_a_charger_cap() -> None:
    balancer = LoadBalancer(
        LoadSettings(max_current_a=32.0, margin_a=0.0, raise_every_s=0.0),
        [ChargerSpec("cp1", step_a=1.0), ChargerSpec("cp2", step_a=1.0)],
    )
    for d in ("cp1", "cp2"):
        balancer.update(_sample(d, 0.0, 16.0, ChargerStatus.CHARGING))
    assert dict(balancer.decide(1.0).targets) == {"cp1": 16.0, "cp2": 16.0}
    balancer.set_grid_limit(20.0)
    decision = balancer.decide(2.0)
    assert dict(decision.targets) == {"cp1": 10.0, "cp2": 10.0}
    assert decision.available_a == (20.0, 20.0, 20.0)
    balancer.set_grid_limit(20.0, {"cp1": 6.0})
    assert dict(balancer.decide(3.0).targets) == {"cp1": 6.0, "cp2": 14.0}
    balancer.set_grid_limit(11.0)  # not enough for two minimums: one is paused, one gets all
    decision = balancer.decide(4.0)
    assert sorted(decision.targets.values()) == [0.0, 11.0] and len(decision.paused) == 1
    balancer.set_grid_limit(99.0)  # never above the connection
    assert balancer.limit_a == 32.0


def test_config_errors_name_the_line_and_key(tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.errors import ConfigError

    path = tmp_path / "site.yaml"
    path.write_text(
        "site: {id: s1, timezone: Europe/Berlin}\n"
        "storage: {path: ./b.db}\n"
        "devices: [{id: cp1, driver: abb-terra-ac, host: 127.0.0.1}]\n"
        "grid:\n"
        "  schedule:\n"
        '    - {start: "25:00", end: "20:00", max_current_a: 20}\n'
        '    - {start: "22:00", end: "06:00", max_current_a: 20, max_power_w: 3}\n'
        "  signal: {host: 10.0.0.5, bus: rs9, address: 0, max_power_w: 4200, table: relay}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for line in (
        f"{path}:6:5: grid.schedule: needs grid.max_current_a (the limit it lowers)",
        f"{path}:6:15: grid.schedule[0].start: must be HH:MM (local time), got '25:00'",
        f"{path}:7:7: grid.schedule[1]: needs max_current_a or max_power_w (one of them)",
        f"{path}:8:11: grid.signal: needs host (Modbus TCP) or bus (RS-485), not both",
        f"{path}:8:76: grid.signal.table: must be one of discrete, coil, input, holding; "
        "got 'relay'",
    ):
        assert line in text, text


def test_a_good_config_builds_the_sources(tmp_path: Path) -> None:
    from gateway.config import load_config

    path = tmp_path / "site.yaml"
    path.write_text(
        "site: {id: s1, timezone: Europe/Berlin}\n"
        "storage: {path: ./b.db}\n"
        "devices: [{id: cp1, driver: abb-terra-ac, host: 127.0.0.1}]\n"
        "grid:\n"
        "  max_current_a: 63\n"
        "  schedule: [{days: [sat], start: '22:00', end: '06:00', max_power_w: 13800}]\n"
        "  signal: {host: 10.0.0.5, address: 3, max_current_a: 16, when_offline: ignore}\n"
    )
    config = load_config(path)
    assert config.grid is not None
    limits = GridLimits.from_config(config.grid, config.site.timezone)
    assert limits.schedule == (NIGHT,)
    assert limits.signal_value == LimitValue(16.0) and limits.signal_when_offline == "ignore"
    assert limits.effective(at("2026-06-06 23:30")).site_a == pytest.approx(20.0)
    limits.set_signal(True)
    assert limits.effective(at("2026-06-06 23:30")).source == "signal"
