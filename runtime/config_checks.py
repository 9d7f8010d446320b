"""Checks of configuration values, each failing with one line that names the field and the value.

A run that starts with a value that cannot work (a zero batch size, a negative learning rate, an
unknown method) fails minutes or hours later, deep inside a library, with a traceback that does
not name the setting. These helpers are called before anything runs or touches the disk, and
raise :class:`runtime.errors.ConfigError` ("<field> must be ..., got <value>") instead.

They work on any object with attributes (dataclass configs): pretraining calls them field by field
(``pretrain.train.validate_config``), every harness through ``runtime.config.validate_config``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Collection, Iterable, Mapping

from runtime.errors import ConfigError


def _value(config: Any, name: str) -> Any:
    return getattr(config, name)


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but "batch_size=True" is a mistake, not the number 1.
    return isinstance(value, Real) and not isinstance(value, bool)


def _number(config: Any, name: str, integer: bool = False) -> Real:
    value = _value(config, name)
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return value


def positive(config: Any, *names: str, integer: bool = False) -> None:
    """Each field is a number > 0 (an integer when ``integer``): counts, sizes, rates."""
    for name in names:
        if not _number(config, name, integer) > 0:
            raise ConfigError(f"{name} must be positive, got {_value(config, name)!r}")


def non_negative(config: Any, *names: str, integer: bool = False) -> None:
    """Each field is a number >= 0 (0 usually means "off", e.g. ``val_every=0``)."""
    for name in names:
        if not _number(config, name, integer) >= 0:
            raise ConfigError(f"{name} must be >= 0, got {_value(config, name)!r}")


def at_least(config: Any, name: str, minimum: float) -> None:
    """The field is a number >= ``minimum`` (e.g. a crop AlexNet can still take)."""
    if not _number(config, name) >= minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {_value(config, name)!r}")


def each_positive(config: Any, name: str) -> None:
    """Every number in a non-empty list is finite and > 0 (sizes, scales); other items are left
    to a ``choices`` check."""
    for i, item in enumerate(sequence_of(config, name)):
        if _is_number(item) and not (math.isfinite(item) and item > 0):
            raise ConfigError(f"{name}[{i}] must be a positive number, got {item!r}")


def in_range(config: Any, name: str, low: float, high: float, *, high_inclusive: bool = True) -> None:
    """``low <= field <= high`` (``< high`` unless ``high_inclusive``): probabilities, momenta."""
    value = _number(config, name)
    if not (low <= value <= high if high_inclusive else low <= value < high):
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def one_of(config: Any, name: str, choices: Collection[str]) -> None:
    """The field is one of the known names (methods, precisions ...)."""
    value = _value(config, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def sequence_of(config: Any, name: str, length: int | None = None, choices: Collection[str] | None = None,
                allow_empty: bool = False, unique: bool = False) -> tuple:
    """The field is a list/tuple (of ``length`` items, of known ``choices``, each once when
    ``unique``); returns it as a tuple."""
    value = _value(config, name)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise ConfigError(f"{name} must have {length} values, got {len(items)}: {value!r}")
    if not items and not allow_empty:
        raise ConfigError(f"{name} must not be empty")
    if choices is not None:
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise ConfigError(f"{name}: unknown value(s) {unknown} (known: {sorted(choices)})")
    if unique and len(set(items)) != len(items):
        raise ConfigError(f"{name} lists a value twice: {value!r}")
    return items


def each_in_range(config: Any, name: str, low: float, high: float, *, length: int | None = None,
                  high_inclusive: bool = True) -> None:
    """A list of numbers (``length`` of them), each in ``[low, high]`` (e.g. Adam's betas)."""
    items = sequence_of(config, name, length=length)
    inside = (lambda v: low <= v <= high) if high_inclusive else (lambda v: low <= v < high)
    for i, item in enumerate(items):
        if not _is_number(item) or math.isnan(item) or not inside(item):
            bracket = "]" if high_inclusive else ")"
            raise ConfigError(f"{name}[{i}] must be a number in [{low}, {high}{bracket}, got {item!r}")


def ordered_pair(config: Any, name: str, *, low_exclusive_min: float | None = None, low_min: float | None = None,
                 strict: bool = False) -> None:
    """A ``(low, high)`` pair of finite numbers with ``low <= high`` (``<`` when ``strict``) and,
    when given, ``low > low_exclusive_min`` (e.g. a scale range above 0) or ``low >= low_min``
    (e.g. an overlap range from 0)."""
    low, high = sequence_of(config, name, length=2)
    if not (_is_number(low) and _is_number(high)) or not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{name} must be two numbers, got {_value(config, name)!r}")
    if (low >= high) if strict else (low > high):
        relation = "<" if strict else "<="
        raise ConfigError(f"{name} must be (low, high) with low {relation} high, got {_value(config, name)!r}")
    if low_exclusive_min is not None and not low > low_exclusive_min:
        raise ConfigError(f"{name} must be above {low_exclusive_min}, got {_value(config, name)!r}")
    if low_min is not None and not low >= low_min:
        raise ConfigError(f"{name} must start at {low_min} or above, got {_value(config, name)!r}")


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any], may_change: Collection[str]) -> dict:
    """``{field: (saved, current)}`` for fields present in both that differ, except ``may_change``:
    what a resumed run would silently do differently from the run it continues. Fields missing
    from ``saved`` (added to the config after the run was saved) are not compared."""
    return {key: (saved[key], value) for key, value in current.items()
            if key not in may_change and key in saved and saved[key] != value}


def describe_changes(changes: Mapping[str, tuple]) -> str:
    """``"lr (saved 0.0001, now 0.01), seed (saved 0, now 1)"`` for an error message."""
    return ", ".join(f"{key} (saved {old!r}, now {new!r})" for key, (old, new) in changes.items())
