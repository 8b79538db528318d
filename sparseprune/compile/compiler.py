"""compile(): lower a (pruned) PyTorch model to one native executable (issue 5).

The model is copied, put in eval mode and its prunings made permanent; torch's attention modules
and already converted layers are swapped for capturable stand-ins (rewrites.py). torch.export
captures it at the ATen level with the batch dynamic (capture.py), and each ATen node is lowered
to ops of the executable spec (sparseprune.runtime.spec) over per-sample buffers (aten_lowering.py,
on the kernel choice of lowering_base.py / kernel_choice.py), so the executable runs any batch
size. Final passes fuse activations and shortcut adds into the ops producing their inputs and drop
what nothing reads (passes.py). The executable is then run on the example inputs and must match
the model within fp32 tolerance.

Anything the executor cannot run stops compile with UnsupportedOperation naming the ATen op (or
the module setting) and the module path; sparseprune.convert still works for such models (it
replaces supported layers one by one and leaves the rest to torch).
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from sparseprune.compile.aten_lowering import AtenLowering
from sparseprune.compile.capture import capture
from sparseprune.compile.errors import CONVERT_HINT, UnsupportedOperation, VerificationError
from sparseprune.compile.passes import _compact, _drop_dead_ops, _fuse_activations, _fuse_residual_adds
from sparseprune.compile.rewrites import converted_layers, rewrite_for_capture
from sparseprune.config import resolve_threads
from sparseprune.nn.sparse_conv import SparseConv2d
from sparseprune.nn.sparse_linear import SparseLinear
from sparseprune.prune import is_pruned, remove
from sparseprune.runtime import Executable
from sparseprune.runtime.spec import SPEC_FORMAT, SPEC_VERSION

POLICIES = ("measure", "threshold")


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


def _check_batch_sizes(batch_sizes: Sequence[int]) -> Tuple[int, ...]:
    sizes = tuple(batch_sizes) if isinstance(batch_sizes, (tuple, list)) else None
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive ints, got {batch_sizes!r}")
    return sizes


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


def compile(
    model: nn.Module,
    example_inputs=(),
    *,
    kwargs: Optional[Mapping[str, torch.Tensor]] = None,
    dynamic_shapes: Optional[Mapping[str, Any]] = None,
    policy: str = "measure",
    batch_sizes: Optional[Sequence[int]] = None,
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
    the one its sparsity picks (policy="threshold"); kernels are timed at the example's batch, or at
    each of `batch_sizes` (e.g. (1, 64): the smallest and largest batch a service sees). A layer
    whose sparse kernel wins the small batches and dense the large ones keeps the sparse format and
    switches to dense from the batch where the measured times cross (the op's "dense_from": the
    file stores the sparse arrays only, the plan builds the dense weights at load); otherwise the
    kernel fastest over all of them (geometric mean) runs at every batch. num_threads: the threads
    used to time and check (default: torch's count); the executable's own count is set at load.

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
    work = rewrite_for_capture(work)  # torch's attention modules and converted layers, capturable
    with torch.no_grad():
        captured = capture(work, tuple(args), kwargs, dynamic_shapes)
    lowering = AtenLowering(captured, policy, threads, converted=converted_layers(work))
    if batch_sizes is not None:
        lowering.batches = _check_batch_sizes(batch_sizes)
    lowering.lower()
    inputs, expected = captured.example_inputs, captured.expected
    dims = {name: {"min": lo, "max": hi} for name, lo, hi, _ in captured.dims.values()}
    if not lowering.ops:
        raise UnsupportedOperation(
            f"{type(model).__name__} computes nothing the executor runs (no ops). {CONVERT_HINT}")
    for buffer, name in zip(lowering.outputs, captured.output_names):
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
            "frontend": "torch.export",
            "output_kind": captured.output_kind,
            "layers": lowering.layers,
        },
    }
    executable = Executable.from_spec(spec, lowering.arrays, n_threads=num_threads)
    if check:
        verify(executable, inputs, [t.detach().numpy() if isinstance(t, torch.Tensor) else t for t in expected])
    return executable
