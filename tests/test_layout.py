"""The package layout holds: the edge runtime never loads the cloud side.

Both checks read the code as it is: one imports the edge in a fresh interpreter and looks at
``sys.modules``, the other walks ``gateway/`` with ``ast`` so a lazy import in the wrong place is
caught even when no test happens to run it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import gateway

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


def test_the_edge_runtime_never_loads_the_cloud_side() -> None:
    edge = sorted(
        name
        for name in _modules()
        if not _is_cloud(name) and name not in {"gateway.__main__", "gateway.cli"}
    )
    script = (
        "import importlib, json, sys\n"
        "import gateway.app, gateway.cli\n"
        f"for name in {edge!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    loaded = json.loads(out)
    assert "gateway.app" in loaded and "gateway.sessions" in loaded
    assert [name for name in loaded if _is_cloud(name)] == []


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
