"""Reading a sweep spec: a YAML file (or a mapping read back from a study) into a validated SweepSpec.

The file is bounded before it is parsed (size, nesting), read with a loader that refuses duplicate
keys, translated from W&B's sweep vocabulary when it is a W&B file (contract/wandb.py), and validated
(contract/spec.py); every failure is one SpecError line that names the place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .spec import ParamSpec, SpecError, SweepSpec, did_you_mean, non_finite
from .wandb import TranslationError, translate

MAX_SPEC_BYTES = 64 * 1024  # a spec is a page of settings; it is stored in the study and read by every worker
# The deepest real spec is 4 levels (sampler.options.x0.lr, parameters.lr.values); YAML and pydantic recurse
# per level, so a deeper one is refused before either builds it.
MAX_SPEC_DEPTH = 20
TOO_DEEP = f"nested more than {MAX_SPEC_DEPTH} levels deep; a spec is a few levels of plain settings: write it out flat"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at a location, to suggest a fix for a typo."""
    model: Any = SweepSpec
    for part in loc[:-1]:
        if model is SweepSpec and part == "parameters":
            model = "params"
            continue
        if model == "params":
            model = ParamSpec
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


_UNION_MEMBERS = ("int", "float")  # pydantic names the member of `int | float` it tried in the location


def _first_problem(err: ValidationError) -> str:
    errors = err.errors()
    for e in errors:
        e["loc"] = tuple(p for p in e["loc"] if p not in _UNION_MEMBERS)
    # One problem per place: `int | float` reports each member's failure at the same field.
    errors = list({e["loc"]: e for e in reversed(errors)}.values())[::-1]
    # An unknown key is reported first: a misspelt `budgte` also makes `budget` missing, and
    # "budget: required but missing" alone would hide the typo that caused it.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        parent = ".".join(str(p) for p in loc[:-1]) or "the top level"
        msg = f"unknown key {key!r} in {parent}{did_you_mean(key, _fields_at(loc))}"
    elif first["type"] == "missing":
        msg = f"{where}: required but missing"
    elif first["type"] == "finite_number":
        msg = f"{where}: {non_finite(float(first['input']))} is not a usable number; give a finite value"
    else:
        text = first["msg"].removeprefix("Value error, ")
        msg = f"{where}: {text}" if loc else text
        if first["type"] == "literal_error" or first["type"].endswith("_type") or first["type"].endswith("_parsing"):
            msg += f" (got {first.get('input')!r})"
    more = len(errors) - 1
    return msg + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_spec(data: Any, source: str = "spec", default_name: str | None = None) -> SweepSpec:
    """A spec from its YAML mapping; `default_name` names a W&B sweep file's study when it has no
    `name` (W&B's own sweeps make one up)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping (key: value lines), got {type(data).__name__}")
    if _expanded_size(data, MAX_SPEC_BYTES) > MAX_SPEC_BYTES:
        # YAML aliases repeat one node many times: 354 bytes of nested aliases expand to megabytes.
        raise SpecError(
            f"{source}: the spec expands to more than {MAX_SPEC_BYTES // 1024} KB (nested YAML aliases or huge values); "
            "write the settings out plainly"
        )
    # After the size check, which bounds how many nodes this walk can visit (aliases share nodes).
    if _depth(data, MAX_SPEC_DEPTH) > MAX_SPEC_DEPTH:
        raise SpecError(f"{source}: {TOO_DEEP}")
    try:
        try:
            data, notes = translate(data, default_name)
        except TranslationError as e:
            raise SpecError(f"{source}: {e}") from None
        try:
            spec = SweepSpec.model_validate(data)
        except ValidationError as e:
            raise SpecError(f"{source}: {_first_problem(e)}") from None
    except RecursionError:  # not expected below MAX_SPEC_DEPTH; still one line, never a crash
        raise SpecError(f"{source}: {TOO_DEEP}") from None
    spec.add_notes(notes)
    return spec


def _expanded_size(data: Any, limit: int) -> int:
    """Roughly how many bytes `data` takes written out with every alias expanded; stops counting
    once past `limit`, so a billion laughs costs no more than the limit to measure."""
    size, stack = 0, [data]
    while stack and size <= limit:
        node = stack.pop()
        if isinstance(node, dict):
            size += 2 + 2 * len(node)
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            size += 2 + len(node)
            stack.extend(node)
        else:
            size += len(str(node))
    return size


def _depth(data: Any, limit: int) -> int:
    """How many containers deep `data` goes (a scalar: 0); without recursion, and stops once past `limit`."""
    deepest, stack = 0, [(data, 1)]
    while stack and deepest <= limit:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _yaml_too_deep(text: str) -> int | None:
    """The line where the YAML text nests deeper than MAX_SPEC_DEPTH (None: it does not). PyYAML's parser
    yields events without recursing, so this stops at the first level too many, before anything is built."""
    depth = 0
    for event in yaml.parse(text, Loader=_UniqueKeyLoader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_SPEC_DEPTH:
                return event.start_mark.line + 1
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1
    return None


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist; pass a YAML spec such as sweeps/quickstart.yaml")
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: {p.stat().st_size:,} bytes; a spec is at most {MAX_SPEC_BYTES // 1024} KB")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a UTF-8 text file; pass a YAML spec") from None
    try:
        line = _yaml_too_deep(text)
        if line is not None:
            raise SpecError(f"{p}: at line {line}: {TOO_DEEP}")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe_load semantics
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML{_yaml_problem(e, text)}") from None
    except RecursionError:  # PyYAML builds nodes recursively: a long chain of aliases, each holding the last
        raise SpecError(f"{p}: {TOO_DEEP}") from None
    return parse_spec(data, str(p), default_name=p.stem)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`; explicit keys may override it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-5` and `3e4` as strings: it wants a dot and a signed exponent. W&B
# users write them as numbers, and so does YAML 1.2; read them as floats everywhere in a spec.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """' at line N: what is wrong', on one line (PyYAML's own str() spans several)."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):
        # Raised for control characters such as NUL; it carries a character offset, not a mark.
        line = text.count("\n", 0, max(e.position, 0)) + 1
        code = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "?")
        return f" at line {line}: unacceptable character #x{code:04x} (control characters are not allowed)"
    at = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{at}: {problem}"
