"""Typed, validated configs from plain dicts (YAML), with every error reported at once."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

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


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


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
        before = len(errors)
        out = [_convert(v, inner, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return None if len(errors) > before else out  # a list with a bad entry keeps its default
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
            if _finite(value):
                return float(value)
            errors.append(f"{path} must be a finite number, got {value!r}")
            return None
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
        before = len(errors)
        kwargs[name] = _convert(data[name], tp_, prefix + name, errors)
        if len(errors) > before:  # a wrong value (null for a required key included) keeps the default
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


def range_problem(key: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                  low_open: bool = False, high_open: bool = False, integer: bool = False) -> Optional[str]:
    """Why ``value`` is not a finite number (an int with ``integer``) in the given range, or ``None``.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``None`` leaves that side open.

    Example:
        >>> range_problem("train.label_smoothing", 1.5, 0, 1, high_open=True)
        'train.label_smoothing must be in [0, 1), got 1.5'
        >>> range_problem("report.warmup", "5", 0, integer=True)
        "report.warmup must be an int >= 0, got '5'"
        >>> range_problem("train.lr", 0.1, 0, low_open=True) is None
        True
    """
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok_type = is_int if integer else (is_int or isinstance(value, float)) and _finite(value)
    below = low is not None and ok_type and (value <= low if low_open else value < low)
    above = high is not None and ok_type and (value >= high if high_open else value > high)
    if ok_type and not below and not above:
        return None
    kind = "an int" if integer else "a finite number"
    if low is not None and high is not None:
        where = f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
        return f"{key} must be {where}, got {value!r}" if ok_type else f"{key} must be {kind} {where}, got {value!r}"
    bound = (f"{'>' if low_open else '>='} {_num(low)}" if low is not None
             else f"{'<' if high_open else '<='} {_num(high)}" if high is not None else "")
    return f"{key} must be {bound}, got {value!r}" if ok_type else f"{key} must be {kind} {bound}".rstrip() + \
        f", got {value!r}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)
