"""Typed settings: one declaration per `TrainConfig` field gives its type, default and help, and
every value from YAML, `--config` or a flag is converted to the declared type here.

PyYAML reads YAML 1.1, where `1e-6` (no dot) is a string and `yes` a bool; a command line gives
strings only. `coerce(name, value, type)` turns such values into the field's type (int, float,
bool, str, `list[str]`, `dict`, each optionally `| None`) or raises a one-line `ConfigError`
naming the setting, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("null", "none", "~", "")


class ConfigError(ValueError):
    """A nonsense setting; the message says what to fix."""


def setting(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its help text (shown by `zotune train --help`)."""
    if isinstance(default, (dict, list)):  # mutable defaults need a factory
        kw["default_factory"] = lambda d=default: type(d)(d)
        default = dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def flag(name: str) -> str:
    """The command-line flag of a setting: lora_targets -> --lora-targets."""
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_types(cls: type) -> dict[str, Any]:
    """The fields' declared types, resolved (the module uses `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else tp), allows_none
    return tp, tp is Any


def describe(tp: Any) -> str:
    """What a type accepts, in words: 'an integer', 'a number or null'..."""
    inner, allows_none = _optional(tp)
    origin = typing.get_origin(inner) or inner
    text = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list of names (a YAML list or NAME,NAME)",
        dict: "a mapping of name: value",
    }.get(origin, str(inner))
    return text + (" or null" if allows_none and inner is not Any else "")


def _fail(name: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"setting {name} ({flag(name)}) must be {describe(tp)}, got {value!r} "
        f"({type(value).__name__})"
    )


def coerce(name: str, value: Any, tp: Any) -> Any:
    """`value` converted to `tp`, or a ConfigError naming the setting, the value and the type."""
    inner, allows_none = _optional(tp)
    if value is None:
        if allows_none or inner is Any:
            return None
        if typing.get_origin(inner) is dict or inner is dict:
            return {}
        raise _fail(name, value, tp)
    origin = typing.get_origin(inner) or inner
    text = value.strip() if isinstance(value, str) else None
    if allows_none and text is not None and text.lower() in _NONE and origin is not str:
        return None
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _fail(name, value, tp)
    if origin is int:
        if isinstance(value, bool):
            raise _fail(name, value, tp)
        if isinstance(value, int):
            return value
        number = value
        if text is not None:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                number = _float(text)
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)  # 1e3 or 1000.0: an integer written as a float
        raise _fail(name, value, tp)
    if origin is float:
        if isinstance(value, bool):
            raise _fail(name, value, tp)
        if isinstance(value, (int, float)):
            return float(value)
        number = _float(text) if text is not None else None
        if number is None:
            raise _fail(name, value, tp)
        return number
    if origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `out: 2024`: a name that happens to look like a number
        raise _fail(name, value, tp)
    if origin is list:
        items = text.split(",") if text is not None else value
        if not isinstance(items, (list, tuple)):
            raise _fail(name, value, tp)
        if not all(isinstance(x, str) or _is_number(x) for x in items):
            raise _fail(name, value, tp)
        names = [str(x).strip() for x in items if str(x).strip()]
        if not names:
            if allows_none:
                return None
            raise _fail(name, value, tp)
        return names
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(name, value, tp)
        return {str(k): v for k, v in value.items()}
    return value  # a type this module does not know: passed through unchanged


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _float(text: str) -> float | None:
    try:
        return float(text.replace("_", ""))
    except ValueError:
        return None


def coerce_all(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Every known field's value in `values` converted to its declared type."""
    hints = field_types(cls)
    return {k: coerce(k, v, hints[k]) if k in hints else v for k, v in values.items()}
