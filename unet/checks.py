"""Argument checks shared by the library's constructors.

Messages read like the command-line tools' (`unet.cli`): ``"<name>: expected ..., got ..."``.
"""

from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int, or ``ValueError`` unless it is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)
