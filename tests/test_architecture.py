"""The house rules the import graph must keep: dependencies point down (docs: README, Layout of the code)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alm_kit"
#: what a component (a built-in plugin) may import from alm-kit, besides its own folder
COMPONENT_ALLOWED = ("interfaces", "nn", "audio", "text", "errors", "registry")
COMPONENT_ROOMS = ("encoders", "fusion", "projectors", "layouts", "decoders")


def imports_of(path: Path) -> set[str]:
    """Every alm_kit module a file imports, at the top or inside functions (not for type checking only)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if n.startswith("alm_kit"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("alm_kit"))
    return found


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_components_import_only_the_shared_low_rooms():
    wrong = []
    for room in COMPONENT_ROOMS:
        for path in (PACKAGE / room).rglob("*.py"):
            for name in imports_of(path):
                top = name.split(".")[1] if "." in name else ""
                if top not in (*COMPONENT_ALLOWED, room, "_version"):
                    wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    modules = {module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            while imported and imported not in modules:  # `from pkg.mod import name` -> pkg.mod
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not modules[imported].name == "__init__.py":
                targets.add(imported)
        graph[name] = targets
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if nxt not in state and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), " -> ".join(cycle)


def test_inference_and_the_model_never_import_the_training_engine():
    for path in [PACKAGE / "model.py", *(PACKAGE / "inference").rglob("*.py")]:
        assert not [n for n in imports_of(path) if n.startswith("alm_kit.training")], path
    code = ("import sys, alm_kit.inference.api, alm_kit.inference.engine, alm_kit.inference.server; "
            "print(sorted(m for m in sys.modules if m.startswith('alm_kit.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"
