"""YAML loading that remembers where every value came from.

Config, device profiles and simulator scenarios are all validated against schemas and every
problem is reported as ``FILE:LINE:COL: key.path: message``; this module supplies the positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigProblem

__all__ = ["YamlDoc", "format_path", "load_yaml", "parse_yaml"]

PathT = tuple[str | int, ...]


def format_path(path: Iterable[str | int]) -> str:
    """``("devices", 0, "driver")`` -> ``devices[0].driver``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class YamlDoc:
    file: str
    data: Any
    # Position (1-based line, col) of each value, and of each mapping key under (*path, "<key>").
    marks: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)

    def where(self, path: PathT, *, key: bool = False) -> tuple[int, int]:
        """Position of ``path``; of its key when ``key`` (for "unknown key" errors); else of the
        nearest existing parent (for "missing key" errors)."""
        if key and path in self.key_marks:
            return self.key_marks[path]
        p = tuple(path)
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), (1, 1))

    def problem(self, path: PathT, message: str, *, key: bool = False) -> ConfigProblem:
        line, col = self.where(path, key=key)
        return ConfigProblem(self.file, line, col, format_path(path), message)

    def add(self, path: PathT, message: str, *, key: bool = False) -> None:
        self.problems.append(self.problem(path, message, key=key))


def load_yaml(path: str | Path) -> YamlDoc:
    """Read and parse a YAML file. Syntax errors come back as problems, not exceptions."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        doc = YamlDoc(str(path), None)
        doc.problems.append(ConfigProblem(str(path), 1, 1, "", f"cannot read file: {exc.strerror}"))
        return doc
    except UnicodeDecodeError:
        doc = YamlDoc(str(path), None)
        doc.problems.append(ConfigProblem(str(path), 1, 1, "", "file is not UTF-8 text"))
        return doc
    return parse_yaml(text, str(path))


def parse_yaml(text: str, file: str = "<string>") -> YamlDoc:
    doc = YamlDoc(file, None)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            doc.data = None
            return doc
        doc.data = _convert(loader, node, (), doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        doc.problems.append(
            ConfigProblem(file, line, col, "", f"YAML syntax error: {exc.problem or exc}")
        )
        doc.data = None
    except yaml.YAMLError as exc:
        doc.problems.append(ConfigProblem(file, 1, 1, "", f"YAML error: {exc}"))
        doc.data = None
    finally:
        loader.dispose()
    return doc


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: PathT, doc: YamlDoc) -> Any:
    doc.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves << merge keys
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                doc.problems.append(
                    ConfigProblem(
                        doc.file,
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                        format_path(path),
                        "mapping keys must be scalars",
                    )
                )
                continue
            key = str(key) if not isinstance(key, int) or isinstance(key, bool) else key
            child = (*path, key)
            kpos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in out:
                doc.problems.append(
                    ConfigProblem(doc.file, kpos[0], kpos[1], format_path(child), "duplicate key")
                )
            doc.key_marks[child] = kpos
            out[key] = _convert(loader, value_node, child, doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, (*path, i), doc) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
