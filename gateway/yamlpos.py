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

__all__ = [
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "YamlDoc",
    "format_path",
    "load_yaml",
    "parse_yaml",
]

PathT = tuple[str | int, ...]

# Limits that no real config, profile, scenario or tariff file comes near (the largest shipped
# profile is ~40 KB, ~3,000 nodes) but that stop hostile files cheaply: a 396-byte alias bomb
# expands to billions of nodes, a self-referencing alias to an infinite tree.
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 500_000  # nodes after alias and merge-key expansion
MAX_YAML_DEPTH = 64


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
        with p.open("rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            doc = YamlDoc(str(path), None)
            doc.problems.append(
                ConfigProblem(str(path), 1, 1, "", f"file is larger than {MAX_YAML_BYTES} bytes")
            )
            return doc
        text = raw.decode("utf-8")
    except OSError as exc:
        doc = YamlDoc(str(path), None)
        doc.problems.append(ConfigProblem(str(path), 1, 1, "", f"cannot read file: {exc.strerror}"))
        return doc
    except UnicodeDecodeError:
        doc = YamlDoc(str(path), None)
        doc.problems.append(ConfigProblem(str(path), 1, 1, "", "file is not UTF-8 text"))
        return doc
    return parse_yaml(text, str(path))


class _TooBig(Exception):
    """The composed document breaks one of the limits; ``str`` is the one-line reason."""


def parse_yaml(text: str, file: str = "<string>") -> YamlDoc:
    doc = YamlDoc(file, None)
    if len(text) > MAX_YAML_BYTES:
        doc.problems.append(
            ConfigProblem(file, 1, 1, "", f"document is larger than {MAX_YAML_BYTES} bytes")
        )
        return doc
    try:
        # The constructor already scans for characters YAML forbids (control characters).
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        before = text[: max(0, exc.position)]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        doc.problems.append(
            ConfigProblem(
                file, line, col, "", f"character U+{exc.character:04X} is not allowed in YAML"
            )
        )
        return doc
    try:
        _check_depth(text)
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise _TooBig(f"nested deeper than {MAX_YAML_DEPTH} levels") from None
        if node is None:
            doc.data = None
            return doc
        _check_size(node)
        doc.data = _convert(loader, node, (), doc)
    except _TooBig as exc:
        doc.problems.append(ConfigProblem(file, 1, 1, "", f"YAML document refused: {exc}"))
        doc.data = None
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


def _check_depth(text: str) -> None:
    """Refuse deep flow nesting (``[[[[...``) before PyYAML sees it: its scanner reads a whole run
    of open brackets ahead with a cost that grows with the square of the depth (5,000 brackets:
    over a second), and its composer recurses once per level. Block nesting costs indentation, so
    the byte limit bounds it; _check_size checks the composed depth as well."""
    depth = 0
    quote = ""
    prev = "\n"  # previous significant character: a quote opens a scalar only after one of these
    in_comment = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_comment:
            if ch == "\n":
                in_comment = False
                prev = ch
        elif quote:
            if quote == '"' and ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
                prev = "x"
        elif ch in "'\"" and prev in "\n:-,[{?":
            quote = ch
        elif ch == "#" and (prev == "\n" or text[i - 1] in " \t"):
            in_comment = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _TooBig(f"nested deeper than {MAX_YAML_DEPTH} levels")
        elif ch in "]}":
            depth = max(0, depth - 1)
        if not in_comment and not quote and ch not in " \t\r":
            prev = ch if ch in "\n:-,[{?" else "x"
        i += 1


def _check_size(root: yaml.Node) -> None:
    """Count the nodes ``root`` expands to, following aliases and ``<<`` merges, before anything is
    constructed: shared nodes are counted once per reference (that is what construction costs),
    but each distinct node is walked once thanks to the memo, so the check itself is linear in the
    file. Raises ``_TooBig`` on a cycle, too many nodes or too deep a tree."""
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, depth)
    active: set[int] = set()
    # Iterative post-order walk: a hostile file must not be able to exhaust the Python stack here.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            count, depth = 1, 0
            for child in _children(node):
                c, d = memo[id(child)]
                count += c
                depth = max(depth, d)
            depth += 1
            if count > MAX_YAML_NODES:
                raise _TooBig(f"expands to more than {MAX_YAML_NODES} nodes (alias bomb?)")
            if depth > MAX_YAML_DEPTH:
                raise _TooBig(f"nested deeper than {MAX_YAML_DEPTH} levels")
            memo[key] = (count, depth)
            continue
        if key in memo:
            continue
        if key in active:
            raise _TooBig(
                f"line {node.start_mark.line + 1}: an alias refers to a node that contains it"
            )
        active.add(key)
        stack.append((node, True))
        for child in _children(node):
            cid = id(child)
            if cid in active:
                raise _TooBig(
                    f"line {child.start_mark.line + 1}: an alias refers to a node that contains it"
                )
            if cid not in memo:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


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
