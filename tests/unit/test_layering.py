"""The package is built in floors: each module imports only from its own floor or below, and nothing in a cycle.

Counted with the imports inside functions and the ones under ``if TYPE_CHECKING:`` (annotations count: a
reader who follows a type to its module walks those edges too, so a lower floor that needs the recipe's type
takes ``specs.RecipeSpec``, not ``recipe.schema.Recipe``).
An import sits inside a function only when what it imports is heavy (it imports torch,
transformers, TRL, ... at module level, directly or through the tunelab modules it imports):
laziness is for a fast ``tunelab --help`` and fast recipe errors, never to hide a cycle. The one
other place is the CLI's command bodies: each imports what its command runs, so that ``tunelab
--help`` and shell completion import no subsystem (0.13 s instead of 0.33 s, measured).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tunelab"

# bottom to top (DESIGN.md); a module may import from its own floor or lower ones
FLOORS = [
    ("tunelab", "tunelab.errors", "tunelab.log", "tunelab.runs", "tunelab.specs", "tunelab.report"),
    ("tunelab.data", "tunelab.distributed"),
    ("tunelab.patches",),
    ("tunelab.models", "tunelab.eval"),
    ("tunelab.rewards",),
    ("tunelab.methods",),
    ("tunelab.recipe",),
    ("tunelab.train", "tunelab.plan", "tunelab.launch", "tunelab.convert", "tunelab.serve"),
    ("tunelab.cli", "tunelab.__main__"),
]
LAZY_ENTRY_POINTS = {"tunelab.cli"}  # command bodies import their command's modules (see the docstring)
HEAVY = {"torch", "transformers", "trl", "peft", "datasets", "deepspeed", "accelerate", "safetensors", "matplotlib",
         "gguf", "bitsandbytes", "numpy", "pandas", "pyarrow", "tensorboard"}


def floor(module: str) -> int:
    best = None
    for i, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, f"{module} is on no floor: add it to FLOORS (and to DESIGN.md's layout)"
    return best[0]


def modules(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path = SRC) -> tuple[dict[str, dict[str, tuple[bool, int]]], dict[str, set[str]]]:
    """(tunelab module -> {imported tunelab module: (inside a function, line)}, module -> heavy libraries it
    imports at module level). An import under ``if TYPE_CHECKING:`` is an edge like any other (never run, so it
    makes no module heavy); ``TYPING_ONLY`` holds those edges."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, dict[str, tuple[bool, int]]] = {}
    heavy: dict[str, set[str]] = {}
    TYPING_ONLY.clear()
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out: dict[str, tuple[bool, int]] = {}
        libs: set[str] = set()

        def add(target: str | None, lazy: bool, line: int, typing: bool) -> None:
            if target and target != mod and (target not in out or out[target][0] and not lazy):
                out[target] = (lazy, line)
            if target and not typing:
                TYPING_ONLY.discard((mod, target))
            elif target and target != mod and out[target][1] == line:
                TYPING_ONLY.add((mod, target))

        def visit(node: ast.AST, lazy: bool, typing: bool = False) -> None:
            for child in ast.iter_child_nodes(node):
                guard = isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING"
                inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name.startswith("tunelab"):
                            add(resolve(alias.name), inner, child.lineno, typing)
                        elif not inner and not typing:
                            libs.add(alias.name.split(".")[0])
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([child.module] if child.module else []))
                    if base.startswith("tunelab"):
                        for alias in child.names:
                            full = f"{base}.{alias.name}"
                            add(resolve(full) if full in mods else resolve(base), inner, child.lineno, typing)
                    elif not inner and not typing:
                        libs.add(base.split(".")[0])
                visit(child, inner, typing or guard)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
        edges[mod] = out
        heavy[mod] = libs & HEAVY
    return edges, heavy


TYPING_ONLY: set[tuple[str, str]] = set()  # (module, imported module) seen only under ``if TYPE_CHECKING:``


