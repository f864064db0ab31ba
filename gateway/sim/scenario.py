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

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, ValidationInfo, model_validator

from gateway.errors import ConfigError
from gateway.schema import (
    AsTuple,
    Choice,
    Duration,
    Model,
    Problems,
    Range,
    Text,
    suggest,
    to_spec,
    validate_value,
)
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
_FAULTS = tuple(k.value for k in FaultKind if k is not FaultKind.NONE)


def _tag_text(value: Any) -> Any:
    """UIDs written without quotes (``tag: 1234``) are text all the same."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _number_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e33`` (no dot) as text: read it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _StepIn(Model):
    """One step as written in the file."""

    at: Duration = Field(description="simulated time since the start: 5s, 2m, 1h30m or seconds")
    device: Annotated[str, Text()]
    action: Annotated[Literal[ACTIONS], Choice(*ACTIONS)]  # type: ignore[valid-type]
    tag: Annotated[str, Text(), BeforeValidator(_tag_text)] | None = None
    power_w: float | None = None
    energy_need_wh: float | None = None
    phases: Annotated[Literal[1, 3], Choice(1, 3)] | None = None
    fault: Annotated[str, Choice(*_FAULTS)] | None = None
    code: Annotated[int, Range(1, 255)] = 4
    delay: Duration = 0.0
    register_name: Annotated[str, Text()] | None = Field(default=None, validation_alias="register")
    value: Annotated[float, BeforeValidator(_number_text)] | None = None
    polls: Annotated[int, Range(lo=1)] = 1

    @model_validator(mode="after")
    def _between_keys(self, info: ValidationInfo) -> Self:
        problems = Problems()
        devices, chargers = (
            (info.context or {}).get("devices"),
            (info.context or {}).get("chargers"),
        )
        known = devices is None or self.device in devices
        if not known:
            hint = suggest(self.device, devices or ())
            problems.add(("device",), f"unknown device {self.device!r}{hint}")
        not_charger = chargers is not None and known and self.device not in chargers
        if self.action in _EV_ACTIONS and not_charger:
            message = f"{self.action} needs a charger; {self.device!r} is not one"
            problems.add(("action",), message)
        if self.action == "tag" and self.tag is None:
            problems.add((), "action tag needs a tag")
        for key in ("power_w", "energy_need_wh"):
            amount = getattr(self, key)
            if amount is not None and amount <= 0:
                problems.add((key,), f"must be greater than 0, got {amount:g}")
        if self.action == "fault" and self.fault is None:
            problems.add((), "action fault needs fault: " + " | ".join(_FAULTS))
        elif self.action != "fault" and "fault" in self.model_fields_set:
            problems.add(("fault",), "only with action: fault", key=True)
        if self.action == "override":
            if self.register_name is None:
                problems.add((), "action override needs register: a register name of the profile")
            if self.value is None:
                problems.add((), "action override needs value: what the register answers")
        else:
            for key, name in (
                ("register", "register_name"),
                ("value", "value"),
                ("polls", "polls"),
            ):
                if name in self.model_fields_set:
                    problems.add((key,), "only with action: override", key=True)
        problems.raise_any()
        return self


_Steps = Annotated[tuple[_StepIn, ...], AsTuple]


class _ScenarioIn(Model):
    """The mapping form: steps and whether random EV traffic runs next to them."""

    steps: _Steps = ()
    traffic: bool = False


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


def _build(
    doc: YamlDoc, device_ids: Iterable[str] | None, charger_ids: Iterable[str] | None
) -> Scenario:
    if doc.problems:
        raise ConfigError(doc.problems)
    context = {
        "devices": set(device_ids) if device_ids is not None else None,
        "chargers": set(charger_ids) if charger_ids is not None else None,
    }
    base: tuple[str | int, ...] = ()
    if isinstance(doc.data, dict):
        read = validate_value(_ScenarioIn, doc.data, doc, context=context)
        base = ("steps",)
        steps, traffic = (read.steps, read.traffic) if read is not None else ((), False)
    else:
        if not isinstance(doc.data, list):
            doc.add((), "expected a list of steps (or a mapping with steps and traffic)")
        steps = validate_value(_Steps, doc.data, doc, context=context) or ()
        traffic = False
    if doc.problems:
        raise ConfigError(doc.problems)
    built = [_step(s, doc.where((*base, i))[0]) for i, s in enumerate(steps)]
    built.sort(key=lambda s: s.at_s)  # stable: same-time steps keep file order
    return Scenario(steps=tuple(built), traffic=traffic, source=doc.file)


def _step(step: _StepIn, line: int) -> ScenarioStep:
    override = step.action == "override"
    return to_spec(
        step,
        ScenarioStep,
        at_s=step.at,
        fault=(
            Fault(FaultKind(step.fault), code=step.code, delay_s=step.delay)
            if step.action == "fault" and step.fault is not None
            else None
        ),
        register=step.register_name if override else None,
        polls=step.polls if override else 1,
        line=line,
    )
