"""The package's rooms keep their boundaries: what each layer may import, read from every import
statement (lazy ones inside functions too), and checked by importing the layers in fresh interpreters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "kmnist_tune"
HEAVY = {"torch", "torchvision", "fastai", "fastcore"}
OPTUNA = {"optuna", "optuna_dashboard", "optuna_integration"}

# layer -> (the package's own modules it may import, third-party packages it must not import)
# optuna_internals is the one door to Optuna's private parts: every layer that uses Optuna may use it.
RULES: dict[str, tuple[set[str], set[str]]] = {
    "contract": ({"contract", "errors", "masking", "optuna_internals"}, HEAVY),
    "training": ({"training", "contract.spec", "contract.records", "contract.checks", "errors", "masking", "signing"}, OPTUNA),
    "service": ({"service", "contract", "errors", "masking", "signing", "optuna_internals", ""}, HEAVY),
    "observe": ({"observe", "service", "contract", "errors", "masking", "signing", "optuna_internals"}, HEAVY),
    "recipe": (
        {"recipe", "training", "service", "observe", "contract", "errors", "masking", "signing", "optuna_internals"},
        set(),
    ),
    "cli": (
        {
            "cli",
            "recipe",
            "training",
            "service",
            "observe",
            "contract",
            "errors",
            "masking",
            "signing",
            "secret_files",
            "optuna_internals",
            "",
        },
        set(),
    ),
    # The package's top-level modules (errors, masking, signing, the door): below every layer. The
    # entry point (__main__.py) is the CLI's.
    "top": ({"errors", "masking", "contract.records"}, HEAVY),
}


def modules(layer: str) -> list[Path]:
    if layer == "top":
        return sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")
    return sorted((PACKAGE / layer).glob("*.py"))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of the package."""
    package = ("kmnist_tune." + path.parent.relative_to(PACKAGE).as_posix().replace("/", ".")).rstrip(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
                # `from . import x` / `from .. import x`: the names may be modules themselves
                found += [(node.lineno, f"{name}.{a.name}") for a in node.names] if not node.module else [(node.lineno, name)]
            else:
                found.append((node.lineno, node.module or ""))
    return found


def own(name: str) -> str | None:
    """`kmnist_tune.service.storage` -> `service.storage`; `kmnist_tune` -> ``; others None."""
    if name == "kmnist_tune" or name.startswith("kmnist_tune."):
        return name.removeprefix("kmnist_tune").removeprefix(".")
    return None


@pytest.mark.parametrize("layer", sorted(RULES))
def test_every_import_statement_keeps_the_layer_rules(layer: str) -> None:
    allowed, forbidden = RULES[layer]
    assert modules(layer), f"kmnist_tune/{layer}/ has no modules"
    problems = []
    for path in modules(layer):
        for line, name in imports_of(path):
            mine = own(name)
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            if mine is None:
                if name.split(".")[0] in forbidden:
                    problems.append(where)
            elif mine.startswith("__"):  # kmnist_tune.__version__ via `from .. import __version__`
                continue
            elif not any(mine == a or mine.startswith(a + ".") if a else mine == "" for a in allowed):
                problems.append(where)
    assert not problems, "layer boundary crossed:\n" + "\n".join(problems)


def test_the_space_is_the_only_contract_module_that_imports_optuna() -> None:
    users = {p.name for p in modules("contract") for _, n in imports_of(p) if n.split(".")[0] in OPTUNA}
    assert users == {"space.py"}


def fresh_import(names: list[str]) -> set[str]:
    """The top-level packages in sys.modules after importing `names` in a new interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def module_names(*layers: str) -> list[str]:
    return [f"kmnist_tune.{layer}.{p.stem}" for layer in layers for p in modules(layer) if p.stem != "__init__"]


def test_torch_free_layers_import_without_torch_or_fastai() -> None:
    names = [*module_names("contract", "service", "observe", "cli"), "kmnist_tune.training.data", "kmnist_tune.masking"]
    loaded = fresh_import(names)
    assert "optuna" in loaded and "kmnist_tune" in loaded  # the imports really happened
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_training_imports_without_optuna() -> None:
    loaded = fresh_import(module_names("training"))
    assert {"torch", "fastai"} <= loaded
    assert not loaded & OPTUNA, sorted(loaded & OPTUNA)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports, lazy imports included (a
    `from .x import name` counts as importing x, or x.name where that is a module)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for _, target in imports_of(path):
            for candidate in (target, target.rsplit(".", 1)[0]):
                if candidate in paths and candidate != name:
                    edges.add(candidate)
                    break
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_lazy_imports_included() -> None:
    graph = import_graph()
    assert "kmnist_tune.service.storage" in graph and graph["kmnist_tune.service.claims"]  # the graph is real
    assert cycles(graph) == [], "modules that import each other (move code to where its dependencies point)"
