"""compile(): lower a (pruned) PyTorch model to one native executable (issue 5).

The model is copied, put in eval mode, its prunings made permanent, BatchNorms folded into the
convolutions before them and ReLUs after Linear/Conv marked for fusion (convert.fusion), then
traced with torch.fx. ShapeProp on the example inputs gives every value's shape; each node is
lowered to an op of the executable spec (sparseprune.runtime.spec) over buffers whose shapes are
per sample, so the executable runs any batch size. A final pass fuses an activation into the
op producing its input and drops buffers nothing uses. The executable is then run on the example
inputs and must match the model within fp32 tolerance.

Anything the executor cannot run stops compile with UnsupportedOperation naming the op and the
module path; sparseprune.convert still works for such models (it replaces supported layers one
by one and leaves the rest to torch).

Modules of this package: compiler.py (this flow), lowering.py (node -> ops, with the mixins
lowering_attention.py and lowering_tensors.py), kernel_choice.py (format arrays, timing plans),
passes.py (fusions, dead ops, compaction), torch_ops.py (recognised torch ops, the tracer),
values.py (what nodes lower to), errors.py.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from sparseprune.compile.errors import (
    CONVERT_HINT,
    UnsupportedOperation,
    VerificationError,
)
from sparseprune.compile.aten_lowering import AtenLowering
from sparseprune.compile.capture import capture
from sparseprune.compile.lowering import _Lowering
from sparseprune.compile.passes import (
    _compact,
    _drop_dead_ops,
    _fuse_activations,
    _fuse_residual_adds,
    _strip_name_prefix,
)
from sparseprune.compile.torch_ops import _Tracer
from sparseprune.config import resolve_threads
from sparseprune.convert.fusion import prepare_fusions
from sparseprune.nn.sparse_conv import SparseConv2d
from sparseprune.nn.sparse_linear import SparseLinear
from sparseprune.prune import is_pruned, remove
from sparseprune.runtime import Executable
from sparseprune.runtime.spec import SPEC_FORMAT, SPEC_VERSION

POLICIES = ("measure", "threshold")
# An ATen lowering error inside torch's attention modules, which the fx lowering handles whole.
_FX_TERRITORY = "(torch.nn.modules."


# The executable must reproduce the model within fp32 rounding: |y - ref| <= ATOL_SCALE *
# max(1, max|ref|) + RTOL * |ref|. Folding BatchNorm and summing in another order change results
# by ~1e-6 relative per layer; 1e-4 leaves room for deep networks while catching any real error
# (a wrong op or weight is off by far more).
RTOL = 1e-4
ATOL_SCALE = 1e-4


def _copy_model(model: nn.Module) -> nn.Module:
    """model_copy.deepcopy_model, sharing the native packed weights of already converted layers
    (immutable, and not copyable)."""
    memo = {}
    for m in model.modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            memo[id(m.packed)] = m.packed
    saved = []
    for module in model.modules():  # non-leaf weights of torch.nn.utils.prune (see deepcopy_model)
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                saved.append((module, key, value))
                setattr(module, key, value.detach())
    try:
        return copy.deepcopy(model, memo)
    finally:
        for module, key, value in saved:
            setattr(module, key, value)


def _as_inputs(example_inputs) -> Tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of input tensors, e.g. (x,)")
    for k, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{k}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.int64, torch.int32, torch.bool) or x.device.type != "cpu":
            raise TypeError(f"example_inputs[{k}] must be a float32 CPU tensor (or integer token ids, or a bool "
                            f"padding mask), got {x.dtype} on {x.device}")
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"example_inputs[{k}] must have a batch dimension of at least 1 plus one more "
                             f"dimension, got shape {tuple(x.shape)}")
    batches = {int(x.shape[0]) for x in example_inputs}
    if len(batches) != 1:
        raise ValueError(f"example_inputs must share one batch size, got {sorted(batches)}")
    return tuple(x.detach() for x in example_inputs)


def _model_outputs(result) -> List[np.ndarray]:
    items = list(result) if isinstance(result, (tuple, list)) else [result]
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise UnsupportedOperation(f"the model returns {type(result).__name__}: outputs must be a tensor or a "
                                   f"tuple/list of tensors. {CONVERT_HINT}")
    return [t.detach().cpu().numpy() for t in items]


class _SingleModule(nn.Module):
    """A module that only calls its one child "0" (so fx records the child as one call)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.add_module("0", module)


