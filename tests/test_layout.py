"""The package's layout rules, checked on its source: imports flow one way (no cycle, counting imports
inside functions), the model knows nothing of distribution, and every function fits a screen."""

from __future__ import annotations

import ast
import re
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


def test_the_code_map_lists_what_each_module_imports():
    """docs/architecture.md's code map names, for each module, the package's modules it imports (errors
    and files aside: imported anywhere): no more and no fewer. The command table imports everything
    below it, and the tokenizer the one exception the map states."""
    modules = _modules()
    short = {name: name.removeprefix("gpt2lab.").split(".")[0] for name in modules}
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    table = text.split("| module | owns | imports |")[1].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) > 15
    wrong = []
    for names_cell, _, imports_cell in rows:
        names = set(re.findall(r"`(\w+)(?:\.py|/)`", names_cell))
        if names == {"cli"}:
            continue
        paths = [path for name, path in modules.items() if short[name] in names]
        found = {short[m] for path in paths for m in _imports(path, modules)} - names - {"errors", "files", ""}
        if names == {"tokenizer"}:
            found -= {"checkpoint"}
        listed = set(re.findall(r"\w+", imports_cell)) & set(short.values()) - names - {"errors", "files"}
        if found != listed:
            wrong.append(f"{sorted(names)}: imports {sorted(found)}, the map says {sorted(listed)}")
    assert not wrong, wrong


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
