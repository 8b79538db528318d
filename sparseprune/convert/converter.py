"""Walking a model and replacing each supported layer through a registry of per-type handlers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from sparseprune.config import resolve_threads
from sparseprune.model_copy import deepcopy_model
from sparseprune.convert.report import ConversionReport, LayerChoice
from sparseprune.convert.fusion import capture_input_shapes, fuses_relu, prepare_fusions, with_relu
from sparseprune.convert.selection import choose_conv_kernel, choose_linear_kernel
from sparseprune.convert.subclass import overridden_method
from sparseprune.nn.sparse_linear import conv1d_as_linear

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
# Keyed by class, or by "module.QualName" for classes of packages convert() must not import
# (transformers' Conv1D): a model that uses the class has imported it already.
_HANDLERS: Dict[Union[Type[nn.Module], str], Handler] = {}
# Modules whose forward reads their children's weights directly (not by calling them): without a
# handler of their own they are left whole, since replacing a child would break them.
_OPAQUE_TYPES: Tuple[Type[nn.Module], ...] = (nn.MultiheadAttention,)


def register_converter(module_type: Union[Type[nn.Module], str], handler: Handler) -> None:
    """Teach convert() a layer type: an nn.Module subclass, or its qualified name
    ("package.module.ClassName") to match it without importing its package. The most specific
    registered class in the MRO wins.

    A subclass of a registered class that overrides its forward (or _conv_forward) is left as it
    is, since the handler would drop what that forward adds; registering the subclass itself
    (e.g. `register_converter(MyConv, convert_conv2d)`) declares its forward equivalent.
    """
    if isinstance(module_type, str):
        if not module_type or "." not in module_type:
            raise ValueError(f"module_type name must be qualified ('package.module.Class'), got {module_type!r}")
    elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass or its qualified name, got {module_type!r}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {handler!r}")
    _HANDLERS[module_type] = handler


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _handler_for(module: nn.Module) -> Tuple[Optional[Handler], Optional[type]]:
    """The handler and the class in the module's MRO it was registered for."""
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls) or _HANDLERS.get(_qualified_name(cls))
        if handler is not None:
            return handler, cls
    return None, None


def weight_sparsity(weight: torch.Tensor) -> float:
    w = weight.detach()
    return 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)


def _record(ctx: ConvertContext, path: str, layer: nn.Module, choice, layer_type: str = "") -> nn.Module:
    fused = ctx.fuse_relu and choice.kernel != "dense"
    ctx.report.add(
        LayerChoice(
            path=path,
            layer_type=layer_type or type(layer).__name__,
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


def convert_conv1d(conv1d: nn.Module, path: str, ctx: ConvertContext) -> nn.Module:
    """transformers' Conv1D (y = x @ W + b, W [nx, nf]) -> SparseLinear of W.T, chosen like a
    Linear; the SparseLinear keeps Conv1D's nf/nx and weight layout. The report shows the
    Linear's shape [nf, nx]."""
    try:
        linear = conv1d_as_linear(conv1d)  # shares the tensors: no copy
    except ValueError as exc:
        weight = getattr(conv1d, "weight", None)
        record_left(ctx, path, conv1d, weight if isinstance(weight, torch.Tensor) else None, f"unsupported: {exc}")
        return conv1d
    choice = choose_linear_kernel(linear, ctx.fuse_relu, ctx.policy, ctx.batch_sizes, ctx.num_threads)
    if choice.module is linear:
        choice.module = conv1d
    else:
        choice.module.as_conv1d()
    return _record(ctx, path, linear, choice, layer_type=type(conv1d).__name__)


def record_left(ctx: ConvertContext, path: str, module: nn.Module, weight: Optional[torch.Tensor], reason: str) -> None:
    ctx.report.add(
        LayerChoice(
            path=path,
            layer_type=type(module).__name__,
            shape=() if weight is None else tuple(weight.shape),
            sparsity=0.0 if weight is None else weight_sparsity(weight),
            kernel="dense",
            reason=reason,
        )
    )


register_converter(nn.Linear, convert_linear)
register_converter(nn.Conv2d, convert_conv2d)
register_converter("transformers.pytorch_utils.Conv1D", convert_conv1d)


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
    handler, registered = _handler_for(module)
    if handler is None:
        return None
    own = overridden_method(type(module), registered)
    if own is not None:
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        record_left(
            ctx, path, module, weight if isinstance(weight, torch.Tensor) else None,
            f"left as is: {name} overrides {own} ({registered.__name__}.{own}), which converting would "
            f"drop; register_converter({name}, ...) if it computes the same",
        )
        return module
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

    Model code from other packages keeps working: a swapped-in module keeps the public
    attributes of the layer it replaces (`weight`, `bias`, `in_features`, `kernel_size`,
    `stride`, `padding`, ...; see SparseLinear and SparseConv2d). A subclass of a converted type
    that overrides its forward is left as it is (see register_converter), and transformers'
    Conv1D converts as the Linear it is, without convert() importing transformers.
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
