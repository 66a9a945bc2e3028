"""Listing every study without reading every study's attributes whole.

Anyone who shares the study database can store an attribute of any size on their own study, and
Optuna's `get_all_studies` (which `study list` and optuna-dashboard's study list and study lookup
call) reads every attribute of every study: one 256 MiB attribute took another user's `study list`
from 103 MiB to 871 MiB. Here a listing asks the database for the attributes it shows, each only
when it is at most a bound in size (a longer one is reported by its size, never sent), and a bounded
number of them per study. The gRPC storage proxy has no such query: through it, Optuna's listing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optuna.storages import BaseStorage

from .. import optuna_internals as internals
from .storage import autocommitted, backend

# An attribute a listing reads is at most this long (a stored spec is at most 64 KiB of YAML,
# contract/load.py; its JSON a few KiB): a longer one is reported, not read.
MOST_BYTES = 256 * 1024
# The dashboard's listing: at most this many attributes of each kind per study (the first by key).
MOST_PER_STUDY = 1000


@dataclass
class ListedStudy:
    """A study as a listing sees it: the attributes it asked for, decoded, and those it could not read
    (key -> why: too long to read, or not JSON)."""

    study_id: int
    name: str
    directions: list[Any]  # optuna's StudyDirection
    user_attrs: dict[str, Any] = field(default_factory=dict)
    unread: dict[str, str] = field(default_factory=dict)


def too_long(size: int) -> str:
    return f"is {size:,} bytes, more than a listing reads ({MOST_BYTES:,})"


def _decoded(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):
        return None, "is not JSON"


def _runner(storage: BaseStorage) -> Callable[[Any, dict[str, Any]], list[Any]] | None:
    if internals.rdb(storage) is None:
        return None
    return lambda statement, params: autocommitted(storage, statement, params)


def listed_studies(storage: BaseStorage, keys: tuple[str, ...]) -> list[ListedStudy]:
    """Every study with the user attributes `keys`, each read only when it is at most MOST_BYTES."""
    run = _runner(storage)
    if run is None:  # the proxy: Optuna's listing, which reads every attribute
        listed = []
        for s in storage.get_all_studies():
            shown = {k: s.user_attrs[k] for k in keys if k in s.user_attrs}
            listed.append(ListedStudy(internals.study_id(s), s.study_name, list(s.directions), shown))
        return listed
    directions = internals.study_directions(run)
    studies = {sid: ListedStudy(sid, name, directions.get(sid, [])) for sid, name in internals.study_ids_and_names(run)}
    for sid, key, text, size in internals.bounded_study_attrs(run, backend(storage), "user", MOST_BYTES, keys):
        study = studies.get(sid)
        if study is None:
            continue  # a study made between the two queries
        if text is None:
            study.unread[key] = too_long(size)
            continue
        value, problem = _decoded(text)
        if problem is None:
            study.user_attrs[key] = value
        else:
            study.unread[key] = problem
    return list(studies.values())


def bounded_studies(storage: BaseStorage) -> list[internals.FrozenStudy]:
    """What `get_all_studies` returns, each study's attributes bounded: at most MOST_PER_STUDY of
    each kind, and of those only the ones at most MOST_BYTES long and valid JSON. A user attribute
    left out is shown as such (a line in its place); a system attribute (optuna-dashboard's notes,
    artifact records) left out is absent."""
    run = _runner(storage)
    if run is None:
        return storage.get_all_studies()
    directions = internals.study_directions(run)
    ids = internals.study_ids_and_names(run)
    attrs: dict[str, dict[int, dict[str, Any]]] = {"user": {}, "system": {}}
    for which, found in attrs.items():
        for sid, key, text, size in internals.bounded_study_attrs(run, backend(storage), which, MOST_BYTES, None, MOST_PER_STUDY):
            value, problem = _decoded(text) if text is not None else (None, too_long(size))
            if problem is None:
                found.setdefault(sid, {})[key] = value
            elif which == "user":
                found.setdefault(sid, {})[key] = f"(not shown: it {problem})"
    return [
        internals.frozen_study(sid, name, directions.get(sid, []), attrs["user"].get(sid, {}), attrs["system"].get(sid, {}))
        for sid, name in ids
    ]


class BoundedListing(BaseStorage):
    """A storage that lists studies with bounded attributes (bounded_studies) and hands every other
    call to `inner`: what optuna-dashboard is given, since it lists studies, and looks each study up,
    through `get_all_studies`."""

    def __init__(self, inner: BaseStorage) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being built): no lookup through itself
            raise AttributeError(name)
        return getattr(self.inner, name)

    def get_all_studies(self) -> list[internals.FrozenStudy]:
        return bounded_studies(self.inner)


def _handed_on(name: str) -> Callable[..., Any]:
    def method(self: BoundedListing, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name, _member in list(vars(BaseStorage).items()):
    if callable(_member) and not _name.startswith("__") and _name != "get_all_studies":
        setattr(BoundedListing, _name, _handed_on(_name))
BoundedListing.__abstractmethods__ = frozenset()
