"""From a checked profile file (:class:`~gateway.profiles.fields.ProfileFile`) to a
:class:`~gateway.profiles.spec.Profile`, with the rules between sections: register names and
references, which sections a meter or charger has, state rules against register types, pause
methods, and simulated values that must encode and classify as the status they show. Every
problem is added to the document with its position."""

from __future__ import annotations

import functools
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from gateway.modbus.codec import CodecError, decode, encode
from gateway.modbus.types import RegisterSpec, Table
from gateway.model import ChargerStatus, DeviceKind
from gateway.profiles.fields import ConditionIn, ControlIn, ProfileFile, RegisterIn
from gateway.profiles.spec import (
    Condition,
    ConnectionSpec,
    ControlSpec,
    CurrentLimitSpec,
    HeartbeatSpec,
    IdentifySpec,
    OnConnectWrite,
    Profile,
    StateRule,
    StateSpec,
    TagSpec,
)
from gateway.schema import to_spec
from gateway.tags import normalise_tag
from gateway.yamlpos import YamlDoc

__all__ = ["build_profile", "check_valid_parts"]

PathT = tuple[str | int, ...]
Values = dict[str, int | float | str]


def build_profile(doc: YamlDoc, data: ProfileFile, stem: str) -> Profile | None:
    """The profile, or None after adding its problems to ``doc``."""
    return _Builder(doc, data, stem).profile()


def check_valid_parts(doc: YamlDoc, stem: str) -> None:
    """After the file failed its models: the rules between the sections that did validate,
    so that every problem is reported at once. Sections and registers that failed count as
    present (no follow-on problems about them)."""
    raw = doc.data
    if not isinstance(raw, dict):
        return
    parts: dict[str, Any] = {}
    broken: set[str] = set()
    for key, value in raw.items():
        field = ProfileFile.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        if key == "registers" and isinstance(value, list):
            parts[key] = tuple(_valid_registers(value, broken))
            continue
        try:
            parts[key] = _adapter(key).validate_python(value, context={})
        except ValidationError:
            broken.add(key)
    broken |= {k for k, f in ProfileFile.model_fields.items() if f.is_required() and k not in raw}
    builder = _Builder(doc, ProfileFile.model_construct(**parts), stem, frozenset(broken))
    builder.profile()


def _valid_registers(items: list[Any], broken: set[str]) -> list[RegisterIn]:
    out = []
    for item in items:
        try:
            out.append(RegisterIn.model_validate(item, context={}))
        except ValidationError:
            name = item.get("name") if isinstance(item, dict) else None
            broken.add(f"registers.{name}" if isinstance(name, str) else "registers")
    return out


@functools.cache
def _adapter(key: str) -> TypeAdapter[Any]:
    """Checks one top-level key alone (its type and the markers on it)."""
    field = ProfileFile.model_fields[key]
    annotation: Any = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation)


def _control(c: ControlIn, name: str, *, on: Any = None, off: Any = None) -> ControlSpec:
    return ControlSpec(register=c.spec(name), function=c.write_function, on=on, off=off)


def _overlaps(a: RegisterSpec, b: RegisterSpec) -> bool:
    writable = {Table.HOLDING, Table.COIL}
    same = a.table is b.table and a.table in writable
    return same and a.address < b.end and b.address < a.end


