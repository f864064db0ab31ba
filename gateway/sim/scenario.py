"""Scripted simulator scenarios: timed EV and fault actions, validated with line-numbered errors.

A scenario file is a list of steps (or a mapping with ``steps:`` and ``traffic:``)::

    - {at: 5s, device: cp1, action: plug_in, tag: 04A2B3C4D5E6F7, power_w: 11000}
    - {at: 10s, device: cp1, action: start}
    - {at: 2m, device: cp1, action: suspend}
    - {at: 3m, device: cp1, action: resume}
    - {at: 4m, device: m-site, action: fault, fault: no_answer}
    - {at: 5m, device: m-site, action: clear_fault}
    - {at: 6m, device: m-site, action: override, register: energy_wh, value: 1e33, polls: 3}
    - {at: 10m, device: cp1, action: unplug}

``at`` is simulated time since the simulator started (``5s``, ``2m``, ``1h30m`` or seconds).
With the mapping form, ``traffic: true`` also runs the random EV traffic next to the steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.sim.server import Fault, FaultKind
from gateway.yamlpos import YamlDoc, load_yaml, parse_yaml

__all__ = ["ACTIONS", "Scenario", "ScenarioStep", "load_scenario", "parse_scenario"]

ACTIONS = (
    "plug_in",
    "tag",
    "start",
    "suspend",
    "resume",
    "unplug",
    "fault",
    "clear_fault",
    "override",
)
_EV_ACTIONS = frozenset(ACTIONS) - {"fault", "clear_fault", "override"}
_KEYS = {
    "at",
    "device",
    "action",
    "tag",
    "power_w",
    "energy_need_wh",
    "phases",
    "fault",
    "code",
    "delay",
    "register",
    "value",
    "polls",
}


@dataclass(frozen=True, slots=True)
class ScenarioStep:
    at_s: float
    device: str
    action: str
    tag: str | None = None
    power_w: float | None = None
    energy_need_wh: float | None = None
    phases: int | None = None
    fault: Fault | None = None
    # action override: answer ``value`` (in the register's unit) in ``register`` for ``polls``
    register: str | None = None
    value: float | None = None
    polls: int = 1
    line: int = 0


@dataclass(frozen=True, slots=True)
class Scenario:
    steps: tuple[ScenarioStep, ...]
    traffic: bool = False  # also run random EV traffic
    source: str = ""

    @property
    def end_s(self) -> float:
        return max((s.at_s for s in self.steps), default=0.0)


def load_scenario(
    path: str | Path,
    device_ids: Iterable[str] | None = None,
    charger_ids: Iterable[str] | None = None,
) -> Scenario:
    """Load and validate a scenario file; raises :class:`ConfigError` with every problem."""
    return _build(load_yaml(path), device_ids, charger_ids)


def parse_scenario(
    text: str,
    file: str = "<scenario>",
    device_ids: Iterable[str] | None = None,
    charger_ids: Iterable[str] | None = None,
) -> Scenario:
    return _build(parse_yaml(text, file), device_ids, charger_ids)


def _duration(value: Any) -> float:
    from gateway.config import parse_duration  # the config's one duration syntax

    return parse_duration(value)


def _number(
    doc: YamlDoc, path: tuple[str | int, ...], value: Any, *, positive: bool
) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        doc.add(path, f"expected a number, got {value!r}")
        return None
    if positive and value <= 0:
        doc.add(path, f"must be greater than 0, got {value!r}")
        return None
    return float(value)


def _build(
    doc: YamlDoc, device_ids: Iterable[str] | None, charger_ids: Iterable[str] | None
) -> Scenario:
    devices = set(device_ids) if device_ids is not None else None
    chargers = set(charger_ids) if charger_ids is not None else None
    data = doc.data
    traffic = False
    items: Any = data
    base: tuple[str | int, ...] = ()
    if doc.problems:
        raise ConfigError(doc.problems)
    if isinstance(data, dict):
        for key in data:
            if key not in ("steps", "traffic"):
                doc.add((key,), "unknown key (expected steps, traffic)", key=True)
        traffic_value = data.get("traffic", False)
        if not isinstance(traffic_value, bool):
            doc.add(("traffic",), f"expected true or false, got {traffic_value!r}")
        else:
            traffic = traffic_value
        items = data.get("steps", [])
        base = ("steps",)
    if not isinstance(items, list):
        doc.add(base, "expected a list of steps")
        raise ConfigError(doc.problems)
    steps: list[ScenarioStep] = []
    for i, item in enumerate(items):
        path: tuple[str | int, ...] = (*base, i)
        step = _step(doc, path, item, devices, chargers)
        if step is not None:
            steps.append(step)
    if doc.problems:
        raise ConfigError(doc.problems)
    steps.sort(key=lambda s: s.at_s)  # stable: same-time steps keep file order
    return Scenario(steps=tuple(steps), traffic=traffic, source=doc.file)


def _step(
    doc: YamlDoc,
    path: tuple[str | int, ...],
    item: Any,
    devices: set[str] | None,
    chargers: set[str] | None,
) -> ScenarioStep | None:
    if not isinstance(item, dict):
        doc.add(path, "expected a mapping like {at: 5s, device: cp1, action: plug_in}")
        return None
    before = len(doc.problems)
    for key in item:
        if key not in _KEYS:
            doc.add(
                (*path, key), f"unknown key (expected one of {', '.join(sorted(_KEYS))})", key=True
            )
    for key in ("at", "device", "action"):
        if key not in item:
            doc.add(path, f"missing required key {key!r}")
    at_s = 0.0
    if "at" in item:
        try:
            at_s = _duration(item["at"])
        except ValueError as exc:
            doc.add((*path, "at"), str(exc))
    device = item.get("device")
    if "device" in item:
        if not isinstance(device, str):
            doc.add((*path, "device"), f"expected a device id, got {device!r}")
        elif devices is not None and device not in devices:
            doc.add((*path, "device"), f"unknown device {device!r}")
    action = item.get("action")
    if "action" in item and action not in ACTIONS:
        doc.add((*path, "action"), f"unknown action {action!r} (expected {', '.join(ACTIONS)})")
    elif (
        action in _EV_ACTIONS
        and chargers is not None
        and isinstance(device, str)
        and (devices is None or device in devices)
        and device not in chargers
    ):
        doc.add((*path, "action"), f"{action} needs a charger; {device!r} is not one")
    tag = item.get("tag")
    if tag is not None and not isinstance(tag, str):
        tag = str(tag)  # UIDs written without quotes, e.g. 1234
    if action == "tag" and tag is None:
        doc.add(path, "action tag needs a tag")
    power_w = energy_need_wh = None
    if "power_w" in item:
        power_w = _number(doc, (*path, "power_w"), item["power_w"], positive=True)
    if "energy_need_wh" in item:
        energy_need_wh = _number(
            doc, (*path, "energy_need_wh"), item["energy_need_wh"], positive=True
        )
    phases = item.get("phases")
    if phases is not None and phases not in (1, 3):
        doc.add((*path, "phases"), f"expected 1 or 3, got {phases!r}")
    fault: Fault | None = None
    if action == "fault":
        kind = item.get("fault")
        kinds = [k.value for k in FaultKind if k is not FaultKind.NONE]
        if kind is None:
            doc.add(path, "action fault needs fault: " + " | ".join(kinds))
        elif kind not in kinds:
            doc.add((*path, "fault"), f"unknown fault {kind!r} (expected {', '.join(kinds)})")
        else:
            code = item.get("code", 4)
            if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
                doc.add((*path, "code"), f"expected an exception code 1..255, got {code!r}")
                code = 4
            delay_s = 0.0
            if "delay" in item:
                try:
                    delay_s = _duration(item["delay"])
                except ValueError as exc:
                    doc.add((*path, "delay"), str(exc))
            fault = Fault(FaultKind(kind), code=code, delay_s=delay_s)
    elif "fault" in item:
        doc.add((*path, "fault"), "only with action: fault", key=True)
    register, value, polls = item.get("register"), None, item.get("polls", 1)
    if action == "override":
        if not isinstance(register, str) or not register:
            doc.add(path, "action override needs register: a register name of the profile")
        if "value" not in item:
            doc.add(path, "action override needs value: what the register answers")
        else:
            raw = item["value"]
            if isinstance(raw, str):  # YAML 1.1 reads 1e33 (no dot) as text
                with contextlib.suppress(ValueError):
                    raw = float(raw)
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                doc.add((*path, "value"), f"expected a number, got {item['value']!r}")
            else:
                value = float(raw)
        if isinstance(polls, bool) or not isinstance(polls, int) or polls < 1:
            doc.add((*path, "polls"), f"expected a number of polls >= 1, got {polls!r}")
    else:
        for key in ("register", "value", "polls"):
            if key in item:
                doc.add((*path, key), "only with action: override", key=True)
    if len(doc.problems) > before:
        return None
    line = doc.where(path)[0]
    return ScenarioStep(
        at_s=at_s,
        device=str(device),
        action=str(action),
        tag=tag,
        power_w=power_w,
        energy_need_wh=energy_need_wh,
        phases=phases,
        fault=fault,
        register=register if action == "override" else None,
        value=value,
        polls=polls if action == "override" else 1,
        line=line,
    )
