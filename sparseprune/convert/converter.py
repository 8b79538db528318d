"""Walking a model and replacing each supported layer through a registry of per-type handlers."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import nn

from sparseprune.config import resolve_threads
from sparseprune.convert.report import ConversionReport, LayerChoice
from sparseprune.convert.selection import choose_linear_kernel

POLICIES = ("measure", "threshold")


@dataclass
class ConvertContext:
    """Options and the report, handed to every layer handler."""

    policy: str
    batch_sizes: Tuple[int, ...]
    num_threads: Optional[int]
    report: ConversionReport
    fuse_relu: bool = False  # set by the walker when a ReLU follows the layer in a Sequential
    extra: Dict[str, object] = field(default_factory=dict)


# A handler gets (module, dotted path, context) and returns the module to put in its place
# (possibly the same one). It records its decision in context.report.
Handler = Callable[[nn.Module, str, ConvertContext], nn.Module]
_HANDLERS: Dict[Type[nn.Module], Handler] = {}
# Modules whose forward reads their children's weights directly (not by calling them): without a
# handler of their own they are left whole, since replacing a child would break them.
_OPAQUE_TYPES: Tuple[Type[nn.Module], ...] = (nn.MultiheadAttention,)


def register_converter(module_type: Type[nn.Module], handler: Handler) -> None:
    """Teach convert() a layer type. The most specific registered class in the MRO wins."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    _HANDLERS[module_type] = handler


def _handler_for(module: nn.Module) -> Optional[Handler]:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def weight_sparsity(weight: torch.Tensor) -> float:
    w = weight.detach()
    return 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)


def convert_linear(linear: nn.Linear, path: str, ctx: ConvertContext) -> nn.Module:
    """nn.Linear -> SparseLinear when a sparse kernel is measurably faster, else unchanged."""
    choice = choose_linear_kernel(linear, ctx.fuse_relu, ctx.policy, ctx.batch_sizes, ctx.num_threads)
    ctx.report.add(
        LayerChoice(
            path=path,
            layer_type=type(linear).__name__,
            shape=tuple(linear.weight.shape),
            sparsity=weight_sparsity(linear.weight),
            kernel=choice.kernel,
            reason=choice.reason + (" (ReLU fused)" if ctx.fuse_relu and choice.kernel != "dense" else ""),
            dense_ms=choice.dense_ms,
            chosen_ms=choice.chosen_ms,
        )
    )
    return choice.module


register_converter(nn.Linear, convert_linear)


def _walk(module: nn.Module, prefix: str, ctx: ConvertContext) -> None:
    names = [name for name, _ in module.named_children()]
    for i, name in enumerate(names):
        child = getattr(module, name)
        path = f"{prefix}.{name}" if prefix else name
        handler = _handler_for(child)
        if handler is None:
            if not isinstance(child, _OPAQUE_TYPES):
                _walk(child, path, ctx)
            continue
        # Fuse a following ReLU into a sparse kernel (Sequential only: its order is the data flow).
        next_child = getattr(module, names[i + 1]) if i + 1 < len(names) else None
        ctx.fuse_relu = isinstance(module, nn.Sequential) and type(next_child) is nn.ReLU
        replacement = handler(child, path, ctx)
        if ctx.fuse_relu and getattr(replacement, "relu", False) is True:
            setattr(module, names[i + 1], nn.Identity())
        ctx.fuse_relu = False
        if replacement is not child:
            setattr(module, name, replacement)


def convert(
    model: nn.Module,
    *,
    inplace: bool = False,
    policy: str = "measure",
    batch_sizes: Sequence[int] = (1, 32),
    num_threads: Optional[int] = None,
) -> nn.Module:
    """Return `model` with every sparse-enough layer replaced by a native sparse module.

    Pruned layers are read through their effective `weight`, so models pruned by sparseprune or
    by torch.nn.utils.prune (with or without prune.remove) both work. With policy="measure"
    (default) each candidate kernel is timed against dense at `batch_sizes` on this machine, with
    `num_threads` threads (default: torch's), and a layer is switched only when sparse is faster
    at every size; policy="threshold" switches by sparsity alone (no timing). The decisions are
    in `result.sparseprune_report` (a ConversionReport). The result is for inference.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    threads = resolve_threads(num_threads)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    ctx = ConvertContext(policy, batch_sizes, num_threads, ConversionReport(policy=policy, num_threads=threads))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # dense and sparse are timed at the same thread count
    try:
        with torch.no_grad():
            handler = _handler_for(target)
            if handler is not None:  # the model itself is one layer
                target = handler(target, type(target).__name__, ctx)
            else:
                _walk(target, "", ctx)
    finally:
        torch.set_num_threads(previous)
    target.sparseprune_report = ctx.report
    return target
