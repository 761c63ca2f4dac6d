"""The import graph of `semiseg/`, read with the standard library: no circle, and engine/ never imports semi/.

Every `import semiseg...` / `from semiseg... import` counts, function-local ones included.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semiseg"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the semiseg modules it imports}."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_semiseg_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40 and "semiseg.training" in graph["semiseg.workflow"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_engine_never_imports_semi():
    graph = import_graph()
    upward = {m: sorted(t for t in targets if t.startswith("semiseg.semi"))
              for m, targets in graph.items() if m.startswith("semiseg.engine")}
    assert not any(upward.values()), upward
