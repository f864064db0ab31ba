"""The shared validation layer (gateway.schema): wording, positions, durations, JSON Schema."""

from __future__ import annotations

from typing import Annotated, Literal, Self

import pytest
from pydantic import Field, model_validator

from gateway.schema import (
    AsTuple,
    Choice,
    Duration,
    Model,
    Problems,
    Range,
    Text,
    format_duration,
    json_schema,
    parse_duration,
    validate_doc,
)
from gateway.yamlpos import parse_yaml


class _Register(Model):
    address: Annotated[int, Range(0, 65535)]
    every: Annotated[Duration, Range(0.1, 60.0)] = 1.0
    name: Annotated[str, Text(pattern=r"[a-z]+", hint="lower case letters")] = "x"


class _Heartbeat(Model):
    period: Duration = 10.0
    timeout: Duration = 30.0

    @model_validator(mode="after")
    def _shorter(self) -> Self:
        problems = Problems()
        if self.period >= self.timeout:
            problems.add(
                ("period",),
                f"period {format_duration(self.period)} must be shorter than the timeout "
                f"{format_duration(self.timeout)} {{not a template}}",
            )
            problems.add(("timeout",), "second problem at the key", key=True)
        problems.raise_any()
        return self


class _Root(Model):
    registers: Annotated[tuple[_Register, ...], AsTuple] = ()
    parity: Annotated[Literal["N", "E", "O"], Choice("N", "E", "O")] = "N"
    stopbits: Annotated[Literal[1, 2], Choice(1, 2)] = 1
    heartbeat: _Heartbeat | None = None
    groups: dict[Annotated[str, Text(pattern="[a-z]+", hint="letters")], int] = Field(
        default_factory=dict
    )
    limit: float = 0.0
    label: str = ""
    count: Annotated[int, Range(lo=0)] = 0


def _problems(text: str) -> list[str]:
    doc = parse_yaml(text, "demo.yaml")
    assert validate_doc(_Root, doc) is None
    return [str(p) for p in sorted(doc.problems, key=lambda p: (p.line, p.col))]


def test_every_problem_at_once_with_positions_and_wording() -> None:
    got = _problems(
        "registers:\n"
        "  - {adress: 3, every: 2m}\n"
        "  - {address: 70000, every: ' 10 s', name: X1}\n"
        "parity: X\n"
        "stopbits: true\n"
        "heartbeat: {period: 30s, timeout: 30s}\n"
        "groups: {ABC: 1, ok: x}\n"
        "limit: .inf\n"
        "label: 12\n"
        "count: -1\n"
        "devies:\n"
    )
    assert got == [
        "demo.yaml:2:5: registers[0].address: missing required key 'address'",
        "demo.yaml:2:6: registers[0].adress: unknown key 'adress' (did you mean 'address'?)",
        "demo.yaml:2:24: registers[0].every: must be between 100ms and 1m, got 2m",
        "demo.yaml:3:15: registers[1].address: must be between 0 and 65535, got 70000",
        "demo.yaml:3:29: registers[1].every: invalid duration ' 10 s': use a number of seconds "
        "or a number with a unit (ms, s, m, h, d), e.g. 500ms or 2m",
        "demo.yaml:3:44: registers[1].name: must be lower case letters, got 'X1'",
        "demo.yaml:4:9: parity: must be one of N, E, O; got 'X'",
        "demo.yaml:5:11: stopbits: must be one of 1, 2; got true",
        "demo.yaml:6:21: heartbeat.period: period 30s must be shorter than the timeout 30s "
        "{not a template}",
        "demo.yaml:6:26: heartbeat.timeout: second problem at the key",
        "demo.yaml:7:10: groups.ABC: key must be letters, got 'ABC'",
        "demo.yaml:7:22: groups.ok: expected an integer, got 'x'",
        "demo.yaml:8:8: limit: must be a finite number, got inf",
        "demo.yaml:9:8: label: expected a string, got a number: quote the value",
        "demo.yaml:10:8: count: must be at least 0, got -1",
        "demo.yaml:11:1: devies: unknown key 'devies'",
    ]


def test_choice_suggests_the_close_value() -> None:
    assert _problems("parity: e\n") == ["demo.yaml:1:9: parity: must be one of N, E, O; got 'e'"]
    doc = parse_yaml("x: evn\n", "d.yaml")

    class _Pick(Model):
        x: Annotated[str, Choice("even", "odd")]

    assert validate_doc(_Pick, doc) is None
    assert [p.message for p in doc.problems] == [
        "must be one of even, odd; got 'evn' (did you mean 'even'?)"
    ]


def test_empty_optional_sections_read_as_absent() -> None:
    doc = parse_yaml("registers:\nheartbeat:\ngroups:\n", "d.yaml")
    root = validate_doc(_Root, doc)
    assert root is not None and root.registers == () and root.heartbeat is None
    assert root.groups == {}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("1.5", 1.5),
        (3, 3.0),
        (" 10s ", 10.0),
    ],
)
def test_the_one_duration_syntax(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [" 10 s", "10 s", "1h 30m", "-1", "1e3", "10x", "", "inf", True])
def test_nothing_else_is_a_duration(text: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_json_schema_carries_ranges_patterns_and_durations() -> None:
    schema = json_schema(_Root, title="demo", id="https://example.invalid/demo.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    reg = schema["$defs"]["_Register"]["properties"]
    assert reg["address"] == {"type": "integer", "minimum": 0, "maximum": 65535}
    number, text = reg["every"]["anyOf"]
    assert number == {"type": "number", "minimum": 0.1, "maximum": 60.0}
    assert text["type"] == "string" and "pattern" in text
    assert schema["properties"]["parity"]["enum"] == ["N", "E", "O"]
