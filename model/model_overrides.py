"""`--set key=value,...`: ModelConfig fields replaced by name, each value's text parsed to the field's type.

`parse_overrides` splits the flag's text into {field: value text}; `apply_overrides` parses each value to its field's
type (int, float, bool, text, a Literal's choices, an optional id, a tuple of ints or floats) and lets ModelConfig
check the result. Tuple fields (global_layers, rope_scaling, extra_eos_ids) take their elements comma-separated, as
the pairs are: a comma-separated part without `=` continues the tuple field before it, so
`--set global_layers=5,11,17,sliding_window=512` sets both; an empty value or `none` is the empty tuple.
Used by model/model_spec.py (`resolve_model`) and the CLIs' `--set`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from meshserve.model.config import ConfigError, ModelConfig

__all__ = ["parse_overrides", "apply_overrides", "ModelSpecError", "SET_HELP"]

SET_HELP = (
    "override model fields: key=value[,key=value] (repeatable), e.g. n_kv_heads=8,max_seq_len=8192; "
    "list fields take comma-separated values, e.g. global_layers=5,11,17"
)
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class ModelSpecError(ConfigError):
    """A --model spec that names nothing, a config.json meshserve cannot describe, or a bad --set override."""


def _fields() -> dict[str, Any]:
    """ModelConfig field name -> its resolved type hint (the module uses postponed annotations)."""
    return typing.get_type_hints(ModelConfig)


def parse_overrides(items: str | Sequence[str] | None) -> dict[str, str]:
    """`--set` values ("k=v,k2=v2", the flag repeatable) -> {field: value text}; parsed by `apply_overrides`.

    A part without `=` continues the value of a tuple field before it in the same item ("global_layers=5,11,17"
    -> {"global_layers": "5,11,17"}); after any other field it is an error, as a lone key is."""
    hints = _fields()
    out: dict[str, str] = {}
    for item in [items] if isinstance(items, str) else items or []:
        pairs: list[list[str]] = []
        for pair in item.split(","):
            if not pair.strip():
                continue
            key, sep, value = (s.strip() for s in pair.partition("="))
            if not sep and pairs and _is_tuple(hints.get(pairs[-1][0])):
                pairs[-1][1] += "," + pair.strip()  # the next element of a tuple field, e.g. global_layers=5,11
                continue
            if not sep or not key:
                raise ModelSpecError(
                    f"model override {pair.strip()!r} is not key=value; valid keys: {', '.join(hints)}"
                )
            pairs.append([key, value])
        for key, value in pairs:
            if key in out and out[key] != value:
                raise ModelSpecError(f"model override {key} is given twice ({out[key]!r} and {value!r})")
            out[key] = value
    return out


def _is_tuple(hint: Any) -> bool:
    """tuple[int, ...] and tuple[float, ...] (global_layers, extra_eos_ids, rope_scaling)."""
    return typing.get_origin(hint) is tuple


def _describe(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _is_tuple(hint):
        return f"a comma-separated list of {'integers' if args[0] is int else 'positive numbers'} (or none)"
    if args:  # int | None
        return f"{_describe(args[0])} or none"
    return {int: "an integer", float: "a positive number", str: "text"}.get(hint, str(hint))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` (text from --set, or already typed) as a value of the field's type; ModelSpecError if it is not."""
    bad = ModelSpecError(f"model override {key}={value!r}: expected {_describe(hint)}")
    text = value.strip().lower() if isinstance(value, str) else None
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        if value not in args:
            raise bad
        return value
    if _is_tuple(hint):
        if value is None or text in ("none", "null", ""):
            return ()
        parts = text.split(",") if text is not None else value
        if isinstance(parts, str) or not isinstance(parts, Sequence):
            raise bad
        try:  # each element as the element type (int: no silent truncation of 5.5; float: positive and finite)
            return tuple(_coerce(key, part, args[0]) for part in parts)
        except ModelSpecError:
            raise bad from None  # its message names the whole value and the list's type
    if type(None) in args:  # optional ids: "none" clears them
        if value is None or text in ("none", "null", ""):
            return None
        try:
            return _coerce(key, value, next(a for a in args if a is not type(None)))
        except ModelSpecError:
            raise bad from None  # its message says "or none"
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad
    if isinstance(value, bool) and hint in (int, float):
        raise bad  # bool is an int subclass in Python; True is no layer count
    if hint is int:
        if isinstance(value, int):
            return value
        if text is None:  # a typed value that is not an int: no silent truncation of 2.5 layers
            raise bad
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        # Both float fields (norm_eps, rope_base) must be positive and finite for the model to compute anything.
        if not math.isfinite(number) or number <= 0:
            raise bad
        return number
    if hint is str:
        if not isinstance(value, str) or not value.strip():
            raise bad
        return value.strip()
    raise bad


def _show(value: Any) -> str:
    """A typed value as --set writes it (a tuple: its elements comma-separated, `none` when empty)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def apply_overrides(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """`config` with fields replaced; values may be text (from `--set`) or typed. The copy is named
    `name[key=value,...]` unless `name` itself is overridden. Unknown keys list the valid ones; a value of the wrong
    type names the type; a combination ModelConfig refuses (n_heads not a multiple of n_kv_heads) names both."""
    hints = _fields()
    unknown = sorted(set(overrides) - set(hints))
    if unknown:
        raise ModelSpecError(f"unknown model override key(s) {', '.join(unknown)}; valid keys: {', '.join(hints)}")
    typed = {key: _coerce(key, value, hints[key]) for key, value in overrides.items()}
    if not typed:
        return config
    shown = ",".join(f"{k}={_show(v)}" for k, v in typed.items() if k != "name")
    name = typed.pop("name", None) or f"{config.name}[{shown}]"
    try:
        return dataclasses.replace(config, name=name, **typed)
    except ConfigError as e:
        raise ModelSpecError(f"model override {shown} on {config.name}: {e}") from None
