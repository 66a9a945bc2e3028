"""pyproject.toml pins fastai to the versions the fast training loop (training/loop.py, which overrides
fastai internals) was checked against: its upper bound is the fastai this suite runs on. Raising the
pin without running the suite (test_loop.py above all) on the new fastai fails here."""

from __future__ import annotations

import importlib.metadata
import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version


def fastai_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "fastai"]
    return req


def test_the_fastai_pin_ends_at_the_version_tested() -> None:
    req = fastai_requirement()
    installed = Version(importlib.metadata.version("fastai"))
    uppers = [s for s in req.specifier if s.operator in ("<=", "==")]
    assert len(uppers) == 1, f"pyproject.toml's fastai pin {req} needs one `<=` bound: the version the suite ran on"
    assert Version(uppers[0].version) == installed, (
        f"pyproject.toml pins {req} but the suite runs on fastai {installed}: run the suite on "
        f"fastai {uppers[0].version} (tests/test_loop.py), or set the bound to {installed}"
    )
    assert req.specifier.contains(installed)
