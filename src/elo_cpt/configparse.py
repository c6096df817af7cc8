"""Reading a configuration: YAML values and `key=value` overrides applied onto typed dataclasses (values coerced to
each field's type, unknown keys refused), the fields' docstrings for help output, and differences between two
configurations. A leaf module, independent of which dataclasses it is given (`config` holds elo-cpt's).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing

import yaml

from elo_cpt.errors import EloError


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[stmt.target.id] = str(nxt.value.value)
    return docs


def describe(config: object, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, docstring) for every setting of the dataclass `config` and its sections, for help output."""
    rows = []
    docs = field_docs(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
    return rows


def coerce(value: object, annotation: object, key: str) -> object:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for arg in members:  # the first member that takes the value
            try:
                return coerce(value, arg, key)
            except EloError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in members)
        raise EloError(f"config key {key!r} expects {names}, got {value!r}")
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        # YAML reads `1e-5` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if origin is list:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            return [coerce(v, args[0], key) for v in value]
    if origin is dict and isinstance(value, dict):
        return {str(k): coerce(v, args[1], key) for k, v in value.items()}
    expected = origin or annotation
    if isinstance(expected, type) and isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise EloError(f"config key {key!r} expects {getattr(annotation, '__name__', annotation)}, got {value!r}")


def apply_values(obj: object, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            known = ", ".join(sorted(f"{prefix}{n}" for n in names))
            raise EloError(f"unknown config key {key!r}; known keys here: {known}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise EloError(f"config key {key!r} is a section; set its fields, e.g. {key}.lr=1e-5")
            apply_values(current, value, f"{key}.")
        else:
            setattr(obj, name, coerce(value, hints[name], key))


def nest(flat: dict) -> dict:
    """Turn dotted keys (`stage1.lr: 1e-5`) into nested sections; nested values pass through."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return nested


def parse_overrides(pairs: list[str]) -> dict:
    """Turn `a.b=value` strings into a nested dict (through `nest`), values parsed as YAML scalars/lists."""
    flat: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise EloError(f"bad override {pair!r}; write key=value, e.g. stage1.lr=1e-5")
        flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return nest(flat)


def flatten(values: dict) -> dict:
    """A config dict with its sections as dotted keys, one level deep ({"stage1": {"lr": 1e-5}} -> {"stage1.lr": 1e-5});
    settings whose values are dicts (data.eval) stay whole."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting two (nested) config dicts disagree on, in key order."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
