"""The two checks every config section uses, and the error they raise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range. The message names the field."""


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise unless `value` is one of `allowed`; the message names the field `name`."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; expected one of {list(allowed)}")


def check_range(
    name: str, value: float, lo: float, hi: float | None = None, lo_open: bool = False
) -> None:
    """Raise unless lo <= value <= hi (lo < value with `lo_open`; no upper bound for None)."""
    too_low = value <= lo if lo_open else value < lo
    if too_low or (hi is not None and value > hi):
        bound = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{name}={value!r} is out of range; expected a value in {bound}")
