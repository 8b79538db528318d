"""convert(): the parts of a model that compile can capture run as native plans; the rest stays torch.

With example inputs, the model is run once to record how each module is called; then, top down,
each module holding a pruned layer is compiled with sparseprune.compile (the same capture, lowering,
kernel choice, attention, BatchNorm fold and fusion) and, when that works, turned into a module
whose forward runs the executable (native_module.py): the whole model when it captures, else its
largest capturable parts. Linear / Conv2d / transformers Conv1D layers left outside any compiled
part are swapped one by one for SparseLinear / SparseConv2d when the same kernel choice
(compile.kernel_choice) finds a sparse kernel faster than torch's own layer.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import nn

from sparseprune.compile.kernel_choice import choose_conv, choose_linear
from sparseprune.config import resolve_threads
from sparseprune.convert.native_module import NativeCall, make_native
from sparseprune.convert.report import ConversionReport, LayerChoice, ModuleChoice
from sparseprune.convert.subclass import overridden_method
from sparseprune.model_copy import deepcopy_model
from sparseprune.nn.sparse_conv import SparseConv2d, UnsupportedLayer, conv_padding
from sparseprune.nn.sparse_linear import SparseLinear, conv1d_as_linear
from sparseprune.prune import is_pruned, remove

POLICIES = ("measure", "threshold")


@dataclass
class _Call:
    """A module's first call while the model ran on the example inputs."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any = None


@dataclass
class ConvertContext:
    """Options, the recorded calls and the report, handed to every layer handler."""

    policy: str
    batch_sizes: Tuple[int, ...]
    num_threads: Optional[int]
    threads: int
    report: ConversionReport
    conv_batch_sizes: Tuple[int, ...] = (1,)
    calls: Dict[int, _Call] = field(default_factory=dict)  # id(module) -> its first call

    def input_shape(self, module: nn.Module) -> Optional[Tuple[int, ...]]:
        call = self.calls.get(id(module))
        if call is None or not call.args or not isinstance(call.args[0], torch.Tensor):
            return None
        return tuple(call.args[0].shape)


# A handler gets (module, dotted path, context) and returns the module to put in its place
# (possibly the same one). It records its decision in context.report.
Handler = Callable[[nn.Module, str, ConvertContext], nn.Module]
# Keyed by class, or by "module.QualName" for classes of packages convert() must not import
# (transformers' Conv1D): a model that uses the class has imported it already.
_HANDLERS: Dict[Union[Type[nn.Module], str], Handler] = {}
# Modules whose forward reads their children's weights directly (not by calling them): replacing a
# child would break them, so outside a compiled part they are left whole.
_OPAQUE_TYPES: Tuple[Type[nn.Module], ...] = (nn.MultiheadAttention,)


