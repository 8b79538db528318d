"""An executable's calling convention: inputs by position or by name, outputs in the model's
structure (one array, a tuple, a list, or a dict by name for a model that returned a dict or a
transformers ModelOutput). The structure is recorded by compile in the spec's metadata
("output_kind"); a file without it keeps the original convention (one array, else a tuple).

numpy only: this module must not import torch.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

OUTPUT_KINDS = ("tensor", "tuple", "list", "dict")


def bind_inputs(names: Sequence[str], positional: Sequence[Any], named: Mapping[str, Any]) -> List[Any]:
    """The inputs in the executable's order, from positional values followed by named ones."""
    if len(positional) > len(names):
        raise ValueError(f"expected at most {len(names)} input(s) ({', '.join(names)}), got {len(positional)}")
    bound: Dict[str, Any] = dict(zip(names, positional))
    for key, value in named.items():
        if key not in names:
            raise ValueError(f"unknown input {key!r}: the inputs are {', '.join(names)}")
        if key in bound:
            raise ValueError(f"input {key!r} given twice (by position and by name)")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise ValueError(f"missing input(s) {', '.join(repr(m) for m in missing)}: the inputs are {', '.join(names)}")
    return [bound[n] for n in names]


def structure_outputs(kind: Any, names: Sequence[str], outputs: Sequence[Any]) -> Any:
    """The outputs as the model returned them."""
    if kind == "dict":
        return dict(zip(names, outputs))
    if kind == "list":
        return list(outputs)
    if kind == "tuple":
        return tuple(outputs)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
