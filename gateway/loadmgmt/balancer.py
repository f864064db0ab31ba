"""The balancer: which current limit each charger gets, decided from samples (no I/O).

The rule, per phase (a limit applies to every phase a charger draws from)::

    base      = grid current - what the controllable chargers draw (measured)
    available = max_current_a - margin_a - base
    limits    = max-min fair share of ``available`` among the chargers that want current,
                each capped at its maximum; what a capped charger does not use goes to the others
    a share below a charger's minimum pauses that charger (limit 0) instead

Without a grid meter the base is the measured draw of the chargers the gateway cannot control
(a static budget). With a grid meter that is offline or silent, nobody knows the base load: every
charger gets its minimum (or ``failsafe_current_a``), never more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.model import ChargerStatus, DeviceKind, DeviceSample

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.profiles import Profile

__all__ = ["ChargerSpec", "Decision", "LoadBalancer", "LoadSettings", "Mode"]

PHASES = (0, 1, 2)
ALL_PHASES = frozenset(PHASES)
VOLTAGE_V = 230.0
_EPS = 1e-6
_RECENT = 4  # charger samples kept to match the grid meter's sample time

# Statuses whose EV wants current now (or as soon as it gets some).
_DEMANDING = frozenset(
    {ChargerStatus.CHARGING, ChargerStatus.SUSPENDED_EVSE, ChargerStatus.PREPARING}
)
# Plugged in but the EV does not draw (full, paused by the car): held at the minimum so it can
# resume, and the first to be paused when there is not enough for everyone.
_STANDBY = frozenset({ChargerStatus.SUSPENDED_EV, ChargerStatus.FINISHING})


class Mode:
    """How the available current was found."""

    METERED = "metered"  # grid meter online: base load measured
    STATIC = "static"  # no grid meter configured: max_current_a is the chargers' budget
    FAILSAFE = "failsafe"  # grid meter configured but offline or silent


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """Tuning of the balancer. Only ``max_current_a`` and ``grid_meter`` come from the site
    config (``grid:``); the rest are defaults that suit chargers polled every 1-5 s."""

    max_current_a: float  # per phase, the connection's limit
    grid_meter: str | None = None
    margin_a: float = 1.0  # kept free below the limit when the base load is measured
    min_change_a: float = 1.0  # smaller changes of a limit are not written
    raise_every_s: float = 10.0  # a charger's limit rises at most this often
    meter_stale_s: float = 15.0  # a grid meter silent this long counts as offline
    failsafe_current_a: float | None = None  # per charger while the meter is out; None: its min
    rotate_s: float | None = None  # paused and running chargers swap after this long; None: never
    refresh_s: float | None = 60.0  # rewrite unchanged limits this often (a charger may reboot)
    phase_threshold_a: float = 1.0  # a phase drawing less than this is not used by the charger
    settle_s: float = 1.0  # no raise while a charger's draw changed this recently (meters lag)


@dataclass(frozen=True, slots=True)
class ChargerSpec:
    """One charger as the balancer sees it."""

    device_id: str
    min_a: float = 6.0
    max_a: float = 32.0  # the smaller of the profile's maximum and the site wiring limit
    step_a: float = 0.1  # resolution of the limit register: limits are rounded down to it
    controllable: bool = True  # the gateway can write its current limit
    can_pause: bool = True  # a limit of 0 stops it (the profile has a disable value)
    enable_register: bool = False  # it has an enable control separate from its current limit

    @classmethod
    def from_profile(
        cls, device_id: str, profile: Profile, site_max_a: float | None, controllable: bool
    ) -> ChargerSpec:
        cl = profile.current_limit
        if cl is None:
            top = 32.0 if site_max_a is None else site_max_a
            return cls(device_id, max_a=top, controllable=False)
        top = cl.max_a if site_max_a is None else min(cl.max_a, site_max_a)
        return cls(
            device_id,
            min_a=cl.min_a,
            max_a=top,
            step_a=cl.step_a,
            controllable=controllable,
            # A limit of 0 pauses it: the engine writes the disable value, or switches the
            # enable control off where that is the profile's pause method.
            can_pause=cl.disable is not None or profile.pause_method == "enable",
            enable_register=profile.pause_method == "enable",
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """One evaluation of the balancer."""

    mode: str
    targets: Mapping[str, float]  # every managed charger's limit now (0 = paused)
    writes: Mapping[str, float]  # what to write now (changed, first seen, or due a refresh)
    changed: Mapping[str, float]  # the writes whose value differs from the last one written
    available_a: tuple[float, float, float]  # per phase, for the managed chargers
    grid_a: tuple[float, float, float] | None = None  # measured, when the meter is online
    base_a: tuple[float, float, float] | None = None  # grid minus the managed chargers' draw
    over_limit: bool = False  # the grid meter shows a phase above the limit in force
    paused: tuple[str, ...] = ()  # chargers that want current but got none
    settling: bool = False  # a draw just changed: the meter may not show it yet, no raises


@dataclass(slots=True)
class _ChargerState:
    sample: DeviceSample | None = None
    recent: list[DeviceSample] = field(default_factory=list)  # last online samples, oldest first
    phases: frozenset[int] | None = None  # phases seen drawing during this plug-in
    authorized: bool = True  # the session manager has not disabled it
    cap_a: float | None = None  # a limit asked for by someone else (set_current_limit)
    applied_a: float | None = None  # last limit written successfully; None: unknown
    held_a: float | None = None  # last limit written, kept while the charger is silent
    applied_at: float = -math.inf  # when it was written
    changed_at: float = -math.inf  # when the value last changed
    running: bool = False  # its last target was > 0
    wanted: bool = False  # it had a share (car wanting current) in the last decision
    since: float = 0.0  # when ``running`` last flipped


class LoadBalancer:
    """Pure decision logic; feed it samples with :meth:`update`, ask with :meth:`decide`, and
    report successful writes with :meth:`confirm`."""

    def __init__(self, settings: LoadSettings, chargers: Iterable[ChargerSpec]) -> None:
        self.settings = settings
        self.specs: dict[str, ChargerSpec] = {c.device_id: c for c in chargers}
        self._state: dict[str, _ChargerState] = {d: _ChargerState() for d in self.specs}
        self._grid: DeviceSample | None = None
        # The limit in force: the connection's, or lower when the grid operator asks (see
        # gateway/gridlimit.py); per-charger caps asked for by the grid operator.
        self.limit_a = settings.max_current_a
        self._grid_caps: dict[str, float] = {}

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        profiles: Mapping[str, Profile],
        can_control: Callable[[str], bool],
        **tuning: float | None,
    ) -> LoadBalancer:
        """Balancer for a site config (``grid.max_current_a`` must be set); ``tuning`` overrides
        the :class:`LoadSettings` defaults (``margin_a=...``)."""
        grid = config.grid
        if grid is None or grid.max_current_a is None:
            raise ValueError("load management needs grid.max_current_a")
        specs = [
            ChargerSpec.from_profile(
                dev.id,
                profiles[dev.driver],
                dev.max_current_a,
                can_control(dev.id) and profiles[dev.driver].current_limit is not None,
            )
            for dev in config.devices
            if profiles[dev.driver].kind is DeviceKind.CHARGER
        ]
        settings = LoadSettings(grid.max_current_a, grid.meter, **tuning)  # type: ignore[arg-type]
        return cls(settings, specs)

    # -- inputs ------------------------------------------------------------------------------
    def update(self, sample: DeviceSample) -> None:
        """Keep ``sample`` if it is the grid meter's or a charger's (others are ignored)."""
        if sample.device_id == self.settings.grid_meter:
            self._grid = sample
            return
        st = self._state.get(sample.device_id)
        if st is None:
            return
        st.sample = sample
        if sample.online:
            st.recent = [*st.recent[-(_RECENT - 1) :], sample]
        if not sample.online:
            # It may reboot with its own default limit: write ours again once it answers.
            st.applied_a = None
            return
        if sample.status is not None and not sample.status.plugged:
            st.phases = None  # the next EV may use other phases
        seen = self._phases_drawing(sample)
        if seen:
            st.phases = seen if st.phases is None else st.phases | seen

    def set_authorized(self, device_id: str, authorized: bool) -> None:
        """The session manager allowed (True) or stopped (False) charging on ``device_id``."""
        st = self._state.get(device_id)
        if st is None:
            return
        if authorized and not st.authorized:
            st.changed_at = -math.inf  # a new authorization is not held back by the raise timer
        st.authorized = authorized

    def set_cap(self, device_id: str, cap_a: float | None) -> None:
        """An extra upper bound for one charger (None removes it)."""
        if device_id in self._state:
            self._state[device_id].cap_a = cap_a

    def set_grid_limit(self, site_a: float | None, caps: Mapping[str, float] | None = None) -> None:
        """A lower site limit per phase (None: the connection's ``max_current_a``) and per-charger
        caps, both asked for by the grid operator; never above the connection's limit."""
        top = self.settings.max_current_a
        self.limit_a = top if site_a is None else max(0.0, min(top, site_a))
        self._grid_caps = {d: max(0.0, a) for d, a in (caps or {}).items() if d in self.specs}

    def confirm(self, device_id: str, limit_a: float, now: float) -> None:
        """``limit_a`` was written to ``device_id`` at ``now``."""
        st = self._state.get(device_id)
        if st is None:
            return
        if st.applied_a is None or abs(st.applied_a - limit_a) > _EPS:
            st.changed_at = now
        st.applied_a = limit_a
        st.held_a = limit_a
        st.applied_at = now

    def forget(self, device_id: str) -> None:
        """The limit on the device is no longer known (a write failed half-way, a reboot)."""
        if device_id in self._state:
            self._state[device_id].applied_a = None

    def applied(self, device_id: str) -> float | None:
        st = self._state.get(device_id)
        return None if st is None else st.applied_a

    def status(self, device_id: str) -> ChargerStatus | None:
        """The charger's status in its latest sample."""
        st = self._state.get(device_id)
        return None if st is None or st.sample is None else st.sample.status

    def explain(self, device_id: str, decision: Decision | None) -> tuple[str, str]:
        """Why ``device_id`` has the limit it has, as (reason code, sentence) for people:
        ``not_managed`` | ``not_controllable`` | ``session_disabled`` | ``failsafe`` |
        ``load_paused`` | ``grid_capped`` | ``capped`` | ``charger_max`` | ``idle_minimum`` |
        ``load_share`` |
        ``pending``."""
        spec = self.specs.get(device_id)
        st = self._state.get(device_id)
        if spec is None or st is None:
            return "not_managed", "not under load management"
        if not spec.controllable:
            return "not_controllable", "the gateway cannot write its current limit"
        if not st.authorized:
            return "session_disabled", "stopped by the gateway: no authorized session"
        if decision is None or device_id not in decision.targets:
            return "pending", "waiting for the first load-management decision"
        target = decision.targets[device_id]
        limit = f"the site limit of {self.limit_a:g} A"
        if self.limit_a < self.settings.max_current_a - _EPS:
            limit = f"the grid's limit of {self.limit_a:g} A"
        if device_id in decision.paused:
            return (
                "load_paused",
                f"paused: {limit} leaves less than its minimum {spec.min_a:g} A",
            )
        if decision.mode == Mode.FAILSAFE:
            return "failsafe", "grid meter offline or silent: held at the failsafe current"
        if not st.wanted:
            return "idle_minimum", f"no car wants current: parked at its minimum {spec.min_a:g} A"
        grid_cap = self._grid_caps.get(device_id)
        if grid_cap is not None and target >= grid_cap - _EPS and target < spec.max_a - _EPS:
            return "grid_capped", f"capped at {grid_cap:g} A by the grid operator"
        if st.cap_a is not None and target >= st.cap_a - _EPS:
            return "capped", f"capped at {st.cap_a:g} A by a limit request"
        if target >= spec.max_a - spec.step_a - _EPS:
            return "charger_max", f"its maximum of {spec.max_a:g} A (the site has room)"
        avail = ", ".join(f"{a:.1f}" for a in decision.available_a)
        return (
            "load_share",
            f"its share of {limit} ({avail} A per phase available)",
        )

    @property
    def grid_sample(self) -> DeviceSample | None:
        """The latest sample of the grid meter (None until it was first polled)."""
        return self._grid

    def over_limit(self) -> bool:
        """The latest grid sample shows a phase above ``max_current_a``."""
        grid = self._grid_currents(self._grid)
        return grid is not None and max(grid) > self.limit_a + _EPS

    # -- the decision ------------------------------------------------------------------------
    def decide(self, now: float) -> Decision:
        s = self.settings
        managed = [d for d, spec in self.specs.items() if spec.controllable]
        online = {d for d in managed if self._online(d)}
        grid = None
        if s.grid_meter is None:
            mode = Mode.STATIC
        else:
            sample = self._grid
            fresh = sample is not None and sample.online and now - sample.ts <= s.meter_stale_s
            grid = self._grid_currents(sample) if fresh else None
            mode = Mode.METERED if grid is not None else Mode.FAILSAFE

        base: tuple[float, float, float] | None = None
        settling = False
        if mode == Mode.METERED:
            assert grid is not None
            drawn = [0.0, 0.0, 0.0]
            assert sample is not None
            settling = any(self._draw_changed(d, sample.ts) for d in online)
            for d in online:
                for p, amps in enumerate(self._charger_currents(d, at=sample.ts)):
                    drawn[p] += amps
            # Clamped at 0: charger and meter samples are still not taken at the same instant.
            base = (
                max(0.0, grid[0] - drawn[0]),
                max(0.0, grid[1] - drawn[1]),
                max(0.0, grid[2] - drawn[2]),
            )
            avail = [self.limit_a - s.margin_a - base[p] for p in PHASES]
        else:
            avail = [self.limit_a] * 3
            for d, spec in self.specs.items():
                if spec.controllable and d in online:
                    continue
                # Chargers we do not steer are fixed loads: their measured draw. A managed
                # charger that is silent may draw what it was last given (its maximum if it
                # never got a limit from us).
                st = self._state[d]
                for p, amps in enumerate(self._charger_currents(d)):
                    if spec.controllable and p in self._phases(d):
                        amps = max(amps, spec.max_a if st.held_a is None else st.held_a)
                    avail[p] -= amps

        wanting: dict[str, float] = {}  # charger -> its own ceiling
        standby: set[str] = set()
        idle: list[str] = []
        for d in sorted(online):
            spec, st = self.specs[d], self._state[d]
            if not st.authorized:
                continue  # the session manager stopped it: not ours to touch
            status = st.sample.status if st.sample is not None else None
            top = spec.max_a if st.cap_a is None else min(spec.max_a, st.cap_a)
            if d in self._grid_caps:
                top = min(top, self._grid_caps[d])
            if mode == Mode.FAILSAFE:
                top = min(top, s.failsafe_current_a if s.failsafe_current_a else spec.min_a)
            if status in _DEMANDING:
                wanting[d] = top
            elif status in _STANDBY:
                wanting[d] = min(top, spec.min_a)
                standby.add(d)
            else:
                idle.append(d)

        for d, st in self._state.items():
            wants = d in wanting
            if wants and not st.wanted:
                # A car arrived: its parked limit was no load decision, nothing to calm down.
                st.changed_at = -math.inf
            st.wanted = wants
        targets, paused = self._share(wanting, standby, avail, now)
        for d in idle:
            # Parked at its minimum: a car plugged in next starts small until the next decision.
            targets[d] = self._floor(self.specs[d].min_a, self.specs[d].step_a)
        for d in sorted(targets):
            st = self._state[d]
            running = targets[d] > 0
            if running != st.running:
                st.running, st.since = running, now

        writes = self._hysteresis(targets, avail, now, allow_raise=not settling)
        changed = {d: a for d, a in writes.items() if not _same(self._state[d].applied_a, a)}
        over = grid is not None and max(grid) > self.limit_a + _EPS
        return Decision(
            mode=mode,
            targets=targets,
            writes=writes,
            changed=changed,
            available_a=(avail[0], avail[1], avail[2]),
            grid_a=grid,
            base_a=base,
            over_limit=over,
            paused=tuple(sorted(paused)),
            settling=settling,
        )

    def _share(
        self, wanting: dict[str, float], standby: set[str], avail: list[float], now: float
    ) -> tuple[dict[str, float], set[str]]:
        """Max-min fair shares; chargers whose share is below their minimum are paused one at a
        time (the least entitled first) until every remaining share is legal."""
        candidates = dict(wanting)
        paused: set[str] = set()
        while True:
            shares = _fill(avail, {d: (self._phases(d), top) for d, top in candidates.items()})
            targets = {d: self._floor(a, self.specs[d].step_a) for d, a in shares.items()}
            short = [d for d, a in targets.items() if a < self.specs[d].min_a - _EPS]
            victims = [d for d in short if self.specs[d].can_pause]
            if not victims:
                for d in short:  # cannot be paused by a limit: it keeps its minimum
                    targets[d] = self.specs[d].min_a
                break
            victim = min(victims, key=lambda d: self._entitlement(d, d in standby, now))
            paused.add(victim)
            del candidates[victim]
        for d in paused:
            targets[d] = 0.0
        return targets, paused

    def _entitlement(
        self, device_id: str, standby: bool, now: float
    ) -> tuple[int, int, float, str]:
        """Sort key: the smallest is paused first. Standby chargers first; then, with
        rotation, chargers that ran longer than ``rotate_s`` before those that waited that long;
        otherwise whoever is paused stays paused (no flapping)."""
        st = self._state[device_id]
        held = now - st.since
        rotate = self.settings.rotate_s
        if st.running:
            rank = 1 if rotate is not None and held >= rotate else 3
        else:
            rank = 2 if rotate is not None and held >= rotate else 0
        # Among equals: the one that has run longest (or waited least) yields.
        return (0 if standby else 1, rank, -held if st.running else held, device_id)

    def _hysteresis(
        self, targets: dict[str, float], avail: list[float], now: float, *, allow_raise: bool
    ) -> dict[str, float]:
        s = self.settings
        out: dict[str, float] = {}
        for d, target in targets.items():
            st = self._state[d]
            prev = st.applied_a
            if prev is None:
                out[d] = target
            elif target < prev - _EPS:
                small = prev - target < s.min_change_a and target > 0
                out[d] = prev if small else target
            elif target > prev + _EPS:
                worth = prev <= 0 or target - prev >= s.min_change_a
                due = allow_raise and now - st.changed_at >= s.raise_every_s
                out[d] = target if worth and due else prev
            else:
                out[d] = prev
        # A kept small decrease must not push a phase over: then every decrease is written.
        load = [0.0, 0.0, 0.0]
        for d, amps in out.items():
            if d in targets and self._wants(d):
                for p in self._phases(d):
                    load[p] += amps
        if any(load[p] > avail[p] + _EPS for p in PHASES):
            for d, target in targets.items():
                if target < out[d]:
                    out[d] = target
        writes: dict[str, float] = {}
        for d, amps in out.items():
            st = self._state[d]
            stale = s.refresh_s is not None and now - st.applied_at >= s.refresh_s
            if not _same(st.applied_a, amps) or stale:
                writes[d] = amps
        return writes

    # -- helpers -----------------------------------------------------------------------------
    def _online(self, device_id: str) -> bool:
        st = self._state[device_id]
        return st.sample is not None and st.sample.online

    def _wants(self, device_id: str) -> bool:
        st = self._state[device_id]
        status = st.sample.status if st.sample is not None else None
        return status in _DEMANDING or status in _STANDBY

    def _phases(self, device_id: str) -> frozenset[int]:
        """Phases the charger draws from; all three until seen (the safe assumption)."""
        return self._state[device_id].phases or ALL_PHASES

    def _phases_drawing(self, sample: DeviceSample) -> frozenset[int]:
        currents = [sample.number(f"current_l{p + 1}_a") for p in PHASES]
        if any(c is None for c in currents):
            return frozenset()
        top = max(c or 0.0 for c in currents)
        if top < self.settings.phase_threshold_a:
            return frozenset()
        floor = max(self.settings.phase_threshold_a, 0.2 * top)
        return frozenset(p for p, c in enumerate(currents) if (c or 0.0) >= floor)

    def _charger_currents(
        self, device_id: str, at: float | None = None
    ) -> tuple[float, float, float]:
        """Measured per-phase draw; with ``at``, from the last sample taken no later than ``at``
        (the grid meter's sample time: a car that just started is not subtracted from a grid
        reading taken before it did). From power alone the draw is spread over three phases (the
        smallest per-phase figure: the base load is then over-, never under-estimated)."""
        st = self._state[device_id]
        sample = st.sample
        if sample is None or not sample.online:
            return (0.0, 0.0, 0.0)
        if at is not None and st.recent:
            older = [r for r in st.recent if r.ts <= at] or st.recent[:1]
            sample = older[-1]
        return self._sample_currents(sample)

    def _draw_changed(self, device_id: str, at: float) -> bool:
        """The charger's draw moved by ``min_change_a`` or more between its last two polls
        before ``at``, less than ``settle_s`` before it: the meter may not show it yet."""
        older = [r for r in self._state[device_id].recent if r.ts <= at]
        if len(older) < 2 or older[-1].ts < at - self.settings.settle_s:
            return False
        a, b = self._sample_currents(older[-2]), self._sample_currents(older[-1])
        return any(abs(a[p] - b[p]) >= self.settings.min_change_a for p in PHASES)

    @staticmethod
    def _sample_currents(sample: DeviceSample) -> tuple[float, float, float]:
        currents = [sample.number(f"current_l{p + 1}_a") for p in PHASES]
        if all(c is not None for c in currents):
            return (
                max(0.0, currents[0] or 0.0),
                max(0.0, currents[1] or 0.0),
                max(0.0, currents[2] or 0.0),
            )
        power = sample.power_w
        if power is not None and power > 0:
            each = power / VOLTAGE_V / 3
            return (each, each, each)
        return (0.0, 0.0, 0.0)

    @staticmethod
    def _grid_currents(sample: DeviceSample | None) -> tuple[float, float, float] | None:
        """Per-phase current of the connection. Missing phases take the largest known one;
        a meter with power only counts all of it on every phase (worst case)."""
        if sample is None or not sample.online:
            return None
        currents = [sample.number(f"current_l{p + 1}_a") for p in PHASES]
        known = [abs(c) for c in currents if c is not None]
        if known:
            worst = max(known)
            c0, c1, c2 = (abs(c) if c is not None else worst for c in currents)
            return (c0, c1, c2)
        power = sample.power_w
        if power is None:
            return None
        each = abs(power) / VOLTAGE_V
        return (each, each, each)

    @staticmethod
    def _floor(amps: float, step_a: float) -> float:
        if amps <= 0:
            return 0.0
        steps = math.floor(amps / step_a + 1e-9)
        return round(steps * step_a, 6)


def _same(applied_a: float | None, amps: float) -> bool:
    return applied_a is not None and abs(applied_a - amps) <= _EPS


def _fill(
    avail: Sequence[float], demands: Mapping[str, tuple[frozenset[int], float]]
) -> dict[str, float]:
    """Progressive filling: raise one common level for every charger until a phase is full
    (its chargers stop there) or a charger reaches its ceiling (its share is freed for the
    others). Gives the max-min fair allocation over per-phase capacities."""
    cap = [float(a) for a in avail]
    open_ = dict(demands)
    alloc: dict[str, float] = {}
    while open_:
        counts = [sum(1 for phases, _ in open_.values() if p in phases) for p in PHASES]
        level = max(0.0, min(cap[p] / counts[p] for p in PHASES if counts[p]))
        capped = [d for d, (_, top) in open_.items() if top <= level + _EPS]
        if capped:
            fixed = {d: open_[d][1] for d in capped}
        else:
            full = {p for p in PHASES if counts[p] and cap[p] / counts[p] <= level + _EPS}
            fixed = {d: level for d, (phases, _) in open_.items() if phases & full}
        for d, amps in fixed.items():
            alloc[d] = max(0.0, amps)
            for p in open_[d][0]:
                cap[p] -= alloc[d]
            del open_[d]
    return alloc
