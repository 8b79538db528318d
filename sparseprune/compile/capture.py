"""Capture a model with torch.export (ATen level): what the model libraries support today.

capture() returns the exported program together with what compile needs around it: the model's
input names and example values in call order (positional, then keyword), the batch symbol, the
dynamic per-sample dims (name -> (min, max)) and the output structure (a tensor, a tuple/list or a
dict / transformers ModelOutput, flattened with names).

The program is used as export gives it (ATen with in-place ops, no decompositions):
run_decompositions would cost more than the rest of compile on small models, and the lowering
handles the few in-place ops itself. The batch is always dynamic. torch.export specialises sizes 0 and 1, so an example batch of 1 is
captured at batch 2 (the inputs repeated); the executable takes any batch either way.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from sparseprune.compile.errors import CONVERT_HINT, UnsupportedOperation

INPUT_DTYPES = (torch.float32, torch.int64, torch.int32, torch.bool)
OUTPUT_KINDS = ("tensor", "tuple", "list", "dict")
# torch.export needs an upper bound for the batch symbol; this one is far above any real batch.
MAX_CAPTURE_BATCH = 1 << 20


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    input_names: List[str]           # user inputs in the order the executable takes them
    example_inputs: List[torch.Tensor]  # the caller's examples (its batch), same order
    batch_symbol: Any                # the sympy symbol of the batch dim
    dims: Dict[str, Tuple[str, int, int, int]]  # symbol -> (dim name, min, max, example value)
    output_kind: str                 # one of OUTPUT_KINDS
    output_names: List[str]          # one per flat output tensor
    expected: List[torch.Tensor]     # the model's outputs on example_inputs, flattened


def _check_input(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES or x.device.type != "cpu":
        raise TypeError(f"input '{name}' must be a float32 CPU tensor (or int64 token ids, or a bool mask), "
                        f"got {x.dtype} on {x.device}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"input '{name}' must have a batch dimension of at least 1 plus one more dimension, "
                         f"got shape {tuple(x.shape)}")
    return x.detach()


def input_names(model: nn.Module, n: int) -> List[str]:
    """The names of a module's first n positional inputs (as torch.export names them)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{k}" for k in range(len(names), n)]


def _flatten_outputs(result: Any) -> Tuple[str, List[str], List[torch.Tensor]]:
    """(kind, names, tensors) of a model's result; names from the pytree key paths."""
    if isinstance(result, torch.Tensor):
        return "tensor", ["output"], [result]
    leaves, _ = pytree.tree_flatten_with_path(result)
    names, tensors = [], []
    for path, leaf in leaves:
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor):
            raise UnsupportedOperation(f"the model returns a {type(leaf).__name__} at {pytree.keystr(path)!r}: "
                                       f"outputs must be tensors. {CONVERT_HINT}")
        names.append(pytree.keystr(path).strip(".[]'\"").replace("']['", ".").replace("][", ".") or "output")
        tensors.append(leaf)
    if not tensors:
        raise UnsupportedOperation(f"the model returns no tensor ({type(result).__name__}). {CONVERT_HINT}")
    kind = "tuple" if isinstance(result, tuple) and not hasattr(result, "keys") else \
        "list" if isinstance(result, list) else "dict"
    return kind, names, tensors


def _batch_dim_spec(inputs: Mapping[str, torch.Tensor], user: Optional[Mapping[str, Any]],
                    batch: "torch.export.Dim") -> Dict[str, Dict[int, Any]]:
    """dynamic_shapes for torch.export: the batch on axis 0 of every input, plus the caller's dims."""
    user = dict(user or {})
    unknown = sorted(set(user) - set(inputs))
    if unknown:
        raise ValueError(f"dynamic_shapes names {unknown}, which are not inputs (inputs: {sorted(inputs)})")
    spec = {}
    for name, x in inputs.items():
        axes = dict(user.get(name) or {})
        if 0 in axes:
            raise ValueError(f"dynamic_shapes['{name}'] sets axis 0: the batch is always dynamic; give the other axes")
        for axis in axes:
            if not isinstance(axis, int) or not 1 <= axis < x.dim():
                raise ValueError(f"dynamic_shapes['{name}'] names axis {axis!r}, not a per-sample axis of its "
                                 f"shape {tuple(x.shape)}")
        spec[name] = {0: batch, **axes}
    return spec


def capture(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
            dynamic_shapes: Optional[Mapping[str, Any]] = None) -> Captured:
    """torch.export the (eval-mode) `model` on the example args/kwargs, batch dynamic."""
    names = input_names(model, len(args)) + list(kwargs)
    values = [_check_input(n, x) for n, x in zip(names, list(args) + list(kwargs.values()))]
    if len(set(names)) != len(names):
        raise ValueError(f"input names repeat: {names}")
    batches = {int(x.shape[0]) for x in values}
    if len(batches) != 1:
        raise ValueError(f"the example inputs must share one batch size, got {sorted(batches)}")
    with torch.no_grad():
        kind, out_names, expected = _flatten_outputs(model(*values[:len(args)], **dict(zip(names[len(args):],
                                                                                          values[len(args):]))))
    # torch.export specialises a size of 1: capture a batch-1 example at batch 2.
    traced = [torch.cat([x, x]) if x.shape[0] == 1 else x for x in values]
    batch = torch.export.Dim("batch", min=1, max=MAX_CAPTURE_BATCH)
    by_name = dict(zip(names, traced))
    dyn = _batch_dim_spec(by_name, dynamic_shapes, batch)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notes from inside export
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.export.export(
                model, tuple(traced[:len(args)]), dict(zip(names[len(args):], traced[len(args):])),
                dynamic_shapes=dyn if kwargs else tuple(dyn[n] for n in names), strict=False)
    except Exception as exc:  # torch raises many types here (UserError, GuardOnDataDependent...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Constraints violated (batch)" in str(exc):
            first = ("the model's computation depends on the batch size (e.g. a tensor of the example's batch "
                     "held by the model, or a reshape to a literal batch)")
        raise UnsupportedOperation(
            f"torch.export cannot capture {type(model).__name__} with a dynamic batch: {type(exc).__name__}: "
            f"{first[:400]}. {CONVERT_HINT}") from exc
    batch_symbol, dims = _symbols(program, names, dynamic_shapes, dict(zip(names, values)))
    return Captured(program, names, values, batch_symbol, dims, kind, out_names, expected)


def _symbols(program, names: List[str], dynamic_shapes, example: Mapping[str, torch.Tensor]):
    """The batch symbol and the named per-sample dims, read off the user input placeholders."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [s.arg.name for s in program.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    by_arg = {n.name: n for n in placeholders}
    batch_symbol, dims = None, {}
    ranges = program.range_constraints
    for name, arg in zip(names, user):
        val = by_arg[arg].meta["val"]
        for axis, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if axis == 0:
                batch_symbol = expr
                continue
            dim = (dynamic_shapes or {}).get(name, {}).get(axis)
            dim_name = getattr(dim, "__name__", None) or str(expr)
            r = ranges.get(expr)
            lo = int(r.lower) if r is not None else 1
            hi = int(r.upper) if r is not None else None
            if hi is None or hi > (1 << 24):
                raise ValueError(f"the dynamic dim '{dim_name}' of input '{name}' needs a maximum "
                                 f"(torch.export.Dim('{dim_name}', max=...))")
            dims[str(expr)] = (dim_name, max(lo, 1), hi, int(example[name].shape[axis]))
    return batch_symbol, dims
