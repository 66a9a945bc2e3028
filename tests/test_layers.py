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
RULES: dict[str, tuple[set[str], set[str]]] = {
    "contract": ({"contract", "errors", "masking"}, HEAVY),
    "training": ({"training", "contract.spec", "contract.records", "errors", "masking", "signing"}, OPTUNA),
    "service": ({"service", "contract", "errors", "masking", "signing", ""}, HEAVY),
    "observe": ({"observe", "service", "contract", "errors", "masking"}, HEAVY),
    "recipe": ({"recipe", "training", "service", "observe", "contract", "errors", "masking", "signing"}, set()),
    "cli": ({"cli", "recipe", "training", "service", "observe", "contract", "errors", "masking", "signing", ""}, set()),
}


def modules(layer: str) -> list[Path]:
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
