"""Config dataclasses: where every value comes from, as plain values, ``--set KEY=VALUE`` parsing,
and checks that refuse a value that cannot work before anything runs (one line naming the field).

Every field of a run's config declares its source, once, where it is defined:

* ``protocol(default, "P2")`` -- the value the cited protocol prescribes (section of docs/protocols.md,
  or the reference code it points to);
* ``chosen(default, "why")`` -- the protocol is silent; we picked this value, for this reason;
* ``operational(default)`` -- where and how a run executes (paths, device, workers, checkpoint
  cadence, memory chunk sizes, row labels): no effect on the result.

Everything else is derived from these declarations: which ``--set`` values mark a run ``+custom``
(all but operational ones), what enters a run's identity, ``--print-config``'s sources, and the
README's table of chosen values (a test compares them).
"""
from __future__ import annotations

from dataclasses import Field, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from runtime import config_checks as checks

SOURCE = "source"  # field metadata key: a protocol section, "chosen" or "operational"
WHY = "why"


def protocol(default: Any, section: str) -> Any:
    """A value prescribed by the protocol; ``section`` names where (e.g. "P2", "P3: Fast R-CNN's prototxt")."""
    return field(default=default, metadata={SOURCE: section})


def chosen(default: Any, why: str) -> Any:
    """A value the protocol leaves unpublished; ``why`` says why we picked it."""
    return field(default=default, metadata={SOURCE: "chosen", WHY: why})


def operational(default: Any, why: str = "") -> Any:
    """A value that changes where or how a run executes, never its result."""
    return field(default=default, metadata={SOURCE: "operational", WHY: why})


def source_of(item: Field) -> str:
    try:
        return item.metadata[SOURCE]
    except KeyError:
        raise TypeError(f"config field {item.name!r} does not declare its source "
                        f"(use protocol(), chosen() or operational())") from None


def operational_fields(config) -> frozenset[str]:
    """Names of the fields that do not change a run's result."""
    return frozenset(f.name for f in fields(config) if source_of(f) == "operational")


def chosen_values(config) -> list[dict]:
    """``[{"field", "value", "why"}]`` for every value the protocol leaves unpublished."""
    return [{"field": f.name, "value": plain(getattr(config, f.name)), "why": f.metadata[WHY]}
            for f in fields(config) if source_of(f) == "chosen"]


def sources(config) -> dict[str, str]:
    """``{field: source}`` (a protocol section, "chosen" or "operational")."""
    return {f.name: source_of(f) for f in fields(config)}


def plain(value):
    """A config value as JSON: tuples become lists, paths strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def config_dict(config) -> dict:
    """A dataclass config as JSON-able values (tuples become lists, paths strings)."""
    return {f.name: plain(getattr(config, f.name)) for f in fields(config)} if is_dataclass(config) else dict(config)


def _parse_value(key: str, text: str, current):
    """``text`` read as the type of the field's current value (tuples: comma-separated)."""
    if text.lower() == "none":
        return None
    if isinstance(current, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{key} expects true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        return tuple(_parse_value(key, item.strip(), kind()) for item in text.strip("()[] ").split(",") if item.strip())
    if isinstance(current, int):
        return int(float(text)) if "e" in text.lower() else int(text)  # 1e5 is a fine iteration count
    if current is None:  # optional fields default to None: keep numbers as numbers
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    return type(current)(text)


def parse_overrides(config, pairs: Sequence[str]) -> dict:
    """``KEY=VALUE`` strings (the CLIs' ``--set``) as ``{field: typed value}`` for ``config``;
    a ValueError names the bad pair."""
    names = {f.name for f in fields(config)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        try:
            changes[key] = _parse_value(key, value.strip(), getattr(config, key))
        except ValueError as err:
            raise ValueError(f"--set {pair!r}: {err}") from None
    return changes

# Numeric fields that may be 0 (or any sign); every other int/float field of a harness config must be
# > 0: iteration counts, batch sizes, crops, learning rates, scales, thresholds.
NON_NEGATIVE = frozenset({"seed", "workers", "weight_decay", "momentum", "dropout", "head_dropout",
                          "score_threshold", "sample_border", "example_images", "fg_fraction",
                          "bias_decay_mult"})
ANY_VALUE = frozenset({"head_init_bias"})
BELOW_ONE = frozenset({"momentum", "dropout", "head_dropout", "fg_fraction"})
RANGES = frozenset({"scale_range", "bg_range"})  # (low, high) with low < high


def validate_config(config, choices: Mapping[str, Sequence] = (), lengths: Mapping[str, int] = (),
                    minimum: Mapping[str, float] = ()) -> None:
    """Refuse, before anything runs, a config that cannot work: ConfigError naming the field and value.

    Every field is checked by its type and the sets above, with the checks of
    :mod:`runtime.config_checks` (so harnesses and pretraining word their errors alike).
    ``choices``: allowed values of a field (each element, for tuples); ``lengths``: exact tuple
    lengths; ``minimum``: smallest allowed values (e.g. a crop AlexNet can still take).
    """
    choices, lengths, minimum = dict(choices), dict(lengths), dict(minimum)
    for f in fields(config):
        name, value = f.name, getattr(config, f.name)
        if value is None or isinstance(value, (bool, str)) or name in ANY_VALUE:
            pass
        elif isinstance(value, (int, float)):
            if name in BELOW_ONE:
                checks.in_range(config, name, 0.0, 1.0, high_inclusive=False)
            elif name in NON_NEGATIVE:
                checks.non_negative(config, name)
            else:
                checks.positive(config, name)
            if name in minimum:
                checks.at_least(config, name, minimum[name])
        elif isinstance(value, tuple):
            if name in RANGES:
                checks.ordered_pair(config, name, low_min=0.0, strict=True)
            else:
                checks.each_positive(config, name)
            if name in lengths:
                checks.sequence_of(config, name, length=lengths[name])
        if name in choices:
            if isinstance(value, tuple):
                checks.sequence_of(config, name, choices=choices[name])
            else:
                checks.one_of(config, name, choices[name])
