"""argparse value types shared by the command-line tools (clear messages, no silent coercion)."""
from __future__ import annotations

import argparse
from typing import Callable


def bounded_int(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


non_negative_int = bounded_int(0)  # seeds, counts
