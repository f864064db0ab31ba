"""The package layout holds: the edge runtime never loads the cloud side, no two modules
of ``gateway/`` import each other, however indirectly, and none is over 700 lines.

The checks read the code as it is: one imports the edge in a fresh interpreter and looks at
``sys.modules``; the others walk ``gateway/`` with ``ast``, so an import in the wrong place is
caught even when no test happens to run it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from tests.support.mqtt_broker import free_port

GATEWAY = Path(gateway.__file__).parent
CLOUD = "gateway.cloud"
# The command handlers that run cloud tools (`evgw consume|trust|statement`, `evgw verify --db`)
# import the cloud package inside the function; nothing else may import it at all.
LAZY_CLOUD_IMPORTERS = {"gateway.cli", "gateway.billing.verify"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text("utf-8"), str(path))
        for path in sorted(GATEWAY.rglob("*.py"))
    }


def _is_cloud(name: str) -> bool:
    return name == CLOUD or name.startswith(CLOUD + ".")


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The absolute names an import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".")[: -node.level]
        base = ".".join([*package, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (outside functions and TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)
    return found


_RUN_AND_IMPORT = """
import asyncio, contextlib, importlib, json, sys
from pathlib import Path
import gateway.cli
from gateway.app import Gateway
from gateway.config import load_config

async def run(path):
    async with Gateway(load_config(Path(path))) as gw:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await gw.run()

asyncio.run(run(sys.argv[1]))
ran = sorted(sys.modules)
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
print(json.dumps({"ran": ran, "all": sorted(sys.modules)}))
"""


@pytest.mark.e2e
def test_the_edge_runtime_never_loads_the_cloud_side(tmp_path: Path) -> None:
    """A fresh interpreter imports the CLI, runs a gateway (store, web, session manager) for a
    second, then imports every other edge module: no gateway.cloud module gets loaded."""
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: {id: t1, timezone: Europe/Berlin}\n"
        f"storage: {{path: {tmp_path / 'buffer.db'}}}\n"
        f'web: {{listen: "127.0.0.1:{free_port()}"}}\n'
    )
    edge = sorted(
        name
        for name in _modules()
        if not _is_cloud(name) and name not in {"gateway.__main__", "gateway.cli"}
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_AND_IMPORT, str(site), json.dumps(edge)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"gateway.app", "gateway.sessions", "gateway.web.server"} <= set(loaded["ran"])
    assert set(edge) <= set(loaded["all"])
    assert [name for name in loaded["all"] if _is_cloud(name)] == []


def test_no_edge_module_imports_the_cloud_side() -> None:
    modules = _modules()
    at_import: list[str] = []
    anywhere: list[str] = []
    for module, tree in modules.items():
        if _is_cloud(module):
            continue
        top = {id(node) for node in _top_level_imports(tree)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if not any(_is_cloud(name) for name in _imported(node, module)):
                continue
            where = f"{module}:{node.lineno}"
            if id(node) in top:
                at_import.append(where)
            elif module not in LAZY_CLOUD_IMPORTERS:
                anywhere.append(where)
    assert at_import == []
    assert anywhere == []
    # The walk sees the handlers' lazy imports, so an empty result above means something.
    lazy = {
        module
        for module in LAZY_CLOUD_IMPORTERS
        for node in ast.walk(modules[module])
        if isinstance(node, ast.ImportFrom) and _is_cloud(node.module or "")
    }
    assert lazy == LAZY_CLOUD_IMPORTERS


def _import_graph() -> dict[str, set[str]]:
    """{module: the gateway modules it imports}, counting every import statement wherever it
    stands: one inside a function or under TYPE_CHECKING only hides a cycle, it does not break
    it (the two modules still cannot be understood, or moved, one without the other)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, tree in modules.items():
        targets: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(node, module):
                while name and name not in modules:  # gateway.x.Name -> gateway.x
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycle_in_gateway() -> None:
    assert _cycles(_import_graph()) == []


MAX_MODULE_LINES = 700  # issue 12: a module past this has more than one reason to change


def test_no_module_in_gateway_is_over_700_lines() -> None:
    sizes = {
        str(path.relative_to(GATEWAY.parent)): len(path.read_text("utf-8").splitlines())
        for path in GATEWAY.rglob("*.py")
    }
    assert len(sizes) > 50  # the walk found the package
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert over == {}, f"split these along their seams: {over}"
