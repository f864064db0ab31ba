"""Hostile YAML: alias bombs, self-referencing aliases, deep nesting and huge files are refused with
one clear line, quickly and in little memory, for every kind of file the gateway reads."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.profiles import load_profile
from gateway.sim.scenario import load_scenario
from gateway.yamlpos import MAX_YAML_BYTES, MAX_YAML_DEPTH, parse_yaml

REPO = Path(__file__).resolve().parent.parent

# The 396-byte "billion laughs" of the issue: nine levels of nine aliases, 9**9 strings expanded.
BOMB = (
    "a: &a ["
    + ",".join(['"lol"'] * 9)
    + "]\n"
    + "".join(
        f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
)
SELF_ALIAS = "a: &a [*a]\n"
SELF_MERGE = "a: &a {x: 1, <<: *a}\n"
DEEP = "[" * 5000 + "]" * 5000 + "\n"
DEEP_BLOCK = (
    "".join("  " * i + f"k{i}:\n" for i in range(MAX_YAML_DEPTH + 5)) + "  " * 70 + "v: 1\n"
)
MERGE_BOMB = "a0: &a0 {x0: 1, y0: 2}\n" + "".join(
    f"a{i}: &a{i} {{<<: [*a{i - 1}], x{i}: [*a{i - 1}, *a{i - 1}, *a{i - 1}]}}\n"
    for i in range(1, 30)
)

HOSTILE = {
    "bomb": (BOMB, "alias bomb"),
    "self_alias": (SELF_ALIAS, "refers to a node that contains it"),
    "self_merge": (SELF_MERGE, "refers to a node that contains it"),
    "deep_flow": (DEEP, f"nested deeper than {MAX_YAML_DEPTH} levels"),
    "deep_block": (DEEP_BLOCK, f"nested deeper than {MAX_YAML_DEPTH} levels"),
    "merge_bomb": (MERGE_BOMB, "alias bomb"),
}


def test_bomb_is_the_size_of_the_issue() -> None:
    assert len(BOMB) < 400


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_parse_refuses_hostile_documents_quickly(name: str) -> None:
    text, expected = HOSTILE[name]
    start = time.monotonic()
    doc = parse_yaml(text, "hostile.yaml")
    assert time.monotonic() - start < 2.0
    assert doc.data is None
    assert len(doc.problems) == 1
    assert expected in str(doc.problems[0])
    assert str(doc.problems[0]).startswith("hostile.yaml:1:1: <root>: YAML document refused:")


def test_legitimate_anchors_and_merges_still_work() -> None:
    doc = parse_yaml("base: &b {x: 1, y: [1, 2]}\nuse: {<<: *b, z: 3}\nlist: [*b, *b]\n")
    assert doc.problems == []
    assert doc.data["use"] == {"x": 1, "y": [1, 2], "z": 3}
    assert doc.data["list"] == [{"x": 1, "y": [1, 2]}] * 2


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    with file.open("w") as fh:
        fh.write("site: {id: x}\n# " + "x" * (MAX_YAML_BYTES + 10) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert f"file is larger than {MAX_YAML_BYTES} bytes" in str(info.value)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "config": load_config,
    "profile": load_profile,
    "scenario": lambda p: load_scenario(p),
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("name", ["bomb", "self_alias", "deep_flow"])
def test_every_loader_reports_a_config_error(tmp_path: Path, kind: str, name: str) -> None:
    file = tmp_path / f"{name}.yaml"
    file.write_text(HOSTILE[name][0])
    with pytest.raises(ConfigError) as info:
        LOADERS[kind](file)
    assert HOSTILE[name][1] in str(info.value)


def _limit_memory() -> None:
    # 512 MB of address space: the bomb took 1.6 GB before the limits.
    resource.setrlimit(resource.RLIMIT_AS, (512 * 1024 * 1024, 512 * 1024 * 1024))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["bomb", "self_alias", "deep_flow", "merge_bomb"])
def test_check_config_cli_one_line_fast_and_small(tmp_path: Path, name: str) -> None:
    """Tariffs live in the site config, so this covers tariff files too."""
    file = tmp_path / "site.yaml"
    file.write_text(HOSTILE[name][0])
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-c", str(file)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        preexec_fn=_limit_memory,
    )
    assert time.monotonic() - start < 10
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert HOSTILE[name][1] in lines[0]
