"""Typed dataclass configs: documented fields, strict loading from dicts, dotted overrides.

The dataclasses in `orchestrator.config` are the schema. YAML files hold values only; this
module turns nested dicts into those dataclasses, refusing unknown keys and values of the
wrong type with a message that names the full dotted key and what to do about it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

# The error and the documented-field helper are defined with the model's config (the lowest
# layer, which imports nothing from orchestrator/); the whole config tree uses these two.
from models.config import ConfigError, doc

__all__ = ["ConfigError", "doc", "section", "coerce", "from_dict", "to_dict", "parse_overrides"]


def section(cls: type, help: str) -> Any:
    """A nested config section."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally convert) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} is not a valid {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r} must be null")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r} is not one of {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {coerce(k, key_tp, key): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (a mapping of keys), got {value!r}")
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from `data`, starting from `base` (or the defaults); strict."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    obj = base if base is not None else cls()
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'{hint} Known keys here: {', '.join(fields)}. "
                "See `orchestrator config --reference` for every key."
            )
        tp = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, from_dict(tp, value, key, base=current))
        else:
            setattr(obj, name, coerce(value, tp, key))
    return obj


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config (for YAML and checkpoints)."""
    return dataclasses.asdict(obj)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for dotted='a.b' (creating sections as needed)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """`--a.b 1 --c.d=x` -> {'a': {'b': 1}, 'c': {'d': 'x'}}; values are parsed as YAML scalars."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like `--section.key value`"
            )
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value: write `{arg} VALUE`")
            raw = args[i + 1]
            i += 2
        set_dotted(tree, key.replace("-", "_"), yaml.safe_load(raw) if raw != "" else "")
    return tree


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field, for docs and `--reference`."""
    rows = []
    hints = typing.get_type_hints(cls)
    obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference(tp, key))
        else:
            rows.append(
                (key, _type_name(tp), repr(getattr(obj, f.name)), f.metadata.get("help", ""))
            )
    return rows
