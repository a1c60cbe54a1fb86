"""Typed, bounded, documented settings: the one field helper every config dataclass uses.

`setting(default, help, min=, max=, choices=, advanced=)` is a dataclass field whose metadata drives three
things: the form the UI draws, the validation (`build_dataclass`), and the CLI's `--set key=value`. It sits on
the ground floor so that methods, training and the Playground all describe their settings the same way
without importing each other.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any

from .errors import UserError


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            choices: tuple | None = None, advanced: bool = False, label: str | None = None) -> Any:
    """A dataclass field with the metadata the form, the validation and the CLI read."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "advanced": advanced, "label": label}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def user_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    t = hints.get(f.name, str)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def _coerce(value: Any, typ, key: str) -> Any:
    """Turn a TOML value or a `--set` string into the field's type, or say what is expected."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is list:
            if isinstance(value, str):  # --set sample_prompts="a | b" or a TOML-style list
                value = value.strip()
                if value.startswith("["):
                    import tomllib

                    return list(tomllib.loads(f"v = {value}")["v"])
                return [v.strip() for v in value.split("|") if v.strip()]
            return [str(v) for v in value]
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (ValueError, TypeError, OverflowError):  # OverflowError: "1e400" for a whole number
        pass
    except Exception as exc:  # a malformed TOML list
        raise UserError(f"{key} = {value!r} could not be read ({exc}): check the quotes and brackets.") from None
    names = {bool: "true or false", int: "a whole number", float: "a number", list: "a list", str: "text"}
    raise UserError(f"{key} = {value!r} is not {names.get(typ, typ.__name__)}: fix the value.")


def finite(value: float, key: str) -> float:
    """`value` when it is a real number; NaN and infinity are refused by name. Comparisons with NaN are all
    false, so without this a NaN passes every min/max bound and reaches the optimizer (or, worse, trains)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} = {value} is not a finite number: use a plain number (like 0.0001).")
    return value


def finite_float(text: str) -> float:
    """An argparse `type=` for float options: `--guidance nan` is refused like `--guidance abc`."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: use a plain number")
    return value


def _check(f: dataclasses.Field, value: Any, key: str) -> None:
    m = f.metadata
    if isinstance(value, float):
        finite(value, key)
    if m.get("choices") and value not in m["choices"]:
        near = difflib.get_close_matches(str(value), [str(c) for c in m["choices"]], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UserError(f"{key} = {value!r} is not allowed{hint}: use one of {', '.join(map(str, m['choices']))}.")
    if m.get("min") is not None and value < m["min"]:
        raise UserError(f"{key} = {value} is below its minimum {m['min']}: raise it.")
    if m.get("max") is not None and value > m["max"]:
        raise UserError(f"{key} = {value} is above its maximum {m['max']}: lower it.")


def _unknown(key: str, valid: list[str], where: str) -> UserError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else f" Valid keys: {', '.join(sorted(valid))}."
    return UserError(f"Unknown setting {key!r}{where}.{hint}")


def build_dataclass(cls, values: dict, where: str = "", prefix: str = ""):
    """An instance of `cls` from a (partial) dict: every key known, typed and within bounds."""
    fields = {f.name: f for f in user_fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(prefix + key, [prefix + k for k in fields], where)
        f = fields[key]
        v = _coerce(value, _field_type(cls, f), prefix + key)
        _check(f, v, prefix + key)
        kwargs[key] = v
    return cls(**kwargs)


def parse_sets(sets: list[str] | None) -> dict:
    """`["lora.rank=8", "max_steps=6"]` -> {"lora": {"rank": "8"}, "max_steps": "6"} (strings, typed later)."""
    out: dict = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r} is not key=value: write it like --set max_steps=500.")
        if "." in key:
            table, _, sub = key.partition(".")
            out.setdefault(table, {})
            if not isinstance(out[table], dict):
                raise UserError(f"--set {key}: {table!r} is a value, not a table.")
            out[table][sub] = value
        else:
            out[key] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`; tables merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