def register_converter(module_type: Union[Type[nn.Module], str], handler: Handler) -> None:
    """Teach convert() a layer type to swap when it is not inside a compiled part: an nn.Module
    subclass, or its qualified name ("package.module.ClassName") to match it without importing its
    package. The most specific registered class in the MRO wins.

    A subclass of a registered class that overrides its forward (or _conv_forward) is left as it
    is, since the handler would drop what that forward adds (inside a compiled part it is lowered
    through its own forward); registering the subclass itself (e.g.
    `register_converter(MyConv, convert_conv2d)`) declares its forward equivalent.
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


def _record(ctx: ConvertContext, path: str, layer: nn.Module, kernel: str, reason: str, replacement: nn.Module,
            dense_ms=None, chosen_ms=None, layer_type: str = "") -> nn.Module:
    ctx.report.add(
        LayerChoice(
            path=path,
            layer_type=layer_type or type(layer).__name__,
            shape=tuple(layer.weight.shape),
            sparsity=weight_sparsity(layer.weight),
            kernel=kernel,
            reason=reason,
            dense_ms=dict(dense_ms or {}),
            chosen_ms=dict(chosen_ms or {}),
        )
    )
    return replacement


def _numpy_weight(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().to(torch.float32).cpu().contiguous().numpy()


def _torch_layer(layer: nn.Module) -> Callable[[np.ndarray], torch.Tensor]:
    """The layer itself on a numpy input: the dense candidate convert must beat (torch keeps it)."""
    def run(x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return layer(torch.from_numpy(x))
    return run


def convert_linear(linear: nn.Linear, path: str, ctx: ConvertContext) -> nn.Module:
    """nn.Linear -> SparseLinear when a sparse format beats torch's layer at every batch size
    (compile.kernel_choice.choose_linear), else unchanged."""
    choice = choose_linear(path, _numpy_weight(linear.weight), _numpy_weight(linear.bias), policy=ctx.policy,
                           threads=ctx.threads, rows=ctx.batch_sizes, dense_reference=_torch_layer(linear))
    replacement = linear if choice.kernel == "dense" else \
        SparseLinear.from_dense(linear, choice.fmt, choice.block, num_threads=ctx.num_threads)
    return _record(ctx, path, linear, choice.kernel, choice.reason, replacement, choice.dense_ms, choice.chosen_ms)


# The convolution kernels SparseConv2d runs; the others (dense im2col, depthwise) only in compiled parts.
_LAYER_CONV_KERNELS = ("sparse-conv", "pattern-conv")


def convert_conv2d(conv: nn.Conv2d, path: str, ctx: ConvertContext) -> nn.Module:
    """nn.Conv2d -> SparseConv2d when the sparse or pattern kernel beats torch's layer at the input
    size the example inputs gave it (compile.kernel_choice.choose_conv); without one, by sparsity."""
    try:
        padding = conv_padding(conv)
    except UnsupportedLayer as exc:
        return _record(ctx, path, conv, "dense", f"unsupported: {exc}", conv)
    shape = ctx.input_shape(conv)
    fields = {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
              "kernel": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(padding),
              "dilation": list(conv.dilation), "groups": conv.groups}
    choice = choose_conv(path, _numpy_weight(conv.weight), _numpy_weight(conv.bias), fields, policy=ctx.policy,
                         threads=ctx.threads, in_shape=None if shape is None else shape[-3:],
                         batches=ctx.conv_batch_sizes, kernels=_LAYER_CONV_KERNELS,
                         dense_reference=_torch_layer(conv))
    if choice.kernel == "dense-conv":
        return _record(ctx, path, conv, "dense", choice.reason, conv, choice.dense_ms, choice.chosen_ms)
    sparse = SparseConv2d.from_dense(conv, num_threads=ctx.num_threads, name=path,
                                     patterns=choice.kernel == "pattern-conv")
    return _record(ctx, path, conv, choice.kernel, choice.reason, sparse, choice.dense_ms, choice.chosen_ms)


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
    choice = choose_linear(path, _numpy_weight(linear.weight), _numpy_weight(linear.bias), policy=ctx.policy,
                           threads=ctx.threads, rows=ctx.batch_sizes, dense_reference=_torch_layer(conv1d))
    replacement = conv1d if choice.kernel == "dense" else \
        SparseLinear.from_dense(linear, choice.fmt, choice.block, num_threads=ctx.num_threads).as_conv1d()
    return _record(ctx, path, linear, choice.kernel, choice.reason, replacement, choice.dense_ms, choice.chosen_ms,
                   layer_type=type(conv1d).__name__)


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


# --- compiled parts --------------------------------------------------------------------------------

def _weighted_layers(module: nn.Module):
    """(path, layer) of every Linear / Conv2d / Conv1D-like layer (a 2-D or 4-D `weight` tensor)."""
    for path, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() in (2, 4) and (_handler_for(m)[0] is not None):
            yield path, m


def _holds_pruned_layer(module: nn.Module) -> bool:
    return any(weight_sparsity(m.weight) > 0 for _, m in _weighted_layers(module))


def _record_calls(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Dict[int, _Call]:
    """Run the model once on the example inputs, keeping each module's first call and output."""
    calls: Dict[int, _Call] = {}

    def before(module, a, kw):
        calls.setdefault(id(module), _Call(tuple(a), dict(kw)))

    def after(module, a, kw, output):
        call = calls[id(module)]
        if call.output is None:
            call.output = output

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(m.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _try_native(module: nn.Module, path: str, ctx: ConvertContext, dynamic_shapes) -> bool:
    """Compile `module` as it was called on the example inputs and make it run natively; False (with
    the reason in the report) when compile cannot take it."""
    from sparseprune.compile import compile as compile_model  # compile imports convert's layers

    call = ctx.calls[id(module)]
    name = path or type(module).__name__
    try:
        tensors, constants = _split_arguments(module, call)
        target = module if not constants else _WithConstants(module, constants)
        executable = compile_model(target, (), kwargs=tensors, dynamic_shapes=dynamic_shapes, policy=ctx.policy,
                                   batch_sizes=ctx.batch_sizes, num_threads=ctx.num_threads)
        native = NativeCall(module, call.args, call.kwargs, call.output, executable, ctx.num_threads)
    except Exception as exc:  # compile's refusals, and whatever torch.export raises on model code
        ctx.report.add_module(ModuleChoice(name, type(module).__name__, False, _first_line(exc)))
        return False
    make_native(module, native)
    layers = executable.metadata.get("layers", [])
    ctx.report.add_module(ModuleChoice(name, type(module).__name__, True,
                                       f"compiled: {executable.n_ops} native ops, {len(layers)} weighted layers"))
    for row in layers:
        inner = row["name"][len("module."):] if constants and row["name"].startswith("module.") else row["name"]
        ctx.report.add(LayerChoice(path=f"{path}.{inner}" if path else inner, layer_type=row["op"],
                                   shape=(), sparsity=float(row.get("sparsity", 0.0)),
                                   kernel=_report_kernel(row["kernel"]), reason=f"in {name}: {row.get('reason', '')}"))
    return True


_CONSTANT_TYPES = (bool, int, float, str, type(None))


def _split_arguments(module: nn.Module, call: _Call) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The recorded call's arguments by name: the tensors (the executable's inputs) and the other
    arguments that differ from their defaults. ValueError for a call the executable cannot repeat."""
    signature = inspect.signature(type(module).forward)
    bound = signature.bind(module, *call.args, **call.kwargs)
    tensors, constants = {}, {}
    for name, param in list(signature.parameters.items())[1:]:
        if name not in bound.arguments:
            continue
        value = bound.arguments[name]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if value:
                raise ValueError(f"it is called with *{name} / **{name} arguments")
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif not isinstance(value, _CONSTANT_TYPES):
            raise ValueError(f"its argument {name!r} is a {type(value).__name__}, not a tensor or a constant")
        elif param.default is param.empty or not (type(value) is type(param.default) and value == param.default):
            constants[name] = value
    if not tensors:
        raise ValueError("it is called without tensor arguments")
    return tensors, constants


class _WithConstants(nn.Module):
    """Calls `module` with the tensors given by name plus the constant arguments it was called with."""

    def __init__(self, module: nn.Module, constants: Mapping[str, Any]):
        super().__init__()
        self.module = module
        self.constants = dict(constants)

    def forward(self, **tensors: torch.Tensor) -> Any:
        return self.module(**tensors, **self.constants)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _report_kernel(kernel: str) -> str:
    # The report's "dense" means no sparse kernel; compile names its dense convolution dense-conv.
    return "dense" if kernel == "dense-conv" else kernel


def _convert_layer(module: nn.Module, path: str, ctx: ConvertContext, handler: Handler, registered: type) -> nn.Module:
    own = overridden_method(type(module), registered)
    if own is not None:
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        record_left(
            ctx, path, module, weight if isinstance(weight, torch.Tensor) else None,
            f"left as is: {name} overrides {own} ({registered.__name__}.{own}), which converting would "
            f"drop; give convert example_inputs to compile it through its own forward, or "
            f"register_converter({name}, ...) if it computes the same",
        )
        return module
    return handler(module, path, ctx)


def _convert_tree(module: nn.Module, path: str, ctx: ConvertContext, dynamic_shapes, done: Dict[int, nn.Module]
                  ) -> nn.Module:
    """The module's replacement (itself, made native or with children replaced, or a sparse layer)."""
    if id(module) in done:  # a module used in two places is converted once
        return done[id(module)]
    handler, registered = _handler_for(module)
    if handler is not None:
        result = _convert_layer(module, path, ctx, handler, registered)
    elif id(module) in ctx.calls and _holds_pruned_layer(module) and _try_native(module, path, ctx, dynamic_shapes):
        result = module
    elif isinstance(module, _OPAQUE_TYPES):
        weight = getattr(module, "in_proj_weight", None)
        record_left(ctx, path or type(module).__name__, module, weight,
                    f"{type(module).__name__} reads its projections directly: it is converted only as part of "
                    "a compiled module (give convert example_inputs)")
        result = module
    else:
        for name, child in list(module.named_children()):
            new = _convert_tree(child, f"{path}.{name}" if path else name, ctx, None, done)
            if new is not child:
                setattr(module, name, new)
        result = module
    done[id(module)] = result
    return result


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    kwargs: Optional[Mapping[str, torch.Tensor]] = None,
    dynamic_shapes: Optional[Mapping[str, Any]] = None,
    inplace: bool = False,
    policy: str = "measure",
    batch_sizes: Sequence[int] = (1, 32),
    num_threads: Optional[int] = None,
    conv_batch_sizes: Sequence[int] = (1,),
) -> nn.Module:
    """Return `model` with what can run natively running natively, and the rest in torch.

    With example inputs (`example_inputs`, a tensor or tuple, and/or keyword tensors `kwargs`, as
    for sparseprune.compile), the model is compiled whole when compile can capture it; otherwise
    each of its largest capturable parts that holds a pruned layer is (a part that cannot be
    captured is reported with the reason and its children are tried). A compiled module keeps its
    class, attributes and children; its forward runs the executable, and falls back to torch (with
    a NativeFallbackWarning) for a call the executable does not cover. dynamic_shapes applies to the
    whole model, as in compile (e.g. a dynamic sequence length).

    Linear, Conv2d and transformers Conv1D layers outside the compiled parts (all of them without
    example inputs) are swapped one by one for SparseLinear / SparseConv2d when a sparse kernel beats
    torch's own layer: timed with policy="measure" at `batch_sizes` rows (Linear) or, for a
    convolution, at the input size the example inputs gave it with `conv_batch_sizes` images (by
    sparsity alone without one); policy="threshold" decides by sparsity only. The swapped-in layers
    keep the public attributes of the layers they replace (`weight`, `bias`, `in_features`,
    `kernel_size`, `stride`, `padding`, ...). A subclass that overrides its forward is left as it is
    (see register_converter) unless it is inside a compiled part, where its own forward is lowered.

    Pruned layers are read through their effective weights (sparseprune masks or
    torch.nn.utils.prune). Every decision is in `result.sparseprune_report` (a ConversionReport).
    The result is for inference.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    conv_batch_sizes = tuple(conv_batch_sizes)
    if not conv_batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                       for b in conv_batch_sizes):
        raise ValueError(f"conv_batch_sizes must be positive ints, got {conv_batch_sizes!r}")
    threads = resolve_threads(num_threads)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if args is not None and not isinstance(args, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of input tensors, e.g. (x,)")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict of input tensors by name, got {type(kwargs).__name__}")
    if dynamic_shapes is not None and args is None and kwargs is None:
        raise ValueError("dynamic_shapes needs example inputs (example_inputs= and/or kwargs=)")
    target = model if inplace else deepcopy_model(model)
    target.eval()
    if is_pruned(target):
        remove(target)  # the effective (masked) weights become the plain weights
    ctx = ConvertContext(policy, batch_sizes, num_threads, threads,
                         ConversionReport(policy=policy, num_threads=threads), conv_batch_sizes=conv_batch_sizes)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # torch's layers and the native kernels are timed at the same count
    try:
        if args is not None or kwargs is not None:
            ctx.calls = _record_calls(target, tuple(args or ()), dict(kwargs or {}))
        with torch.no_grad():
            target = _convert_tree(target, "", ctx, dynamic_shapes, {})
    finally:
        torch.set_num_threads(previous)
    ctx.calls = {}  # the recorded example tensors are not kept with the model
    target.sparseprune_report = ctx.report
    return target