def cycles(edges: dict[str, dict[str, tuple[bool, int]]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            strong(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_cycles(graph):
    edges, _ = graph
    found = cycles(edges)
    detail = [f"{' <-> '.join(group)}: " + "; ".join(f"{a} -> {b} (line {edges[a][b][1]})" for a in group
                                                     for b in edges[a] if b in group) for group in found]
    assert not found, "modules that import each other, directly or through others:\n" + "\n".join(detail)


def test_no_module_imports_a_higher_floor(graph):
    edges, _ = graph
    upward = [f"{a} (floor {floor(a)}) -> {b} (floor {floor(b)}), line {line}"
              for a, out in edges.items() for b, (_, line) in out.items() if floor(b) > floor(a)]
    assert not upward, "imports of a higher floor:\n" + "\n".join(sorted(upward))


def test_imports_inside_functions_are_only_of_heavy_modules(graph):
    edges, heavy = graph

    def is_heavy(mod: str, seen: frozenset[str] = frozenset()) -> bool:
        return bool(heavy[mod]) or any(is_heavy(b, seen | {mod}) for b, (lazy, _) in edges[mod].items()
                                       if not lazy and b not in seen and (mod, b) not in TYPING_ONLY)

    light = [f"{a}:{line} imports {b} inside a function, which imports nothing heavy: import it at module level"
             for a, out in edges.items() if a not in LAZY_ENTRY_POINTS
             for b, (lazy, line) in out.items() if lazy and not is_heavy(b)]
    assert not light, "\n".join(sorted(light))


def test_the_checks_find_a_planted_cycle(tmp_path):
    """Not vacuous: an upward import planted inside a function of a copy of the tree is a cycle and an upward import."""
    import shutil

    copy = tmp_path / "tunelab"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    specs = copy / "specs.py"
    specs.write_text(specs.read_text() + "\n\ndef _planted():\n    from tunelab.recipe.schema import Recipe\n")
    edges, _ = import_graph(copy)
    assert any("tunelab.specs" in group and "tunelab.recipe.schema" in group for group in cycles(edges))
    assert edges["tunelab.specs"]["tunelab.recipe.schema"][0]  # seen, and seen as inside a function
    assert floor("tunelab.recipe.schema") > floor("tunelab.specs")


def test_an_annotation_import_counts(tmp_path):
    """An import under ``if TYPE_CHECKING:`` closes a circle too: the 23-module one the recipe's type once made."""
    import shutil

    copy = tmp_path / "tunelab"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "distributed" / "config.py"
    config.write_text(config.read_text() + "\n\nif TYPE_CHECKING:\n    from tunelab.recipe.schema import Recipe\n")
    edges, heavy = import_graph(copy)
    assert any("tunelab.distributed.config" in group and "tunelab.recipe.schema" in group for group in cycles(edges))
    assert ("tunelab.distributed.config", "tunelab.recipe.schema") in TYPING_ONLY


# test files that are not named after one module, and why
NOT_A_MODULE = {"test_layering.py": "the package as a whole",
                "eval/test_long_context_eval.py": "eval/long_context.py (tests/integration has a test_long_context.py)",
                "rewards/test_init.py": "rewards/__init__.py",
                "data/test_malformed_files.py": "the malformed-file corpus: data/sources.py and data/formats.py "
                                                "through validate and the CLI"}


def test_unit_tests_mirror_the_source_tree():
    """tests/unit/<package>/test_<module>.py tests src/tunelab/<package>/<module>.py; every folder is a package."""
    units = SRC.parents[1] / "tests" / "unit"
    stray = []
    for test in sorted(units.rglob("test_*.py")):
        rel = test.relative_to(units)
        module = SRC / rel.parent / rel.name.removeprefix("test_")
        if str(rel) not in NOT_A_MODULE and not module.is_file() and not (module.with_suffix("") / "__init__.py").is_file():
            stray.append(f"{rel}: no src/tunelab/{rel.parent / rel.name.removeprefix('test_')}")
    packages = [d for d in [units, *units.rglob("*")] if d.is_dir() and d.name != "__pycache__"]
    stray += [f"{d.relative_to(units)}/ has no __init__.py" for d in packages if not (d / "__init__.py").is_file()]
    assert not stray, "\n".join(stray)
