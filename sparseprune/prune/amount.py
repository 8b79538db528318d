"""The `amount` argument of every pruning call: an int is a count, a float a fraction.

Checked before anything is touched, so a bad amount never leaves a model half pruned.
"""
from __future__ import annotations

import numbers
from typing import Union

import numpy as np

Amount = Union[int, float]


def check_amount(amount: object) -> None:
    """Raise TypeError/ValueError (naming `amount`) unless it is an int >= 0 or a float in [0, 1]."""
    if isinstance(amount, (bool, np.bool_)) or not isinstance(amount, numbers.Real):
        raise TypeError(
            "amount must be an int (a count) or a float in [0, 1] (a fraction), "
            f"got {type(amount).__name__} {amount!r}"
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"amount must be >= 0 when it is an int (a count), got {amount}")
    elif not 0.0 <= float(amount) <= 1.0:  # also rejects nan
        raise ValueError(f"amount must be in [0, 1] when it is a float (a fraction), got {amount}")


def amount_to_count(amount: Amount, total: int, unit: str = "entries") -> int:
    """How many of `total` units `amount` designates.

    A fraction is rounded to the nearest count with Python's round() (halves to even), as
    torch.nn.utils.prune does, so both libraries prune the same number of entries.
    """
    check_amount(amount)
    if isinstance(amount, numbers.Integral):
        count = int(amount)
        if count > total:
            raise ValueError(f"amount={count} is more than the {total} {unit} there are to prune")
        return count
    return int(round(float(amount) * total))
