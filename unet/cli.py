"""Pieces shared by the command-line tools (train, evaluate, predict): argparse number types
and the ``--amp`` autocast choice."""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def number_type(kind, minimum, inclusive: bool, what: str, maximum=None):
    """An argparse `type` for a finite number in a range; its message says what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = value < minimum or (value == minimum and not inclusive)
        if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = number_type(int, 1, True, "a positive integer")
non_negative_int = number_type(int, 0, True, "an integer >= 0")
positive_float = number_type(float, 0.0, False, "a positive number")
non_negative_float = number_type(float, 0.0, True, "a number >= 0")


def autocast(device: torch.device, amp: str):
    """The autocast context for ``--amp``; a no-op for ``"none"``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
