"""Why a charger has the limit it has (``LoadBalancer.explain``), as the status page and
/api/status say it: one case per reason, on the balancer's own decisions (pure logic)."""

from __future__ import annotations

from test_loadmgmt import AVAILABLE, C, balancer, charger, feed, grid, settle

from gateway.loadmgmt import ChargerSpec


def test_share_maximum_idle_and_disabled() -> None:
    b = balancer(max_a=32.0, meter="grid")
    feed(
        b,
        grid(0, 0, 0, ts=100.0),
        charger("cp1", ts=100.0),
        charger("cp2", ts=100.0),
        charger("cp3", AVAILABLE, ts=100.0),
    )
    settle(b, 100.0)
    d = b.decide(100.0)
    code, why = b.explain("cp1", d)
    assert code == "load_share" and "share of the site limit of 32 A" in why
    assert b.explain("cp3", d)[0] == "idle_minimum"
    b.set_authorized("cp2", False)
    assert b.explain("cp2", b.decide(101.0)) == (
        "session_disabled",
        "stopped by the gateway: no authorized session",
    )
    assert b.explain("nope", d)[0] == "not_managed"
    assert b.explain("cp1", None)[0] == "pending"


def test_paused_when_the_site_limit_leaves_less_than_the_minimum() -> None:
    b = balancer(max_a=10.0)  # no grid meter: a static budget of 10 A for three chargers
    feed(b, charger("cp1"), charger("cp2"), charger("cp3"))
    settle(b, 100.0)
    d = b.decide(100.0)
    assert d.paused
    code, why = b.explain(d.paused[0], d)
    assert code == "load_paused"
    assert why == "paused: the site limit of 10 A leaves less than its minimum 6 A"


def test_maximum_failsafe_and_not_controllable() -> None:
    specs = [ChargerSpec("cp1", max_a=16.0, step_a=0.1), ChargerSpec("cp2", controllable=False)]
    b = balancer(max_a=63.0, meter="grid", specs=specs)
    feed(b, grid(1, 1, 1, ts=100.0), charger("cp1", C, ts=100.0), charger("cp2", ts=100.0))
    settle(b, 100.0)
    d = b.decide(100.0)
    assert b.explain("cp1", d)[0] == "charger_max"
    assert b.explain("cp2", d)[0] == "not_controllable"
    silent = b.decide(100.0 + 60)  # the grid meter has said nothing for a minute
    assert silent.mode == "failsafe"
    assert b.explain("cp1", silent)[0] == "failsafe"