class _Builder:
    def __init__(
        self, doc: YamlDoc, data: ProfileFile, stem: str, broken: frozenset[str] = frozenset()
    ) -> None:
        self.doc, self.data, self.stem = doc, data, stem
        # Sections ("state") and registers ("registers.cp_state") that failed their models.
        self.broken = broken
        self.given = data.model_fields_set | broken
        self.regs: dict[str, RegisterSpec] = {}
        self.ok = True

    def add(self, path: PathT, message: str, *, key: bool = False) -> None:
        self.doc.add(path, message, key=key)
        self.ok = False

    def registers(self) -> tuple[RegisterSpec, ...]:
        out: list[RegisterSpec] = []
        for i, r in enumerate(self.data.registers):
            if r.name in self.regs:
                self.add(("registers", i, "name"), f"duplicate register name {r.name!r}")
                continue
            spec = r.register_spec()
            self.regs[spec.name] = spec
            out.append(spec)
        return tuple(out)

    def ref(self, path: PathT, name: str) -> RegisterSpec | None:
        """A register by name; a problem at ``path`` when it is not defined."""
        spec = self.regs.get(name)
        if spec is None and not {f"registers.{name}", "registers"} & self.broken:
            self.add(path, f"no register named {name!r} in registers")
        return spec

    # state ------------------------------------------------------------------------------------
    def condition(self, path: PathT, name: str, c: ConditionIn) -> Condition | None:
        spec = self.ref(path, name)
        if spec is None:
            return None
        if spec.type.is_text:
            if {"min", "max", "bits_all", "bits_any"} & c.model_fields_set:
                self.add(path, f"register {name!r} is text ({spec.type}): only equals applies")
                return None
            if c.equals is not None and not all(isinstance(v, str) for v in c.equals):
                self.add(path, f"register {name!r} is text ({spec.type}): compare with strings")
                return None
        elif c.equals is not None and not all(isinstance(v, int) for v in c.equals):
            self.add(path, f"register {name!r} is a number: compare with integers")
            return None
        return to_spec(c, Condition, register=name)

    def state(self) -> StateSpec | None:
        d = self.data.state
        if d is None:
            return None
        rules: list[StateRule] = []
        ok = True
        for i, r in enumerate(d.rules):
            conds = [
                self.condition(("state", "rules", i, "when", name), name, c)
                for name, c in r.when.items()
            ]
            if any(c is None for c in conds):
                ok = False
                continue
            rules.append(
                StateRule(when=tuple(c for c in conds if c is not None), iec=r.iec, status=r.status)
            )
        if not ok:
            return None
        return StateSpec(
            rules=tuple(rules), default_iec=d.default.iec, default_status=d.default.status
        )

    # tag and controls -------------------------------------------------------------------------
    def tag(self) -> TagSpec | None:
        d = self.data.tag
        if d is None:
            return None
        spec = self.ref(("tag", "register"), d.register_)
        if spec is None:
            return None
        if not spec.type.is_text:
            self.add(
                ("tag", "register"),
                f"register {spec.name!r} is {spec.type}; a tag needs ascii, ascii1 or hex",
            )
            return None
        return TagSpec(
            register=spec.name,
            empty=frozenset({"", *(normalise_tag(e) or "" for e in d.empty)}),
            upper=d.upper,
            not_a_user=frozenset(t for t in (normalise_tag(e) for e in d.not_a_user) if t),
            reverse_bytes=d.byte_order == "reversed",
            truncated_to=d.truncated_to,
        )

    def current_limit(self) -> CurrentLimitSpec | None:
        d = self.data.current_limit
        if d is None:
            return None
        return CurrentLimitSpec(
            control=_control(d, "current_limit"),
            unit=d.unit,
            min_a=float(d.min_a),
            max_a=float(d.max_a),
            disable=d.disable,
        )

    def heartbeat(self, limit: CurrentLimitSpec | None) -> HeartbeatSpec | None:
        d = self.data.heartbeat
        if d is None:
            return None
        failsafe = float(d.failsafe_current_a)
        if d.rewrite is not None:
            if limit is None:
                if "current_limit" not in self.given:
                    self.add(("heartbeat", "rewrite"), "needs a current_limit section")
                return None
            return HeartbeatSpec(
                control=limit.control,
                value=0,
                period_s=d.period,
                timeout_s=d.timeout,
                failsafe_current_a=failsafe,
                rewrites_current_limit=True,
            )
        assert d.value is not None  # the model requires it without rewrite
        return HeartbeatSpec(
            control=_control(d.control(), "heartbeat"),
            value=d.value,
            period_s=d.period,
            timeout_s=d.timeout,
            failsafe_current_a=failsafe,
        )

    def pause(self, limit: CurrentLimitSpec | None) -> str | None:
        d = self.data.pause
        if d == "enable" and "enable" not in self.given:
            self.add(("pause",), "pause: enable needs an enable section")
        if d == "current_limit" and "current_limit" not in self.given:
            self.add(("pause",), "pause: current_limit needs a current_limit section")
        elif d == "current_limit" and limit is not None and limit.disable is None:
            self.add(("pause",), "pause: current_limit needs current_limit.disable")
        return d  # None: Profile.pause_method derives it

    # simulate ---------------------------------------------------------------------------------
    def sim_value(self, path: PathT, spec: RegisterSpec, value: Any) -> bool:
        if spec.type.is_text != isinstance(value, str):
            kind = "a string" if spec.type.is_text else "a number"
            self.add(path, f"register {spec.name!r} is {spec.type}: give {kind}")
            return False
        try:
            encode(spec, value)
        except (CodecError, ValueError) as exc:
            self.add(path, f"cannot be encoded: {exc}")
            return False
        return True

    def simulate(
        self,
        kind: DeviceKind,
        state: StateSpec | None,
        identify: IdentifySpec | None,
        controls: list[ControlSpec],
    ) -> tuple[dict[ChargerStatus, Values], Values]:
        d = self.data.simulate
        states: dict[ChargerStatus, Values] = {}
        if d.states and kind is DeviceKind.METER:
            self.add(("simulate", "states"), "not for kind meter", key=True)
        else:
            read = sorted({c.register for r in state.rules for c in r.when}) if state else []
            for status, entry in d.states.items():
                path: PathT = ("simulate", "states", status.value)
                ok = True
                for name, value in entry.items():
                    reg = self.ref((*path, name), name)
                    if reg is None or not self.sim_value((*path, name), reg, value):
                        ok = False
                    elif any(_overlaps(reg, c.register) for c in controls):
                        # The simulator would overwrite what the gateway wrote.
                        self.add(
                            (*path, name),
                            f"register {name!r} is written by the gateway "
                            "(a control); a simulated state must not set it",
                        )
                        ok = False
                missing = [n for n in read if n not in entry]
                if missing:
                    self.add(
                        path,
                        "must set every register the state rules read; missing: "
                        + ", ".join(missing),
                    )
                    ok = False
                if ok and state is not None:
                    values: dict[str, object] = {
                        n: decode(self.regs[n], encode(self.regs[n], v)) for n, v in entry.items()
                    }
                    iec, got = state.classify(values)
                    if got is not status:
                        self.add(path, f"these values classify as {got} (IEC {iec}), not {status}")
                        ok = False
                if ok:
                    states[status] = dict(entry)
        identity: Values = {}
        for name, value in d.identity.items():
            path = ("simulate", "identity", name)
            if name == "identify":
                if identify is None:
                    self.add(path, "no identify section", key=True)
                    continue
                spec: RegisterSpec | None = identify.register
            else:
                spec = self.ref(path, name)
            if spec is not None and self.sim_value(path, spec, value):
                identity[name] = value
        return states, identity

    # the whole profile ------------------------------------------------------------------------
    def sections(self) -> None:
        """Which sections the kind of device may (or must) have."""
        slug, kind = getattr(self.data, "slug", None), getattr(self.data, "kind", None)
        if slug is not None and slug != self.stem:
            self.add(("slug",), f"slug {slug!r} does not match the file name {self.stem!r}.yaml")
        if kind is DeviceKind.METER:
            for key in ("state", "tag", "enable", "current_limit", "heartbeat", "phases"):
                if key in self.given:
                    self.add((key,), "not for kind meter", key=True)
            names = {*self.regs, *(b.removeprefix("registers.") for b in self.broken)}
            if not names & {"power_w", "energy_wh", "registers"}:
                self.add(("registers",), "a meter needs power_w or energy_wh")
        elif kind is DeviceKind.CHARGER and "state" not in self.given:
            self.add(("state",), "missing required key (every charger needs state rules)")

    def profile(self) -> Profile | None:
        data = self.data
        registers = self.registers()
        self.sections()
        state = self.state()
        tag = self.tag()
        e = data.enable
        enable = None if e is None else _control(e, "enable", on=e.on_value, off=e.off_value)
        limit = self.current_limit()
        heartbeat = self.heartbeat(limit)
        p = data.phases
        phases = None if p is None else _control(p, "phases", on=p.three_phase, off=p.one_phase)
        i = data.identify
        identify = (
            None
            if i is None
            else IdentifySpec(
                register=i.spec("identify"), pattern=i.pattern, min=i.min, max=i.max, unit=i.unit
            )
        )
        pause = self.pause(limit)
        on_connect = tuple(
            OnConnectWrite(control=_control(w, "on_connect"), value=w.value, note=w.note)
            for w in data.on_connect
        )
        controls = [
            c
            for c in (
                enable,
                limit.control if limit else None,
                heartbeat.control if heartbeat else None,
                phases,
            )
            if c
        ]
        controls += [w.control for w in on_connect]
        kind = getattr(data, "kind", None) or DeviceKind.CHARGER
        sim_states, sim_identity = self.simulate(kind, state, identify, controls)
        if not self.ok or self.broken:
            return None
        return to_spec(
            data,
            Profile,
            connection=self.connection(),
            registers=registers,
            state=state,
            tag=tag,
            enable=enable,
            current_limit=limit,
            heartbeat=heartbeat,
            phases=phases,
            identify=identify,
            pause=pause,
            on_connect=on_connect,
            simulate_states=sim_states,
            simulate_identity=sim_identity,
            path=self.doc.file,
        )

    def connection(self) -> ConnectionSpec:
        c = self.data.connection
        base = (c.baudrate, c.parity, c.stopbits)
        alternatives: list[tuple[int, str, int]] = []
        for alt in c.serial_alternatives:
            setting = (
                alt.baudrate if alt.baudrate is not None else base[0],
                alt.parity if alt.parity is not None else base[1],
                alt.stopbits if alt.stopbits is not None else base[2],
            )
            if setting != base and setting not in alternatives:
                alternatives.append(setting)
        return to_spec(
            c,
            ConnectionSpec,
            inter_request_delay_s=c.inter_request_delay,
            serial_alternatives=tuple(alternatives),
        )