# fx needs a fixed signature: one wrapper per input count (a MultiheadAttention takes q, k, v, mask).
_WRAPPERS = {
    1: type("_Wrap1", (_SingleModule,), {"forward": lambda self, a: self._modules["0"](a)}),
    2: type("_Wrap2", (_SingleModule,), {"forward": lambda self, a, b: self._modules["0"](a, b)}),
    3: type("_Wrap3", (_SingleModule,), {"forward": lambda self, a, b, c: self._modules["0"](a, b, c)}),
    4: type("_Wrap4", (_SingleModule,), {"forward": lambda self, a, b, c, d: self._modules["0"](a, b, c, d)}),
}


def _wrap_single_module(module: nn.Module, n_inputs: int) -> nn.Module:
    if n_inputs not in _WRAPPERS:
        raise UnsupportedOperation(f"a bare {type(module).__name__} called with {n_inputs} inputs: wrap it in a "
                                   f"module of your own. {CONVERT_HINT}")
    return _WRAPPERS[n_inputs](module)


def verify(executable: Executable, example_inputs: Sequence[torch.Tensor], expected: Sequence[np.ndarray]) -> float:
    """Run `executable` on the example inputs; raise VerificationError unless every output is
    within fp32 tolerance of `expected`. Returns the largest absolute difference."""
    got = executable.run(*[x.contiguous().numpy() for x in example_inputs])
    got = list(got.values()) if isinstance(got, dict) else list(got) if isinstance(got, (tuple, list)) else [got]
    worst = 0.0
    for k, (y, ref) in enumerate(zip(got, expected)):
        if y.shape != ref.shape:
            raise VerificationError(f"output {k} has shape {y.shape}, the model's has {ref.shape}")
        both_nan = np.isnan(y) & np.isnan(ref)  # e.g. a query whose keys are all padding, in both
        diff = np.where(both_nan, 0.0, np.abs(y.astype(np.float64) - ref.astype(np.float64)))
        finite = ref[np.isfinite(ref)]
        scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
        bad = ~(diff <= ATOL_SCALE * scale + RTOL * np.abs(np.nan_to_num(ref)))
        if bad.any():
            raise VerificationError(
                f"output {k} differs from the model beyond fp32 tolerance: max |diff| = {float(np.nanmax(diff)):.3g} "
                f"at {int(bad.sum())} of {bad.size} entries (scale {scale:.3g}); please report this as a bug"
            )
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
    return worst


def _lower_with_fx(model: nn.Module, example_inputs, policy: str, threads: int):
    """The torch.fx lowering of module-level graphs: (lowering, inputs, expected outputs)."""
    inputs = _as_inputs(tuple(example_inputs))
    batch = int(inputs[0].shape[0])
    work = _copy_model(model).eval()
    wrapped = _Tracer().is_leaf_module(work, "")
    if wrapped:  # a single layer (or attention module): fx would trace into its forward
        work = _wrap_single_module(work, len(inputs))
    if is_pruned(work):
        remove(work)
    with torch.no_grad():
        expected = _model_outputs(work(*inputs))
        prepare_fusions(work)
        try:
            graph = _Tracer().trace(work)
        except Exception as exc:
            raise UnsupportedOperation(
                f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. {CONVERT_HINT}"
            ) from exc
        gm = fx.GraphModule(work, graph, type(work).__name__)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as exc:
            raise UnsupportedOperation(
                f"the torch.fx trace of {type(model).__name__} does not run on example_inputs "
                f"({type(exc).__name__}: {exc}). {CONVERT_HINT}"
            ) from exc
    lowering = _Lowering(gm, batch, policy, threads)
    lowering.lower()
    if wrapped:  # name layers as in the caller's module ("linear1", not "0.linear1")
        _strip_name_prefix(lowering, "0.")
    return lowering, inputs, expected


