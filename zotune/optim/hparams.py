"""The hyperparameter contract: each method accepts exactly the keywords its class declares.

A method's hyperparameters are read from its constructor: the keyword parameters of its
`__init__`, and of its parents' while an `__init__` passes `**kwargs` on, with their annotations
and defaults. `check` rejects an unknown key with the list of valid ones and converts values
given as text (YAML, `--set key=value`) through the declared type: float, int, bool, str, a
tuple of floats, or None where the annotation allows it.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any

import torch

# Constructor arguments that are not hyperparameters: what is optimized and the update rule.
_NOT_HYPERPARAMETERS = ("self", "params", "rule", "config")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Hyperparameter:
    """One keyword a method accepts: its declared type and default."""

    name: str
    kind: Any
    default: Any = None


def hyperparameters(cls: type) -> dict[str, Hyperparameter]:
    """The keywords `cls(params, **hparams)` accepts, in declaration order."""
    out: dict[str, Hyperparameter] = {}
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer or klass is object:
            break
        if "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        hints = typing.get_type_hints(init)
        forwards = False
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in _NOT_HYPERPARAMETERS:
                default = None if p.default is p.empty else p.default
                out.setdefault(p.name, Hyperparameter(p.name, hints.get(p.name, Any), default))
        if not forwards:
            break
    return out


def check(method: str, spec: dict[str, Hyperparameter], given: dict[str, Any]) -> dict[str, Any]:
    """`given` with each value converted to its declared type; ValueError on an unknown key
    (naming the valid ones) or a value that does not convert (one line)."""
    for key in given:
        if key not in spec:
            raise ValueError(
                f"unknown hyperparameter '{key}' for {method}: valid ones are "
                f"{', '.join(spec) or 'none'}"
            )
    return {key: coerce(method, spec[key], value) for key, value in given.items()}


def coerce(method: str, hp: Hyperparameter, value: Any) -> Any:
    """`value` as `hp.kind`; ValueError with a one-line message if it is not one."""
    try:
        return _as(hp.kind, value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{method}: {hp.name} must be {_describe(hp.kind)}, got {value!r}")


def _as(kind: Any, value: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))
        ):
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _as(arg, value)
                except (TypeError, ValueError):
                    continue
        raise ValueError(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError(value)
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip().strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(value)
        kinds = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        if len(kinds) != len(value):
            raise ValueError(value)
        return tuple(_as(k, v) for k, v in zip(kinds, value))
    if isinstance(value, str):  # a model, a closure, tensors: never given as text
        raise ValueError(value)
    return value


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if kind is type(None):
        return "None"
    if origin is tuple:
        n = "several" if args[-1:] == (Ellipsis,) else str(len(args))
        return f"{n} comma-separated values, each {_describe(args[0])}"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(kind, f"a {getattr(kind, '__name__', kind)}, not text")
