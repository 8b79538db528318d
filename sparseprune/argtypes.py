"""argparse value types shared by the command-line tools (clear messages, no silent coercion)."""
from __future__ import annotations

import argparse


def non_negative_int(text: str) -> int:
    """An int >= 0 (seeds, epoch counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
