"""No name that the installed Optuna deprecates appears in the package.

The test suite fails on any FutureWarning Optuna raises about our calls (pyproject's filterwarnings),
but a deprecation only warns where Optuna's decorator runs: a static method reached through a
deprecated alias class (`RetryFailedTrialCallback.retry_history`) or a code path the tests do not take
never warns. So the names are read from Optuna's own source, as its decorators and warning templates
mark them, and looked for in every module of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import optuna
from conftest import REPO

OPTUNA_SRC = Path(optuna.__file__).parent
_TEMPLATE_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def deprecated_names() -> tuple[set[str], set[str], set[str]]:
    """(class and function names, method names, keyword or module names) deprecated in the installed Optuna."""
    top, methods, other = set(), set(), set()
    for path in OPTUNA_SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and any(
                _decorator_name(d) in ("deprecated_class", "deprecated_func") for d in node.decorator_list
            ):
                top.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and any(
                        _decorator_name(d) == "deprecated_func" for d in item.decorator_list
                    ):
                        methods.add(item.name)
            # `_DEPRECATION_WARNING_TEMPLATE.format(name="`failed_trial_callback`", ...)`: an argument or a module.
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
                value = node.func.value
                if _decorator_name(value) == "_DEPRECATION_WARNING_TEMPLATE":
                    for kw in node.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                            other.update(m.split(".")[-1] for m in _TEMPLATE_NAME.findall(kw.value.value))
    top -= methods  # a method name is only a problem when reached as one
    return top, methods, other


def uses(path: Path, top: set[str], methods: set[str], other: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = None
        if isinstance(node, ast.Name) and node.id in top:
            name = node.id
        elif isinstance(node, ast.Attribute) and (node.attr in top or node.attr in methods):
            name = node.attr
        elif isinstance(node, ast.keyword) and node.arg in other:
            name = node.arg
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] in other:
            name = node.module
        elif isinstance(node, ast.alias) and (node.name in top or node.name.split(".")[-1] in other):
            name = node.name
        if name is not None:
            found.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')} uses {name}")
    return found


def test_the_deprecated_names_are_read_from_optuna() -> None:
    top, methods, other = deprecated_names()
    # What Optuna 4.9 deprecated on the way to 6.0, and what this project once called.
    assert "RetryFailedTrialCallback" in top and "get_failed_trial_callback" in methods and "failed_trial_callback" in other


def test_the_package_uses_no_name_optuna_deprecates() -> None:
    names = deprecated_names()
    found = [line for path in sorted((REPO / "kmnist_tune").rglob("*.py")) for line in uses(path, *names)]
    assert not found, "deprecated Optuna names:\n" + "\n".join(found)
