"""The package stays easy to hold in one's head: short functions, no import cycles, no outside references."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vmoe"
ROOT = PACKAGE.parent
MAX_FUNCTION_LINES = 80
# "SPEC 3", "SPEC 4-5", "SPEC.md": the design document that lived outside the repository.
_OUTSIDE_SPEC = re.compile(r"\bSPEC(\.md|\s*\d)")


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _function_lengths(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(f"{path.relative_to(root)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_over_80_lines():
    too_long = [(name, n) for path in _modules().values() for name, n in _function_lengths(path)
                if n > MAX_FUNCTION_LINES]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {too_long}"


def test_the_length_check_sees_long_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def f():\n{body}\n")
    assert _function_lengths(path, tmp_path) == [("long.py:1 f", MAX_FUNCTION_LINES + 1)]


def _module_level_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports when it is imported (module-level statements only)."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for target in targets:
            # "from .x import y": y may be a module or a name in x; keep what exists.
            if target in modules and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _module_level_imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _import_graph()
    assert "vmoe.models.upcycle" in graph["vmoe.models.build"]  # the graph sees relative imports
    assert "vmoe.models.build" not in graph["vmoe.models.upcycle"]
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


# Lower layers never import upper ones, not even inside a function.
_NOT_FROM = {"vmoe.moe": ("vmoe.models", "vmoe.train", "vmoe.viz", "vmoe.distributed", "vmoe.eval"),
             "vmoe.models": ("vmoe.train", "vmoe.viz", "vmoe.distributed", "vmoe.eval")}


def _all_imports(name: str, path: Path) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def test_layers_import_downwards_only():
    wrong = [(name, target) for name, path in _modules().items() for layer, upper in _NOT_FROM.items()
             if name == layer or name.startswith(layer + ".")
             for target in _all_imports(name, path) if target.startswith(upper)]
    assert not wrong, f"imports from an upper layer (see docs/design.md, Layering): {wrong}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("folder", ["vmoe", "tests", "scripts", "configs"])
def test_no_reference_to_the_outside_spec(folder):
    # The design is docs/design.md, in the repository; "SPEC n" pointed at a document outside it.
    hits = [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / folder).rglob("*"))
            if path.is_file() and path.suffix in {".py", ".md", ".yaml"} and path.name != Path(__file__).name
            for i, line in enumerate(path.read_text().splitlines(), 1) if _OUTSIDE_SPEC.search(line)]
    assert not hits, f"references to SPEC (point to docs/design.md instead): {hits}"


def test_design_doc_exists_and_readme_links_it():
    design = ROOT / "docs" / "design.md"
    assert design.is_file()
    text = design.read_text()
    for heading in ("Axis letters", "Capacity", "Batch Priority Routing", "Dispatch", "losses",
                    "Weight layout", "Checkpoint formats", "Expert parallelism"):
        assert heading.lower() in text.lower(), heading
    assert "docs/design.md" in (ROOT / "README.md").read_text()
