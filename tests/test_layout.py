"""The package's layout rules, checked on its source: imports flow one way (no cycle, counting imports
inside functions), the model knows nothing of distribution, and every function fits a screen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "gpt2lab").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere (functions included), by module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
            found |= submodules or {node.module}
    return found & modules.keys()


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, target])
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_model_code_never_imports_distribution_or_io():
    modules = _modules()
    for name in ("model", "kv_cache", "rope", "ops", "config"):
        path = SRC / "gpt2lab" / f"{name}.py"
        ours = _imports(path, modules)
        assert not ours & {"gpt2lab.load", "gpt2lab.hf", "gpt2lab.checkpoint", "gpt2lab.files"}, name
        assert "torch.distributed" not in path.read_text(), name


def test_every_function_fits_a_screen():
    long = []
    for path in (SRC / "gpt2lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps: " + ", ".join(long)


# What a test would need to reach a folder beside the repository: its name, or a path two levels up.
# Spelled in pieces, so that this file does not itself hold the strings it looks for.
OUTSIDE_THE_REPOSITORY = ('"' + "sha" + 'red"', "parents" + "[2]")


def test_tests_are_hermetic():
    """A user's clone has only this repository: no test reads a folder beside it."""
    for path in Path(__file__).parent.glob("*.py"):
        source = path.read_text()
        assert not any(s in source for s in OUTSIDE_THE_REPOSITORY), path.name
