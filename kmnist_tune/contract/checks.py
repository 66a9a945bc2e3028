"""One row of `kmnist-tune doctor`: what was checked, how it stands, and why. Each layer checks what it
owns (training: the device, the compile, the data files; service: the storage, the compiler, the
settings) and hands back rows of this one type; the CLI orders and prints them (imports nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
STATUSES = (OK, WARN, FAIL, SKIP)


@dataclass(frozen=True)
class Check:
    """`status`: ok; warn (a worker works here, but slower or with less than it could); FAIL (a worker
    would not work here); skip (nothing to check: no storage given, no GPU to probe)."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status {self.status!r} is not one of {STATUSES}")

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **({"data": self.data} if self.data else {})}


def failing_first(checks: list[Check]) -> list[Check]:
    """The rows as a user reads them: the failing ones first (the reason for the exit status), then the
    rest in the order they were checked."""
    return [c for c in checks if c.status == FAIL] + [c for c in checks if c.status != FAIL]


def table(checks: list[Check]) -> list[str]:
    """One plain line per check: name, status, detail (columns padded to the widest name)."""
    width = max((len(c.name) for c in checks), default=0)
    return [f"{c.name:<{width}}  {c.status:<4}  {c.detail}" for c in failing_first(checks)]


def verdict(checks: list[Check]) -> tuple[bool, str]:
    """Whether a worker would work here, and the line that says so."""
    failed = [c.name for c in checks if c.status == FAIL]
    warned = sum(c.status == WARN for c in checks)
    if failed:
        return False, f"a worker would not work here: {len(failed)} check(s) failed ({', '.join(failed)})"
    return True, "a worker would work here" + (f" ({warned} warning{'s' if warned > 1 else ''})" if warned else "")
