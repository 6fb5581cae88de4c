"""The engine's modules import each other in one direction: no import circle, a lazy import inside a function
included (a reader follows the data from prompts to the LoRA file without going round in circles)."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "prdp_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each engine module -> the engine modules it imports anywhere in its code."""
    modules = {_module_name(path): path for path in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def test_no_import_circles():
    graph, circles = _imports(), []

    def walk(start, module, path):
        for target in graph[module]:
            if target == start:
                circles.append(" -> ".join([*path, start]))
            elif target not in path:
                walk(start, target, [*path, target])
    for module in graph:
        walk(module, module, [module])
    assert circles == []
    assert "prdp_core.lora_weights" in graph["prdp_core.checkpoints"]  # the graph does see the imports
