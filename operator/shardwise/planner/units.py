"""Parsing and formatting of byte sizes and counts (GB = 10^9 and GiB = 2^30 kept apart)."""

from __future__ import annotations

import re

from shardwise.planner.errors import PlanInputError

GIB = 1 << 30
MIB = 1 << 20

# Decimal units are powers of 1000, binary units powers of 1024: "80GB" != "80GiB"
# (memory-model.md, "Units": keep the two apart).
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}

_COUNT_UNITS: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}

_NUMBER_UNIT = re.compile(r"^\s*([+-]?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Bytes from `24GiB`, `80GB`, `1.5TiB`, `512Mi` or plain bytes; PlanInputError names bad input."""
    if isinstance(value, bool):
        raise PlanInputError(f"{what}: expected a size such as 24GiB, got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = _NUMBER_UNIT.match(value)
        if match is None:
            raise PlanInputError(f"{what}: cannot parse size {value!r} (use e.g. 24GiB, 80GB or bytes)")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise PlanInputError(f"{what}: unknown unit {match.group(2)!r} in {value!r}")
        number *= _SIZE_UNITS[unit]
    if number <= 0:
        raise PlanInputError(f"{what}: must be positive, got {value!r}")
    return round(number)


def parse_count(value: str | int | float, what: str = "count") -> int:
    """A positive count from `7e9`, `7B`, `1.5T`, `70b` or an integer (B = billion here)."""
    if isinstance(value, bool):
        raise PlanInputError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _NUMBER_UNIT.match(value)
        if match is None or match.group(2).lower() not in _COUNT_UNITS:
            raise PlanInputError(f"{what}: cannot parse {value!r} (use e.g. 7e9, 7B or 7000000000)")
        number = float(match.group(1)) * _COUNT_UNITS[match.group(2).lower()]
    if number <= 0:
        raise PlanInputError(f"{what}: must be positive, got {value!r}")
    return round(number)


def gib(n_bytes: float) -> str:
    """Human form in GiB with two decimals (the unit nvidia-smi and the GPU labels use)."""
    return f"{n_bytes / GIB:.2f} GiB"
