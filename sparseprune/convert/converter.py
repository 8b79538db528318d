"""Walking a model and replacing each supported layer through a registry of per-type handlers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from sparseprune.config import resolve_threads
from sparseprune.model_copy import deepcopy_model
from sparseprune.convert.report import ConversionReport, LayerChoice
from sparseprune.convert.fusion import capture_input_shapes, fuses_relu, prepare_fusions, with_relu
from sparseprune.convert.selection import choose_conv_kernel, choose_linear_kernel

POLICIES = ("measure", "threshold")


@dataclass
class ConvertContext:
    """Options and the report, handed to every layer handler."""

    policy: str
    batch_sizes: Tuple[int, ...]
    num_threads: Optional[int]
    report: ConversionReport
    conv_batch_sizes: Tuple[int, ...] = (1,)
    fuse_relu: bool = False  # set by the walker when the layer's output goes straight into a ReLU
    input_shapes: Dict[int, Tuple[int, ...]] = field(default_factory=dict)  # id(layer) -> shape
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


def _record(ctx: ConvertContext, path: str, layer: nn.Module, choice) -> nn.Module:
    fused = ctx.fuse_relu and choice.kernel != "dense"
    ctx.report.add(
        LayerChoice(
            path=path,
            layer_type=type(layer).__name__,
            shape=tuple(layer.weight.shape),
            sparsity=weight_sparsity(layer.weight),
            kernel=choice.kernel,
            reason=choice.reason + (" (ReLU fused)" if fused else ""),
            dense_ms=choice.dense_ms,
            chosen_ms=choice.chosen_ms,
        )
    )
    return choice.module


def convert_linear(linear: nn.Linear, path: str, ctx: ConvertContext) -> nn.Module:
    """nn.Linear -> SparseLinear when a sparse kernel is measurably faster, else unchanged."""
    choice = choose_linear_kernel(linear, ctx.fuse_relu, ctx.policy, ctx.batch_sizes, ctx.num_threads)
    return _record(ctx, path, linear, choice)


def convert_conv2d(conv: nn.Conv2d, path: str, ctx: ConvertContext) -> nn.Module:
    """nn.Conv2d -> SparseConv2d when measurably faster at the example input's size."""
    choice = choose_conv_kernel(
        conv, ctx.fuse_relu, ctx.policy, ctx.input_shapes.get(id(conv)), ctx.conv_batch_sizes,
        ctx.num_threads, path,
    )
    return _record(ctx, path, conv, choice)


register_converter(nn.Linear, convert_linear)
register_converter(nn.Conv2d, convert_conv2d)


def _walk(module: nn.Module, prefix: str, ctx: ConvertContext) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        replacement = _convert_one(child, path, ctx)
        if replacement is None:
            if not isinstance(child, _OPAQUE_TYPES):
                _walk(child, path, ctx)
        elif replacement is not child:
            setattr(module, name, replacement)


def _convert_one(module: nn.Module, path: str, ctx: ConvertContext) -> Optional[nn.Module]:
    """The module's replacement, or None when no handler knows its type."""
    handler = _handler_for(module)
    if handler is None:
        return None
    ctx.fuse_relu = fuses_relu(module)
    try:
        replacement = handler(module, path, ctx)
    finally:
        ctx.fuse_relu = False
    # A layer marked for ReLU fusion lost its ReLU module; if it stays dense it needs it back.
    return with_relu(replacement) if replacement is module else replacement


def convert(
    model: nn.Module,
    *,
    inplace: bool = False,
    policy: str = "measure",
    batch_sizes: Sequence[int] = (1, 32),
    num_threads: Optional[int] = None,
    example_inputs: Optional[Sequence[torch.Tensor]] = None,
    conv_batch_sizes: Sequence[int] = (1,),
) -> nn.Module:
    """Return `model` with every sparse-enough layer replaced by a native sparse module.

    Pruned layers are read through their effective `weight`, so models pruned by sparseprune or
    by torch.nn.utils.prune (with or without prune.remove) both work. With policy="measure"
    (default) each candidate kernel is timed against dense at `batch_sizes` on this machine, with
    `num_threads` threads (default: torch's), and a layer is switched only when sparse is faster
    at every size; policy="threshold" switches by sparsity alone (no timing). The decisions are
    in `result.sparseprune_report` (a ConversionReport). The result is for inference.

    BatchNorm2d layers that directly follow a convolution are folded into it, and a ReLU module
    that directly follows a layer is fused into its kernel (found with torch.fx; untraceable
    parts are searched child by child). Convolutions are timed at the input size they see on
    `example_inputs` (a tuple of model inputs) with `conv_batch_sizes` images; without example
    inputs they are switched by the sparsity threshold. Unsupported layer settings stay dense,
    with the reason in the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    threads = resolve_threads(num_threads)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of input tensors, e.g. (x,)")
    conv_batch_sizes = tuple(conv_batch_sizes)
    if not conv_batch_sizes or not all(isinstance(b, int) and b >= 1 for b in conv_batch_sizes):
        raise ValueError(f"conv_batch_sizes must be positive ints, got {conv_batch_sizes!r}")
    target = model if inplace else deepcopy_model(model)
    target.eval()
    ctx = ConvertContext(
        policy, batch_sizes, num_threads, ConversionReport(policy=policy, num_threads=threads),
        conv_batch_sizes=conv_batch_sizes,
    )
    if example_inputs is not None:
        ctx.input_shapes = capture_input_shapes(target, tuple(example_inputs))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # dense and sparse are timed at the same thread count
    try:
        with torch.no_grad():
            prepare_fusions(target)
            replacement = _convert_one(target, type(target).__name__, ctx)
            if replacement is not None:  # the model itself is one layer
                target = replacement
            else:
                _walk(target, "", ctx)
    finally:
        torch.set_num_threads(previous)
    target.sparseprune_report = ctx.report
    return target