def compile(
    model: nn.Module,
    example_inputs=(),
    *,
    kwargs: Optional[Mapping[str, torch.Tensor]] = None,
    dynamic_shapes: Optional[Mapping[str, Any]] = None,
    policy: str = "measure",
    num_threads: Optional[int] = None,
    check: bool = True,
) -> Executable:
    """Lower `model` to one native Executable that runs the whole network in a single call.

    example_inputs: a tensor or tuple of positional example tensors [batch, ...] (batch >= 1);
    kwargs: keyword example tensors (e.g. {"input_ids": ids, "attention_mask": mask}). Inputs are
    float32, int64 token ids or bool masks (an integer mask the model only converts to bool is
    taken as a mask too). The model is captured with torch.export: the batch is always dynamic;
    dynamic_shapes adds per-sample dynamic dims in torch.export's form, e.g.
    {"input_ids": {1: torch.export.Dim("seq", max=512)}} — one executable then serves every
    sequence length up to the maximum. The executable takes the inputs in the order positional,
    then keyword, and returns the model's output structure (a tensor, a tuple, or for a dict /
    transformers ModelOutput a dict of arrays by name).

    BatchNorm after a convolution is folded in, activations and shortcut adds are fused, pruned
    layers are read through their effective (masked) weights, and every Linear/Conv2d gets the
    kernel that is fastest on this machine (policy="measure", timed as the executor runs it) or
    the one its sparsity picks (policy="threshold"). num_threads: the threads used to time and
    check (default: torch's count); the executable's own count is set at load.

    Raises UnsupportedOperation (a ValueError) naming the ATen op and the module path when the
    model uses something the executor does not run (sparseprune.convert still works then), and
    VerificationError when check=True and the executable does not reproduce the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    threads = resolve_threads(num_threads)  # validates num_threads
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of input tensors, e.g. (x,)")
    kwargs = dict(kwargs or {})
    if not args and not kwargs:
        raise TypeError("compile needs example inputs: example_inputs=(x,) and/or kwargs={'name': x}")

    work = _copy_model(model).eval()
    if is_pruned(work):
        remove(work)  # the effective (masked) weights become the plain weights of the copy
    try:
        with torch.no_grad():
            captured = capture(work, tuple(args), kwargs, dynamic_shapes)
        lowering = AtenLowering(captured, policy, threads)
        lowering.lower()
        inputs, expected, output_kind, output_names = captured.example_inputs, captured.expected, \
            captured.output_kind, captured.output_names
        dims = {name: {"min": lo, "max": hi} for name, lo, hi, _ in captured.dims.values()}
        frontend = "torch.export"
    except UnsupportedOperation as primary:
        if kwargs or dynamic_shapes:
            raise
        # Transitional: torch.fx still lowers nn.MultiheadAttention / nn.TransformerEncoder(Layer)
        # (batch_first) as whole modules, which the ATen lowering cannot yet (their ATen graph
        # moves the batch axis). Its error is not shown: the ATen one is the one to act on.
        try:
            lowering, inputs, expected = _lower_with_fx(model, args, policy, threads)
        except UnsupportedOperation as legacy:
            if _FX_TERRITORY in str(primary):
                raise legacy from None  # the attention modules fx handles: its message is the precise one
            raise primary from None
        output_kind = "tensor" if len(expected) == 1 else "tuple"
        output_names = [f"output_{k}" for k in range(len(expected))] if len(expected) > 1 else ["output"]
        dims, frontend = {}, "torch.fx"
    if not lowering.ops:
        raise UnsupportedOperation(
            f"{type(model).__name__} computes nothing the executor runs (no ops). {CONVERT_HINT}")
    for buffer, name in zip(lowering.outputs, output_names):
        lowering.buffers[buffer]["name"] = name
    ops = _drop_dead_ops(lowering.buffers, lowering.ops, lowering.outputs)
    ops = _fuse_activations(lowering.buffers, ops, lowering.outputs)
    ops = _fuse_residual_adds(lowering.buffers, ops, lowering.outputs)
    buffers, ops, ins, outs = _compact(lowering.buffers, ops, lowering.inputs, lowering.outputs)
    for op in ops:
        if op.get("activation", "x") is None:
            del op["activation"]
    spec = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "buffers": buffers,
        "inputs": ins,
        "outputs": outs,
        "ops": ops,
        **({"dims": dims} if dims else {}),
        **({"input_dtypes": lowering.input_dtypes} if set(lowering.input_dtypes) != {"float32"} else {}),
        "metadata": {
            "producer": f"sparseprune {getattr(sys.modules.get('sparseprune'), '__version__', 'unknown')}",
            "model": type(model).__name__,
            "policy": policy,
            "example_batch": int(inputs[0].shape[0]),
            "frontend": frontend,
            "output_kind": output_kind,
            "layers": lowering.layers,
        },
    }
    executable = Executable.from_spec(spec, lowering.arrays, n_threads=num_threads)
    if check:
        verify(executable, inputs, [t.detach().numpy() if isinstance(t, torch.Tensor) else t for t in expected])
    return executable
