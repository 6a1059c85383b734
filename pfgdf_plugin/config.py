"""Typed, validated configs from plain dicts (YAML), with every error reported at once."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Tuple, Type, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, path: str, errors: List[str]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            trial: List[str] = []
            out = _convert(value, a, path, trial)
            if not trial:
                return out
        errors.append(f"{path} must be {_type_name(tp)}, got {value!r}")
        return None
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path} must be {_type_name(tp)}, got {value!r}")
            return None
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, inner, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            errors.append(f"{path} must be a mapping, got {value!r}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{path} must be {_type_name(tp)}, got {value!r}")
    return None


def from_dict(cls: Type[T], data: Any, path: str = "", errors: List[str] = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors.

    With ``errors`` given, problems are appended there; otherwise a :class:`ConfigError` is raised.
    """
    own = errors is None
    errors = [] if own else errors
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or 'recipe'} must be a mapping, got {data!r}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            errors.append(f"unknown key '{prefix}{key}' (known under {path or 'the top level'}: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp_ = hints[name]
        if dataclasses.is_dataclass(tp_) and isinstance(data[name], dict):
            # a partly given section keeps the other keys of *its own* default, not the class's
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp_()
            sub = from_dict(tp_, data[name], prefix + name, errors)
            given = {k: getattr(sub, k) for k in data[name] if k in {x.name for x in dataclasses.fields(tp_)}}
            kwargs[name] = dataclasses.replace(base, **given)
            continue
        kwargs[name] = _convert(data[name], tp_, prefix + name, errors)
        if kwargs[name] is None and data[name] is not None:
            del kwargs[name]
    obj = cls(**kwargs)
    if own and errors:
        raise ConfigError(errors)
    return obj


def to_dict(obj) -> Dict[str, Any]:
    """Plain-dict view of a config dataclass (for saving the resolved recipe)."""
    return dataclasses.asdict(obj)


def set_by_path(data: Dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; ``value`` is parsed as YAML.

    Example:
        >>> d = {"prune": {"params": {"k": 1.0}}}
        >>> set_by_path(d, "prune.params.k=1.5"); d["prune"]["params"]["k"]
        1.5
    """
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment!r} must look like key.sub=value"], "command line")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {assignment!r}: empty key"], "command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value {raw!r} is not valid YAML ({e.problem})"], "command line") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError([f"--set {key}: {part!r} is not a section"], "command line")
        node = node[part]
    node[parts[-1]] = value


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML mapping with the safe loader; clear errors for missing or malformed files."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"no such recipe file: {path}"], "recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping, got {type(data).__name__}"], path)
    return data
