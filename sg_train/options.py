"""Type checks for the options a YAML file hands to a constructor as a free-form dict
(``loss_options``, ``model_options``), so that ``s: "30"`` is an error naming the key and the fix
instead of a ``TypeError`` deep inside the model."""
from __future__ import annotations

import inspect
import json
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import OptionError

__all__ = ["check_option_types"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (types a YAML option can take; others pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return _is_number(value)
    if hint is int:
        return _is_integer(value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    return True


def _expected(hint: Any) -> str:
    """``hint`` in words: "a number", "an integer", "one of 'max', 'finite'", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, Sequence):
        return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    names = {type(None): "null", float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _suggestion(key: str, value: Any, hint: Any, default: Any) -> str:
    """A YAML line the user can write instead of ``value``."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    hints = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if isinstance(value, str):
        for h in hints:
            try:
                if h is float:
                    return f"{key}: {float(value)!r}"
                if h is int:
                    return f"{key}: {int(value)}"
                if typing.get_origin(h) in (list, tuple, Sequence) and typing.get_args(h)[:1] == (float,):
                    return f"{key}: {[float(t) for t in value.replace(',', ' ').split()]}"
            except ValueError:
                pass
        if bool in hints and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return f"{key}: {str(value.strip().lower() in ('true', 'yes', 'on')).lower()}"
    if int in hints and _is_number(value) and float(value).is_integer():
        return f"{key}: {int(value)}"
    if default is not inspect.Parameter.empty and default is not None:
        example = list(default) if isinstance(default, tuple) else default
        return f"{key}: {json.dumps(example)} (the default)"
    return f"{key}: <{_expected(hint)}>"


def check_option_types(what: str, func: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Check each ``options`` value against the annotation of ``func``'s parameter of that name.

    ``what`` names the owner in messages (e.g. "loss 'arcface'"). Handles the types a YAML
    option can take: numbers (``float`` accepts ints, never ``bool``), integers, booleans,
    strings, ``Literal`` choices, ``None`` and lists of these; other annotations are not
    checked, nor keys ``func`` does not take. Raises :class:`~sg_train.errors.OptionError` (a
    ValueError) naming the owner, the key,
    the value and its type, what is expected and a line to write instead, e.g.
    ``loss 'arcface' option 's' must be a number, got '30' (str); write s: 30.0``.
    """
    hints = typing.get_type_hints(func)
    params = inspect.signature(func).parameters
    for key, value in options.items():
        if key not in hints or key not in params or _matches(value, hints[key]):
            continue
        hint = hints[key]
        raise OptionError(
            f"{what} option {key!r} must be {_expected(hint)}, got {value!r} ({type(value).__name__}); "
            f"write {_suggestion(key, value, hint, params[key].default)}"
        )
