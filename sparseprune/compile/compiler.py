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
"""
from __future__ import annotations

import copy
import json
import math
import operator
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from sparseprune import formats
from sparseprune.config import resolve_threads
from sparseprune.convert.fusion import fuses_relu, prepare_fusions
from sparseprune.convert.selection import CSR_SPARSITY_THRESHOLD, MIN_BLOCK_FILL
from sparseprune.nn.sparse_conv import SparseConv2d, UnsupportedLayer, conv_padding, count_kernel_patterns
from sparseprune.nn.sparse_linear import SparseLinear
from sparseprune.prune import is_pruned, remove
from sparseprune._native import _C
from sparseprune.runtime import Executable
from sparseprune.runtime.spec import MAX_KERNEL_PATTERNS, SPEC_FORMAT, SPEC_VERSION
from sparseprune.timing import time_interleaved

POLICIES = ("measure", "threshold")

# The "threshold" policy for convolutions: the direct sparse kernel from this sparsity, the dense
# im2col GEMM below it. On the reference machine (2 threads, ResNet-18 3x3 layers at batch 1) the
# sparse kernel takes ~1.3x the dense GEMM's time on dense weights and ~0.6x at 70% sparsity;
# they cross near 40-50%.
CONV_SPARSITY_THRESHOLD = 0.5

# The executable must reproduce the model within fp32 rounding: |y - ref| <= ATOL_SCALE *
# max(1, max|ref|) + RTOL * |ref|. Folding BatchNorm and summing in another order change results
# by ~1e-6 relative per layer; 1e-4 leaves room for deep networks while catching any real error
# (a wrong op or weight is off by far more).
RTOL = 1e-4
ATOL_SCALE = 1e-4

_CONVERT_HINT = (
    "sparseprune.convert(model) still works for this model: it swaps the supported layers for "
    "sparse modules one by one and leaves the rest to torch"
)


class UnsupportedOperation(ValueError):
    """The model uses an op (or an op setting) the native executor does not run."""


class VerificationError(RuntimeError):
    """The compiled executable does not reproduce the model on the example inputs."""


@dataclass(frozen=True)
class _Tensor:
    buffer: int


class _Batch:
    """The batch size (x.size(0), x.shape[0]): symbolic, so the executable takes any batch."""

    def __repr__(self) -> str:
        return "<batch>"


_BATCH = _Batch()
_NOT_CONSTANT = object()  # fold_constant's "this node depends on a model input"


@dataclass(frozen=True)
class _Param:
    """A tensor attribute (get_attr): only usable where an op takes a parameter (layer_norm)."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class _NotComputed:
    """A result the executable does not compute (e.g. MultiheadAttention's attention weights):
    fine while unused, an error once an op reads it."""

    what: str


_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardswish: "hardswish",
}
_ACTIVATION_FUNCTIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardswish: "hardswish",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_SUB = (operator.sub, torch.sub)
_DIV = (operator.truediv, torch.div)


# torch's attention modules branch on tensor properties (fast paths) and cannot be traced: they
# stay whole and are lowered from their parameters (_Lowering.lower_mha and friends).
_ATTENTION_LEAVES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


class _Tracer(fx.Tracer):
    """fx's tracer, also keeping sparseprune's native modules (their forward is numpy) and torch's
    attention modules whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (SparseLinear, SparseConv2d)) or type(m) in _ATTENTION_LEAVES
                or super().is_leaf_module(m, module_qualified_name))


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _fn_name(target) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch") or module == "":
        # F.linear, F.gelu, F.scaled_dot_product_attention... are builtins of torch._C._nn
        prefix = "torch.nn.functional" if module in ("torch.nn.functional", "torch._C._nn") else "torch"
        return f"{prefix}.{name}"
    return f"{module}.{name}"


class _Lowering:
    def __init__(self, gm: fx.GraphModule, batch: int, policy: str, threads: int):
        self.gm = gm
        self.batch = batch
        self.policy = policy
        self.threads = threads
        self.buffers: List[Dict[str, Any]] = []
        self.ops: List[Dict[str, Any]] = []
        self.arrays: Dict[str, np.ndarray] = {}
        self.layers: List[Dict[str, Any]] = []  # metadata: one row per weighted layer
        self.packed_names: Dict[int, str] = {}  # id(module) -> weight name (shared modules packed once)
        self.env: Dict[fx.Node, Any] = {}
        self.inputs: List[int] = []
        self.outputs: List[int] = []
        self._linear_fields: Dict[str, Dict[str, Any]] = {}  # weight name -> spec fields
        self._conv_fields: Dict[str, Dict[str, Any]] = {}
        self._param_pairs: Dict[Any, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.id_buffers: set = set()  # inputs holding integer ids (embedding lookups only)
        self.input_dtypes: List[str] = []
        self.transposed: Dict[int, int] = {}  # buffer -> the buffer it is the last-two-dims transpose of

    # --- helpers -------------------------------------------------------------------------------

    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            return f"module '{node.target}' ({type(module).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        inside = ""
        if stack:
            path, cls = list(stack.values())[-1]
            inside = f" inside module '{path}' ({getattr(cls, '__name__', cls)})"
        what = _fn_name(node.target) if node.op != "call_method" else f"Tensor.{node.target}"
        return f"'{what}' (node '{node.name}'){inside}"

    def fail(self, node: fx.Node, why: str) -> UnsupportedOperation:
        return UnsupportedOperation(f"cannot compile {self.where(node)}: {why}. {_CONVERT_HINT}")

    def new_buffer(self, shape: Sequence[int], name: str, alias_of: Optional[int] = None) -> int:
        self.buffers.append({"shape": [int(d) for d in shape], "alias_of": alias_of, "name": name})
        return len(self.buffers) - 1

    def shape_of(self, buffer: int) -> Tuple[int, ...]:
        return tuple(self.buffers[buffer]["shape"])

    def sample_shape(self, node: fx.Node, allow_ids: bool = False) -> Tuple[int, ...]:
        """Per-sample shape of the tensor `node` computes (from ShapeProp), checked."""
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise self.fail(node, "its result is not a single tensor")
        shape = tuple(int(d) for d in meta.shape)
        if allow_ids and meta.dtype in (torch.int64, torch.int32):
            pass
        elif meta.dtype != torch.float32:
            raise self.fail(node, f"it computes a {meta.dtype} tensor (the executor runs float32 only)")
        if len(shape) < 2:
            raise self.fail(node, f"its result has shape {shape}: the executor needs a batch dimension plus at "
                                  "least one per-sample dimension")
        if shape[0] != self.batch:
            raise self.fail(node, f"its result has shape {shape}, whose first dimension is not the batch "
                                  f"({self.batch})")
        return shape[1:]

    def tensor(self, node: fx.Node, value: Any, what: str = "input", allow_ids: bool = False) -> int:
        if isinstance(value, fx.Node):
            value = self.env[value]
        if not isinstance(value, _Tensor):
            raise self.fail(node, f"its {what} is {self._describe(value)}, not an activation tensor")
        if value.buffer in self.id_buffers and not allow_ids:
            raise self.fail(node, f"its {what} is an integer (token id) input: the executor only feeds those to "
                                  "embeddings")
        return value.buffer

    @staticmethod
    def _describe(value: Any) -> str:
        if isinstance(value, _Param):
            return "a parameter/constant tensor"
        if isinstance(value, _NotComputed):
            return f"{value.what}, which the executable does not compute"
        return f"the constant {value!r:.60}"

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            v = node.args[index]
        else:
            v = node.kwargs.get(name, default)
        if isinstance(v, fx.Node):
            return self.env[v]
        if isinstance(v, (list, tuple)):
            items = [self.env[x] if isinstance(x, fx.Node) else x for x in v]
            return tuple(items) if isinstance(v, tuple) else items
        return v

    def emit(self, op: Dict[str, Any], node: fx.Node) -> _Tensor:
        """Append `op`, writing a new buffer shaped like `node`'s result."""
        out = self.new_buffer(self.sample_shape(node), node.name)
        op["out"] = out
        self.ops.append(op)
        return _Tensor(out)

    def emit_shaped(self, op: Dict[str, Any], shape: Sequence[int], name: str) -> int:
        """Append `op`, writing a new buffer of per-sample `shape` (for ops inside a lowered module)."""
        out = self.new_buffer(shape, name)
        op["out"] = out
        self.ops.append(op)
        return out

    def reshape(self, node: fx.Node, src: int) -> _Tensor:
        """A view of `src` with `node`'s per-sample shape (same storage: buffers are contiguous)."""
        shape = self.sample_shape(node)
        if math.prod(shape) != math.prod(self.shape_of(src)):
            raise self.fail(node, "it changes the number of elements per sample")
        if shape == self.shape_of(src):
            return _Tensor(src)
        return _Tensor(self.new_buffer(shape, node.name, alias_of=src))

    # --- weighted layers -----------------------------------------------------------------------

    def linear_arrays(self, layer: Any, path: str, x_rows: int) -> Tuple[str, Dict[str, Any]]:
        """Pack a Linear/SparseLinear (or a (weight, bias) pair of tensors) once; returns its
        weight name and the spec fields."""
        if id(layer) in self.packed_names:
            name = self.packed_names[id(layer)]
            return name, self._linear_fields[name]
        name = path
        if isinstance(layer, SparseLinear):
            p = layer.packed
            fmt, block = p.format, tuple(p.block_shape)
            rows, cols = p.shape
            arrays = _sparse_arrays(name, p.indptr, p.indices, p.values, p.bias)
            kernel, reason = (fmt if fmt == "csr" else "bsr{}x{}".format(*block)), "already converted"
            sparsity = layer.sparsity
        else:
            w_t, b_t = (layer.weight, layer.bias) if isinstance(layer, nn.Module) else layer
            weight = w_t.detach().to(torch.float32).cpu().contiguous().numpy()
            bias = None if b_t is None else b_t.detach().to(torch.float32).cpu().numpy().reshape(-1)
            rows, cols = weight.shape
            sparsity = 1.0 - np.count_nonzero(weight) / max(weight.size, 1)
            kernel, fmt, block, arrays, reason = self.choose_linear_format(name, weight, bias, sparsity, x_rows)
        self.arrays.update(arrays)
        fields = {"weight": name, "format": fmt, "block": list(block), "rows": int(rows), "cols": int(cols)}
        self.packed_names[id(layer)] = name
        self._linear_fields[name] = fields
        self.layers.append({"name": path, "op": "linear", "kernel": kernel, "sparsity": round(float(sparsity), 6),
                            "reason": reason})
        return name, fields

    def choose_linear_format(self, name: str, weight: np.ndarray, bias, sparsity: float, x_rows: int):
        """dense, csr or a block format: with policy="measure" the fastest on this machine, timed as
        the executor runs it (a one-op plan) at the row count the layer sees on the example inputs;
        with "threshold", csr from CSR_SPARSITY_THRESHOLD sparsity, else dense."""
        candidates = {"dense": ("dense", (1, 1))}
        if sparsity > 0.0:
            candidates["csr"] = ("csr", (1, 1))
            for r, c in formats.BLOCK_SHAPES:
                if formats.block_fill(weight, r, c) >= MIN_BLOCK_FILL:
                    candidates[f"bsr{r}x{c}"] = ("bsr", (r, c))
        arrays = {k: _linear_format_arrays(name, weight, bias, fmt, block) for k, (fmt, block) in candidates.items()}
        if self.policy == "threshold":
            best = "csr" if sparsity >= CSR_SPARSITY_THRESHOLD else "dense"
            why = f"policy='threshold': sparsity {sparsity:.2f} {'>=' if best == 'csr' else '<'} {CSR_SPARSITY_THRESHOLD}"
        else:
            rows, cols = weight.shape
            x = np.random.default_rng(0).standard_normal((max(x_rows, 1), cols)).astype(np.float32)
            plans = {k: _one_linear_plan(arrays[k], name, fmt, block, rows, cols, bias is not None)
                     for k, (fmt, block) in candidates.items()}
            fns = {k: (lambda p=p: p.run([x], self.threads)) for k, p in plans.items()}
            times = time_interleaved(fns, warmup=1, repeats=5, min_time_s=0.005)
            best = min(times, key=lambda k: times[k].min_s)
            why = f"fastest measured of {sorted(candidates)} at {x_rows} rows"
        fmt, block = candidates[best]
        return best, fmt, block, arrays[best], why

    def linear_op(self, node: fx.Node, src: int, layer: Any, path: str, activation: Optional[str] = None) -> Tuple[Dict[str, Any], Tuple[int, ...]]:
        """The spec op applying `layer` to buffer `src`, and its output's per-sample shape."""
        shape = self.shape_of(src)
        x_rows = self.batch * math.prod(shape[:-1])
        name, fields = self.linear_arrays(layer, path, x_rows)
        if shape[-1] != fields["cols"]:
            raise self.fail(node, f"its input has {shape[-1]} features, the layer expects {fields['cols']}")
        op = {"op": "linear", "name": path, "in": src, **fields, "activation": activation}
        return op, shape[:-1] + (fields["rows"],)

    def lower_linear(self, node: fx.Node, layer: Any, relu: bool, path: Optional[str] = None) -> _Tensor:
        src = self.tensor(node, node.args[0])
        op, _ = self.linear_op(node, src, layer, node.target if path is None else path, "relu" if relu else None)
        return self.emit(op, node)

    def lower_conv(self, node: fx.Node, layer: nn.Module, relu: bool) -> _Tensor:
        src = self.tensor(node, node.args[0])
        if id(layer) in self.packed_names:
            name = self.packed_names[id(layer)]
            fields = self._conv_fields[name]
        else:
            name = node.target
            if isinstance(layer, SparseConv2d):
                p = layer.packed
                fields = {"in_channels": p.in_channels, "out_channels": p.out_channels,
                          "kernel": _pair(p.kernel_size), "stride": _pair(p.stride), "padding": _pair(p.padding),
                          "dilation": _pair(p.dilation), "groups": int(p.groups)}
                arrays = _conv_sparse_arrays(name, p.row_ptr, p.taps, p.values, p.bias)
                kernel, reason, sparsity = layer.kernel, "already converted", layer.sparsity
            else:
                try:
                    padding = conv_padding(layer)
                except UnsupportedLayer as exc:
                    raise self.fail(node, str(exc)) from None
                weight = layer.weight.detach().to(torch.float32).cpu().contiguous().numpy()
                bias = None if layer.bias is None else layer.bias.detach().to(torch.float32).cpu().numpy()
                fields = {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                          "kernel": _pair(layer.kernel_size), "stride": _pair(layer.stride),
                          "padding": list(padding), "dilation": _pair(layer.dilation), "groups": int(layer.groups)}
                sparsity = 1.0 - np.count_nonzero(weight) / max(weight.size, 1)
                kernel, arrays, reason = self.choose_conv_format(name, weight, bias, fields, sparsity,
                                                                 self.shape_of(src))
            if kernel != "sparse-conv":
                fields = {**fields, "format": _CONV_FORMATS[kernel]}
            self.arrays.update(arrays)
            self.packed_names[id(layer)] = name
            self._conv_fields[name] = fields
            self.layers.append({"name": name, "op": "conv2d", "kernel": kernel,
                                "sparsity": round(float(sparsity), 6), "reason": reason})
        shape = self.shape_of(src)
        if len(shape) != 3 or shape[0] != fields["in_channels"]:
            raise self.fail(node, f"its input has per-sample shape {shape}, the layer expects "
                                  f"({fields['in_channels']}, H, W)")
        op = {"op": "conv2d", "name": node.target, "in": src, "weight": name, **fields,
              "activation": "relu" if relu else None}
        return self.emit(op, node)

    def choose_conv_format(self, name: str, weight: np.ndarray, bias, fields: Dict[str, Any], sparsity: float,
                           in_shape: Tuple[int, ...]):
        """The direct sparse kernel, the pattern kernel (when the k x k kernels use at most
        MAX_KERNEL_PATTERNS patterns) or the dense im2col GEMM: with policy="measure" the fastest as
        the executor runs them (one-op plans at the example's input size), with "threshold" sparse
        from CONV_SPARSITY_THRESHOLD, else dense."""
        candidates = {"sparse-conv": _conv_sparse_arrays(name, *formats.conv_arrays(weight), bias)}
        kh, kw = fields["kernel"]
        depthwise = fields["groups"] == fields["in_channels"] == fields["out_channels"] and kh * kw <= 64
        if depthwise:  # the depthwise kernel reads the same arrays
            candidates["depthwise-conv"] = candidates["sparse-conv"]
            if self.policy == "threshold":
                return "depthwise-conv", candidates["depthwise-conv"], "policy='threshold': a depthwise layer"
        if self.policy == "measure" and sparsity > 0 and 1 < kh * kw <= 64 and \
                count_kernel_patterns(weight) <= MAX_KERNEL_PATTERNS:
            candidates["pattern-conv"] = candidates["sparse-conv"]  # the same arrays, another kernel
        dense = {f"{name}.weight": np.ascontiguousarray(weight)}
        if bias is not None:
            dense[f"{name}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
        candidates["dense-conv"] = dense
        if self.policy == "threshold":
            best = "sparse-conv" if sparsity >= CONV_SPARSITY_THRESHOLD else "dense-conv"
            why = (f"policy='threshold': sparsity {sparsity:.2f} {'>=' if best == 'sparse-conv' else '<'} "
                   f"{CONV_SPARSITY_THRESHOLD}")
            return best, candidates[best], why
        x = np.random.default_rng(0).standard_normal((self.batch,) + tuple(in_shape)).astype(np.float32)
        plans = {k: _one_conv_plan(arrays, name, fields, _CONV_FORMATS[k], in_shape) for k, arrays in candidates.items()}
        times = time_interleaved({k: (lambda p=p: p.run([x], self.threads)) for k, p in plans.items()},
                                 warmup=1, repeats=3, min_time_s=0.005)
        best = min(times, key=lambda k: times[k].min_s)
        return best, candidates[best], f"fastest measured of {sorted(candidates)} at batch {self.batch}"

    # --- other ops -----------------------------------------------------------------------------

    def activation(self, node: fx.Node, kind: str, src_value: Any) -> _Tensor:
        src = self.tensor(node, src_value)
        return self.emit({"op": "activation", "kind": kind, "in": src, "name": node.name}, node)

    def binary(self, node: fx.Node, kind: str) -> _Tensor:
        """add / mul / sub / div of two activations of one shape, or of an activation and a model
        constant (a parameter or a folded tensor, broadcast to the activation's per-sample shape
        and written by a "constant" op)."""
        if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
            raise self.fail(node, "only the two-operand form is supported")
        if node.kwargs.get("alpha", 1) != 1:
            raise self.fail(node, "alpha != 1 is not supported")
        a_val, b_val = (self.env[v] if isinstance(v, fx.Node) else v for v in node.args)
        if isinstance(a_val, _Param) and isinstance(b_val, _Tensor):
            t = self.tensor(node, b_val, "second operand")
            if kind == "div":
                raise self.fail(node, "a constant divided by an activation")
            if kind == "sub":  # c - t = (-t) + c
                t = self.emit_shaped({"op": "affine", "in": t, "scale": -1.0, "shift": 0.0, "name": f"{node.name}_neg"},
                                     self.shape_of(t), f"{node.name}_neg")
                kind = "add"
            c = self.constant(node, a_val.tensor, self.shape_of(t))
            return self.emit({"op": kind, "a": c, "b": t, "activation": None, "name": node.name}, node)
        if isinstance(b_val, _Param) and isinstance(a_val, _Tensor):
            t = self.tensor(node, a_val, "first operand")
            value = b_val.tensor.detach().to(torch.float32)
            if kind == "sub":
                value, kind = -value, "add"
            elif kind == "div":
                value, kind = 1.0 / value, "mul"
            c = self.constant(node, value, self.shape_of(t))
            return self.emit({"op": kind, "a": t, "b": c, "activation": None, "name": node.name}, node)
        a = self.tensor(node, a_val, "first operand")
        b = self.tensor(node, b_val, "second operand")
        if self.shape_of(a) != self.shape_of(b):
            raise self.fail(node, f"operands of per-sample shapes {self.shape_of(a)} and {self.shape_of(b)} "
                                  "need broadcasting, which the executor does not do")
        if kind == "div":
            raise self.fail(node, "division of two activations")
        if kind == "sub":  # a - b = a + (-b)
            b = self.emit_shaped({"op": "affine", "in": b, "scale": -1.0, "shift": 0.0, "name": f"{node.name}_neg"},
                                 self.shape_of(b), f"{node.name}_neg")
            kind = "add"
        return self.emit({"op": kind, "a": a, "b": b, "activation": None, "name": node.name}, node)

    def constant(self, node: fx.Node, value: torch.Tensor, shape: Sequence[int]) -> int:
        """A buffer of per-sample `shape` holding `value` broadcast to it in every sample."""
        value = value.detach().to(torch.float32).cpu()
        full = (1,) + tuple(shape)
        if value.dim() > len(full) or (value.dim() == len(full) and value.shape[0] != 1):
            raise self.fail(node, f"a constant of shape {tuple(value.shape)} does not broadcast to one sample "
                                  f"{tuple(shape)} (it would differ between samples)")
        try:
            per_sample = torch.broadcast_to(value, full)
        except RuntimeError:
            raise self.fail(node, f"a constant of shape {tuple(value.shape)} does not broadcast to the activation's "
                                  f"per-sample shape {tuple(shape)}") from None
        name = f"{node.name}.constant"
        self.arrays[f"{name}.value"] = per_sample.reshape(-1).contiguous().numpy().copy()
        return self.emit_shaped({"op": "constant", "weight": name, "name": name}, shape, name)

    def fold_constant(self, node: fx.Node) -> Any:
        """The value of a node that depends on no model input (position ids, a table lookup of
        them, a parameter's slice...), computed now with torch; _NOT_CONSTANT otherwise."""
        if node.op not in ("call_function", "call_method", "call_module"):
            return _NOT_CONSTANT
        values = [self.env[n] for n in node.all_input_nodes]
        if any(isinstance(v, (_Tensor, _NotComputed, _Batch)) or (isinstance(v, tuple) and any(
                isinstance(x, (_Tensor, _Batch)) for x in v)) for v in values):
            return _NOT_CONSTANT
        if node.op == "call_function" and node.target is getattr:
            return _NOT_CONSTANT  # attribute reads of activations are lowered where they are used

        def concrete(v: Any) -> Any:
            if isinstance(v, fx.Node):
                v = self.env[v]
            if isinstance(v, _Param):
                return v.tensor
            if isinstance(v, (list, tuple)):
                return type(v)(concrete(x) for x in v)
            return v

        args = [concrete(a) for a in node.args]
        kwargs = {k: concrete(v) for k, v in node.kwargs.items()}
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    result = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    result = self.gm.get_submodule(node.target)(*args, **kwargs)
        except Exception as exc:
            raise self.fail(node, f"evaluating it as a constant failed ({type(exc).__name__}: {exc})") from None
        return _Param(result) if isinstance(result, torch.Tensor) else result

    def expand_param(self, node: fx.Node, param: _Param, sizes: Sequence[Any]) -> _Tensor:
        """param.expand(batch, ...) (a class token, say): the same values in every sample."""
        sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else list(sizes)
        if not sizes or not isinstance(sizes[0], _Batch) or any(isinstance(s, _Batch) for s in sizes[1:]):
            raise self.fail(node, "expanding a constant to anything but (batch, ...)")
        value = param.tensor
        rest = [value.shape[value.dim() - len(sizes) + 1 + i] if s == -1 else s for i, s in enumerate(sizes[1:])]
        return _Tensor(self.constant(node, value, rest))

    def softmax(self, node: fx.Node, src_value: Any, dim: Any, dtype: Any = None) -> _Tensor:
        src = self.tensor(node, src_value)
        ndim = len(self.shape_of(src)) + 1
        if dtype is not None:
            raise self.fail(node, "softmax with a dtype is not supported")
        if not isinstance(dim, int) or dim not in (-1, ndim - 1):
            raise self.fail(node, f"softmax over dim={dim!r}: only the last dimension is supported")
        return self.emit({"op": "softmax", "in": src, "name": node.name}, node)

    def layernorm(self, node: fx.Node, src_value: Any, normalized_shape, weight, bias, eps: float) -> _Tensor:
        src = self.tensor(node, src_value)
        shape = self.shape_of(src)
        normalized = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if normalized != shape[-1:]:
            raise self.fail(node, f"layer norm over {normalized}: only the last dimension ({shape[-1]},) is supported")
        n = shape[-1]
        name = node.target if node.op == "call_module" else node.name

        def param(v, default: float) -> np.ndarray:
            if v is None:
                return np.full(n, default, dtype=np.float32)
            if isinstance(v, _Param):
                v = v.tensor
            if not isinstance(v, torch.Tensor):
                raise self.fail(node, "its weight/bias is computed by the model, not a parameter")
            return np.ascontiguousarray(v.detach().to(torch.float32).cpu().numpy().reshape(-1))

        self.arrays[f"{name}.gamma"] = param(weight, 1.0)
        self.arrays[f"{name}.beta"] = param(bias, 0.0)
        return self.emit({"op": "layernorm", "in": src, "weight": name, "eps": float(eps), "name": name}, node)

    def pool(self, node: fx.Node, is_max: bool, src_value: Any, kernel, stride, padding, dilation=1,
             ceil_mode=False, count_include_pad=True, divisor_override=None, return_indices=False) -> _Tensor:
        src = self.tensor(node, src_value)
        if ceil_mode:
            raise self.fail(node, "ceil_mode=True is not supported")
        if is_max and (_pair(dilation) != [1, 1] or return_indices):
            raise self.fail(node, "max pooling with dilation or return_indices is not supported")
        if not is_max and (not count_include_pad or divisor_override is not None):
            raise self.fail(node, "average pooling needs count_include_pad=True and no divisor_override")
        kernel = _pair(kernel)
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
        if len(self.shape_of(src)) != 3:
            raise self.fail(node, f"pooling needs (N, C, H, W) input, got per-sample shape {self.shape_of(src)}")
        op = {"op": "maxpool2d" if is_max else "avgpool2d", "in": src, "kernel": kernel, "stride": stride,
              "padding": _pair(padding), "name": node.target if node.op == "call_module" else node.name}
        return self.emit(op, node)

    def adaptive_avgpool(self, node: fx.Node, src_value: Any, output_size) -> _Tensor:
        src = self.tensor(node, src_value)
        shape = self.shape_of(src)
        if len(shape) != 3:
            raise self.fail(node, f"pooling needs (N, C, H, W) input, got per-sample shape {shape}")
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        oh, ow = shape[1] if oh is None else oh, shape[2] if ow is None else ow
        name = node.target if node.op == "call_module" else node.name
        if (oh, ow) == (1, 1):
            return self.emit({"op": "global_avgpool", "in": src, "name": name}, node)
        if (oh, ow) == shape[1:]:
            return _Tensor(src)
        if shape[1] % oh == 0 and shape[2] % ow == 0:  # equal windows: a plain average pool
            k = [shape[1] // oh, shape[2] // ow]
            return self.emit({"op": "avgpool2d", "in": src, "kernel": k, "stride": k, "padding": [0, 0],
                              "name": name}, node)
        raise self.fail(node, f"adaptive average pooling from {shape[1:]} to {(oh, ow)} (unequal windows)")

    def mean(self, node: fx.Node, src_value: Any, dim, keepdim=False, dtype=None) -> _Tensor:
        src = self.tensor(node, src_value)
        shape = self.shape_of(src)
        dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
        ok = len(shape) == 3 and all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]
        if not ok or dtype is not None:
            raise self.fail(node, "mean is supported over the spatial dims (2, 3) of an (N, C, H, W) tensor only")
        pooled = self.new_buffer((shape[0], 1, 1), node.name + "_pool")
        self.ops.append({"op": "global_avgpool", "in": src, "out": pooled, "name": node.name})
        return self.reshape(node, pooled)

    def view(self, node: fx.Node, src_value: Any, sizes: Sequence[Any]) -> _Tensor:
        """x.view / x.reshape / torch.reshape: the batch dimension must stay first and symbolic."""
        src = self.tensor(node, src_value)
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = sizes[0]
        sizes = list(sizes)
        if not sizes:
            raise self.fail(node, "it reshapes to a scalar")
        head, rest = sizes[0], sizes[1:]
        if any(isinstance(s, _Batch) for s in rest) or not all(isinstance(s, (int, _Batch)) for s in sizes):
            raise self.fail(node, f"reshape to {sizes}: only (batch, ...) shapes with constant per-sample sizes")
        if isinstance(head, _Batch):
            pass
        elif head == -1 and -1 not in rest and math.prod(rest) == math.prod(self.shape_of(src)):
            pass  # (-1, per-sample dims...): the batch stays first
        else:
            raise self.fail(node, f"reshape to {sizes} does not keep the batch as its own first dimension "
                                  "(write x.view(x.size(0), ...) or x.flatten(1))")
        return self.reshape(node, src)

    def flatten(self, node: fx.Node, src_value: Any, start_dim=0, end_dim=-1) -> _Tensor:
        src = self.tensor(node, src_value)
        ndim = len(self.shape_of(src)) + 1
        if start_dim % ndim == 0 and ndim > 1 and not (end_dim % ndim == 0):
            raise self.fail(node, f"flatten(start_dim={start_dim}) merges the batch dimension (use start_dim=1)")
        return self.reshape(node, src)

    def size(self, node: fx.Node, src_value: Any, dim=None):
        src = self.tensor(node, src_value, allow_ids=True)  # reading a shape is fine on token ids
        full = (_BATCH,) + self.shape_of(src)
        if dim is None:
            return full
        if not isinstance(dim, int) or not -len(full) <= dim < len(full):
            raise self.fail(node, f"size({dim!r}) is out of range")
        return full[dim]

    # --- attention and sequence ops ----------------------------------------------------------

    def lower_mha(self, node: fx.Node, m: nn.MultiheadAttention, path: str, query: int, key: int, value: int,
                  key_padding_mask=None, attn_mask=None, is_causal: bool = False) -> int:
        """nn.MultiheadAttention (batch_first) as q/k/v linears, one attention op and out_proj."""
        if not m.batch_first:
            raise self.fail(node, "MultiheadAttention(batch_first=False): the executor needs the batch first "
                                  "(build it with batch_first=True)")
        if m.bias_k is not None or m.add_zero_attn:
            raise self.fail(node, "MultiheadAttention with add_bias_kv or add_zero_attn")
        if key_padding_mask is not None or attn_mask is not None:
            raise self.fail(node, "attention masks (attn_mask / key_padding_mask) are not supported; "
                                  "a causal mask is, through F.scaled_dot_product_attention(is_causal=True)")
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            weights = [w[:e], w[e:2 * e], w[2 * e:]]
        else:
            weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        b = m.in_proj_bias
        biases = [None, None, None] if b is None else [b[:e], b[e:2 * e], b[2 * e:]]
        projected = []
        for part, src, w_t, b_t in zip("qkv", (query, key, value), weights, biases):
            if len(self.shape_of(src)) != 2:
                raise self.fail(node, f"its {part} input has per-sample shape {self.shape_of(src)}, expected "
                                      "(sequence, features)")
            pair = self._param_pairs.setdefault((id(m), part), (w_t, b_t))
            op, shape = self.linear_op(node, src, pair, f"{path}.in_proj.{part}")
            projected.append(self.emit_shaped(op, shape, f"{path}.{part}"))
        q, k, v = projected
        head_dim = e // m.num_heads
        att = self.emit_shaped({"op": "attention", "q": q, "k": k, "v": v, "layout": "sequence_first",
                                "heads": int(m.num_heads), "scale": 1.0 / math.sqrt(head_dim),
                                "causal": bool(is_causal), "name": f"{path}.attention"},
                               self.shape_of(q)[:1] + self.shape_of(v)[1:], f"{path}.attention")
        op, shape = self.linear_op(node, att, m.out_proj, f"{path}.out_proj")
        return self.emit_shaped(op, shape, f"{path}.out_proj")

    def lower_encoder_layer(self, node: fx.Node, layer: nn.TransformerEncoderLayer, path: str, src: int) -> int:
        """nn.TransformerEncoderLayer (batch_first, no masks): attention and feed-forward blocks with
        their residual adds and layer norms, post- or pre-norm."""
        act = layer.activation
        kind = _ACTIVATION_FUNCTIONS.get(act) or _ACTIVATION_MODULES.get(type(act))
        if kind is None or (isinstance(act, nn.GELU) and act.approximate != "none"):
            raise self.fail(node, f"encoder layer activation {act!r}")

        def norm(x: int, ln: nn.LayerNorm, name: str) -> int:
            return self.norm_module(node, x, ln, name)

        def add(a: int, b: int, name: str) -> int:
            return self.emit_shaped({"op": "add", "a": a, "b": b, "activation": None, "name": name},
                                    self.shape_of(a), name)

        def attention_block(x: int) -> int:
            return self.lower_mha(node, layer.self_attn, f"{path}.self_attn", x, x, x)

        def feed_forward(x: int) -> int:
            op, shape = self.linear_op(node, x, layer.linear1, f"{path}.linear1", kind)
            hidden = self.emit_shaped(op, shape, f"{path}.linear1")
            op, shape = self.linear_op(node, hidden, layer.linear2, f"{path}.linear2")
            return self.emit_shaped(op, shape, f"{path}.linear2")

        x = src
        if layer.norm_first:
            x = add(x, attention_block(norm(x, layer.norm1, f"{path}.norm1")), f"{path}.add1")
            x = add(x, feed_forward(norm(x, layer.norm2, f"{path}.norm2")), f"{path}.add2")
        else:
            x = norm(add(x, attention_block(x), f"{path}.add1"), layer.norm1, f"{path}.norm1")
            x = norm(add(x, feed_forward(x), f"{path}.add2"), layer.norm2, f"{path}.norm2")
        return x

    def norm_module(self, node: fx.Node, x: int, ln: nn.Module, name: str) -> int:
        """A LayerNorm inside a lowered encoder (its layers' norm1/norm2, the encoder's final norm)
        over the last dimension; no weight (elementwise_affine=False) or no bias (bias=False) are
        the identity scale / zero shift."""
        n = self.shape_of(x)[-1]
        if type(ln) is not nn.LayerNorm:
            raise self.fail(node, f"encoder norm '{name}' is a {type(ln).__name__} (only nn.LayerNorm is supported)")
        if tuple(ln.normalized_shape) != (n,):
            raise self.fail(node, f"encoder norm '{name}' over {tuple(ln.normalized_shape)}: only the last "
                                  f"dimension ({n},) is supported")
        self.arrays[f"{name}.gamma"] = (np.ones(n, np.float32) if ln.weight is None
                                        else ln.weight.detach().float().cpu().numpy().reshape(-1).copy())
        self.arrays[f"{name}.beta"] = (np.zeros(n, np.float32) if ln.bias is None
                                       else ln.bias.detach().float().cpu().numpy().reshape(-1).copy())
        return self.emit_shaped({"op": "layernorm", "in": x, "weight": name, "eps": float(ln.eps), "name": name},
                                self.shape_of(x), name)

    def lower_attention_module(self, node: fx.Node, m: nn.Module) -> Any:
        path = node.target
        args = [self.arg(node, i, "") for i in range(len(node.args))]
        kwargs = {k: self.env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        if isinstance(m, nn.MultiheadAttention):
            names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                     "average_attn_weights", "is_causal"]
            bound = dict(zip(names, args), **kwargs)
            q, k, v = (self.tensor(node, bound.get(n), n) for n in ("query", "key", "value"))
            out = self.lower_mha(node, m, path, q, k, v, bound.get("key_padding_mask"), bound.get("attn_mask"),
                                 bool(bound.get("is_causal", False)))
            return (_Tensor(out), _NotComputed("the attention weights (need_weights=True)"))
        names = ["src", "mask" if isinstance(m, nn.TransformerEncoder) else "src_mask", "src_key_padding_mask",
                 "is_causal"]
        bound = dict(zip(names, args), **kwargs)
        if any(bound.get(n) is not None for n in names[1:3]) or bound.get("is_causal"):
            raise self.fail(node, "encoder masks (mask / src_key_padding_mask / is_causal) are not supported")
        x = self.tensor(node, bound.get("src"), "src")
        if isinstance(m, nn.TransformerEncoderLayer):
            layers, final_norm = [("", m)], None
        else:
            layers, final_norm = [(f".layers.{i}", layer) for i, layer in enumerate(m.layers)], m.norm
        for suffix, layer in layers:
            if not (type(layer) is nn.TransformerEncoderLayer and layer.self_attn.batch_first):
                raise self.fail(node, "encoder layers must be batch_first nn.TransformerEncoderLayer")
            x = self.lower_encoder_layer(node, layer, path + suffix, x)
        if final_norm is not None:
            x = self.norm_module(node, x, final_norm, f"{path}.norm")
        return self.reshape(node, x)

    def embedding(self, node: fx.Node, ids_value: Any, table: torch.Tensor, name: str, max_norm=None) -> _Tensor:
        ids = self.tensor(node, ids_value, "input", allow_ids=True)
        if ids not in self.id_buffers:
            raise self.fail(node, "the embedding's ids must be an integer input of the model")
        if max_norm is not None:
            raise self.fail(node, "Embedding(max_norm=...) rewrites its weights during forward")
        self.arrays[f"{name}.table"] = np.ascontiguousarray(table.detach().to(torch.float32).cpu().numpy())
        self.layers.append({"name": name, "op": "embedding", "kernel": "lookup", "sparsity": 0.0,
                            "reason": "table rows copied"})
        return self.emit({"op": "embedding", "in": ids, "weight": name, "name": name}, node)

    def permute(self, node: fx.Node, src_value: Any, dims: Sequence[int]) -> _Tensor:
        """transpose/permute over per-sample dims (the batch stays first): a copy."""
        src = self.tensor(node, src_value)
        ndim = len(self.shape_of(src)) + 1
        if not all(isinstance(d, int) for d in dims) or sorted(d % ndim for d in dims) != list(range(ndim)):
            raise self.fail(node, f"permutation {list(dims)!r}")
        dims = [d % ndim for d in dims]
        if dims[0] != 0:
            raise self.fail(node, "it moves the batch dimension (the executor keeps the batch first)")
        perm = [d - 1 for d in dims[1:]]
        if perm == sorted(perm):
            return _Tensor(src)
        out = self.emit({"op": "permute", "in": src, "perm": perm, "name": node.name}, node)
        n = len(perm)
        if n >= 2 and perm == list(range(n - 2)) + [n - 1, n - 2]:
            self.transposed[out.buffer] = src
        return out

    def transpose(self, node: fx.Node, src_value: Any, d0: int, d1: int) -> _Tensor:
        ndim = len(self.shape_of(self.tensor(node, src_value))) + 1
        dims = list(range(ndim))
        dims[d0 % ndim], dims[d1 % ndim] = dims[d1 % ndim], dims[d0 % ndim]
        return self.permute(node, src_value, dims)

    def matmul(self, node: fx.Node, a_value: Any, b_value: Any) -> _Tensor:
        a = self.tensor(node, a_value, "first operand")
        b = self.tensor(node, b_value, "second operand")
        sa, sb = self.shape_of(a), self.shape_of(b)
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            raise self.fail(node, f"matmul of per-sample shapes {sa} and {sb}: both operands need the same "
                                  "rank >= 2 (with the batch, >= 3) and the same leading dimensions (no broadcasting)")
        transpose_b = b in self.transposed  # read the source of a transpose directly (its copy becomes dead)
        op = {"op": "matmul", "a": a, "b": self.transposed.get(b, b), "transpose_b": transpose_b, "scale": 1.0,
              "name": node.name}
        return self.emit(op, node)

    def sdpa(self, node: fx.Node, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False) -> _Tensor:
        if attn_mask is not None:
            raise self.fail(node, "attn_mask is not supported (is_causal=True is)")
        if dropout_p != 0.0:
            raise self.fail(node, f"dropout_p={dropout_p!r} (the executable is for inference: pass 0.0 in eval)")
        if enable_gqa:
            raise self.fail(node, "enable_gqa=True")
        bq, bk, bv = (self.tensor(node, t, n) for t, n in ((q, "query"), (k, "key"), (v, "value")))
        sq, sk, sv = self.shape_of(bq), self.shape_of(bk), self.shape_of(bv)
        if len(sq) < 2 or not (len(sq) == len(sk) == len(sv)) or not (sq[:-2] == sk[:-2] == sv[:-2]):
            raise self.fail(node, f"query/key/value per-sample shapes {sq}, {sk}, {sv} (no broadcasting)")
        scale = 1.0 / math.sqrt(sq[-1]) if scale is None else float(scale)
        return self.emit({"op": "attention", "q": bq, "k": bk, "v": bv, "layout": "heads_first", "heads": 1,
                          "scale": scale, "causal": bool(is_causal), "name": node.name}, node)

    def cat(self, node: fx.Node, tensors: Sequence[Any], dim: int = 0) -> _Tensor:
        if not isinstance(tensors, (list, tuple)) or not tensors:
            raise self.fail(node, "cat of a non-list")
        ids = [self.tensor(node, t, "operand") for t in tensors]
        ndim = len(self.shape_of(ids[0])) + 1
        if not isinstance(dim, int) or dim % ndim == 0:
            raise self.fail(node, f"cat along dim {dim!r} (the batch dimension)")
        if len(ids) == 1:
            return _Tensor(ids[0])
        return self.emit({"op": "cat", "inputs": ids, "axis": dim % ndim - 1, "name": node.name}, node)

    def scalar_arith(self, node: fx.Node, kind: str, a: Any, b: Any) -> _Tensor:
        """x + c, c + x, x - c, c - x, x * c, c * x, x / c for a Python number c: one affine op."""
        a_num, b_num = isinstance(a, (int, float)) and not isinstance(a, bool), isinstance(b, (int, float)) and not isinstance(b, bool)
        if a_num == b_num:
            raise self.fail(node, "only tensor-with-number arithmetic is supported here")
        x, c = (b, float(a)) if a_num else (a, float(b))
        src = self.tensor(node, x)
        if kind == "add":
            scale, shift = 1.0, c
        elif kind == "mul":
            scale, shift = c, 0.0
        elif kind == "sub":
            scale, shift = (-1.0, c) if a_num else (1.0, -c)
        elif kind == "div" and not a_num:
            if c == 0.0:
                raise self.fail(node, "division by zero")
            scale, shift = 1.0 / c, 0.0
        else:
            raise self.fail(node, "number / tensor")
        if not (math.isfinite(scale) and math.isfinite(shift)):
            raise self.fail(node, f"the constant {c!r} is not finite")
        return self.emit({"op": "affine", "in": src, "scale": scale, "shift": shift, "name": node.name}, node)

    # --- slicing ---------------------------------------------------------------------------------

    def sample_axis(self, node: fx.Node, src: int, dim: Any) -> int:
        """The per-sample axis of tensor dimension `dim` (which must not be the batch)."""
        ndim = len(self.shape_of(src)) + 1
        if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
            raise self.fail(node, f"dim {dim!r} is out of range for a {ndim}-D tensor")
        if dim % ndim == 0:
            raise self.fail(node, "it slices the batch dimension")
        return dim % ndim - 1

    def slice_axis(self, node: fx.Node, src: int, axis: int, start: Any, stop: Any, step: Any, name: str) -> int:
        """A buffer holding src[..., start:stop:step, ...] along per-sample `axis` (src itself when whole)."""
        shape = self.shape_of(src)
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (start, stop, step)):
            raise self.fail(node, f"slice bounds {(start, stop, step)!r} are not constant ints")
        first, last, step = slice(start, stop, step).indices(shape[axis])
        if step < 1:
            raise self.fail(node, "a slice with a negative step")
        n = len(range(first, last, step))
        if n == 0:
            raise self.fail(node, "an empty slice")
        if (first, n, step) == (0, shape[axis], 1):
            return src
        out_shape = shape[:axis] + (n,) + shape[axis + 1:]
        return self.emit_shaped({"op": "slice", "in": src, "axis": axis, "start": first, "step": step, "name": name},
                                out_shape, name)

    def getitem(self, node: fx.Node, src_value: Any, index: Any) -> _Tensor:
        """x[:, a:b], x[:, 0], x[..., :n]: a slice op per sliced axis, then a view dropping the
        integer-indexed axes. The batch axis must be taken whole."""
        src = self.tensor(node, src_value)
        ndim = len(self.shape_of(src)) + 1
        items = list(index) if isinstance(index, tuple) else [index]
        if sum(it is Ellipsis for it in items) > 1:
            raise self.fail(node, "an index with two '...'")
        if Ellipsis in items:
            k = items.index(Ellipsis)
            items[k:k + 1] = [slice(None)] * (ndim - len(items) + 1)
        if len(items) > ndim:
            raise self.fail(node, f"too many indices for a {ndim}-D tensor")
        items += [slice(None)] * (ndim - len(items))
        if items[0] != slice(None):
            raise self.fail(node, "it indexes the batch dimension (the executor keeps the batch whole)")
        cur = src
        for axis, it in enumerate(items[1:]):
            if isinstance(it, slice):
                cur = self.slice_axis(node, cur, axis, it.start, it.stop, it.step, f"{node.name}_{axis}")
            elif isinstance(it, int) and not isinstance(it, bool):
                length = self.shape_of(cur)[axis]
                if not -length <= it < length:
                    raise self.fail(node, f"index {it} is out of range for size {length}")
                i = it % length
                cur = self.slice_axis(node, cur, axis, i, i + 1, 1, f"{node.name}_{axis}")
            else:
                what = "a tensor" if isinstance(it, (_Param, _Tensor, torch.Tensor)) else type(it).__name__
                raise self.fail(node, f"indexing with {what} (only ints, slices and '...')")
        return self.reshape(node, cur)

    def split_parts(self, node: fx.Node, src_value: Any, sizes: Sequence[int], dim: Any, drop_axis: bool = False):
        """Consecutive parts of `sizes` entries along `dim`, as a tuple (chunk, split, unbind)."""
        src = self.tensor(node, src_value)
        axis = self.sample_axis(node, src, dim)
        shape = self.shape_of(src)
        parts, start = [], 0
        for k, size in enumerate(sizes):
            buf = self.slice_axis(node, src, axis, start, start + size, 1, f"{node.name}_{k}")
            if drop_axis:
                buf = self.new_buffer(shape[:axis] + shape[axis + 1:], f"{node.name}_{k}_view", alias_of=buf)
            parts.append(_Tensor(buf))
            start += size
        return tuple(parts)

    def chunk(self, node: fx.Node, src_value: Any, chunks: Any, dim: Any = 0):
        src = self.tensor(node, src_value)
        length = self.shape_of(src)[self.sample_axis(node, src, dim)]
        if not isinstance(chunks, int) or chunks < 1:
            raise self.fail(node, f"chunks={chunks!r}")
        size = -(-length // chunks)  # torch.chunk: equal parts of ceil(length / chunks), the last shorter
        return self.split_parts(node, _Tensor(src), [min(size, length - s) for s in range(0, length, size)], dim)

    def split(self, node: fx.Node, src_value: Any, split_size: Any, dim: Any = 0):
        src = self.tensor(node, src_value)
        length = self.shape_of(src)[self.sample_axis(node, src, dim)]
        if isinstance(split_size, int) and not isinstance(split_size, bool) and split_size >= 1:
            sizes = [min(split_size, length - s) for s in range(0, length, split_size)]
        elif isinstance(split_size, (list, tuple)) and all(isinstance(v, int) for v in split_size) \
                and sum(split_size) == length:
            sizes = list(split_size)
        else:
            raise self.fail(node, f"split sizes {split_size!r} for a dimension of {length}")
        return self.split_parts(node, _Tensor(src), sizes, dim)

    # --- the walk ------------------------------------------------------------------------------

    def lower(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.lower_output(node)
            else:
                self.env[node] = self.lower_node(node)

    def lower_output(self, node: fx.Node) -> None:
        result = node.args[0]
        items = list(result) if isinstance(result, (tuple, list)) else [result]
        for item in items:
            if not isinstance(item, fx.Node) or not isinstance(self.env.get(item), _Tensor):
                raise UnsupportedOperation(
                    f"cannot compile the model's output {result!r:.100}: outputs must be a tensor or a tuple/list "
                    f"of tensors computed from the inputs. {_CONVERT_HINT}")
            self.outputs.append(self.env[item].buffer)

    def lower_node(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            buffer = self.new_buffer(self.sample_shape(node, allow_ids=True), node.name)
            self.inputs.append(buffer)
            is_ids = node.meta["tensor_meta"].dtype != torch.float32
            self.input_dtypes.append("int64" if is_ids else "float32")
            if is_ids:
                self.id_buffers.add(buffer)
            return _Tensor(buffer)
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise self.fail(node, f"attribute of type {type(value).__name__}")
            return _Param(value)
        folded = self.fold_constant(node)
        if folded is not _NOT_CONSTANT:
            return folded
        if node.op == "call_module":
            return self.lower_module(node, self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return self.lower_function(node)
        if node.op == "call_method":
            return self.lower_method(node)
        raise self.fail(node, f"fx node kind {node.op!r}")

    def lower_module(self, node: fx.Node, m: nn.Module) -> Any:
        t = type(m)
        if t in _ATTENTION_LEAVES:
            return self.lower_attention_module(node, m)
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs:
            raise self.fail(node, "called with more than one argument")
        # Subclasses count when they keep the base forward (e.g. MultiheadAttention's out_proj).
        if t is SparseLinear or (isinstance(m, nn.Linear) and t.forward is nn.Linear.forward):
            return self.lower_linear(node, m, relu=m.relu if t is SparseLinear else fuses_relu(m))
        if t is SparseConv2d or (isinstance(m, nn.Conv2d) and t.forward is nn.Conv2d.forward):
            return self.lower_conv(node, m, relu=m.relu if t is SparseConv2d else fuses_relu(m))
        if t in _ACTIVATION_MODULES:
            if t is nn.GELU and m.approximate != "none":
                raise self.fail(node, f"GELU(approximate={m.approximate!r}) (only the exact erf form)")
            return self.activation(node, _ACTIVATION_MODULES[t], x)
        if t in _IDENTITY_MODULES:
            return _Tensor(self.tensor(node, x))
        if t is nn.Flatten:
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if t is nn.MaxPool2d:
            return self.pool(node, True, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                             return_indices=m.return_indices)
        if t is nn.AvgPool2d:
            return self.pool(node, False, x, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode,
                             m.count_include_pad, m.divisor_override)
        if t is nn.AdaptiveAvgPool2d:
            return self.adaptive_avgpool(node, x, m.output_size)
        if t is nn.LayerNorm:
            return self.layernorm(node, x, m.normalized_shape, m.weight, m.bias, m.eps)
        if t is nn.Softmax:
            return self.softmax(node, x, m.dim)
        if t is nn.Embedding:
            return self.embedding(node, x, m.weight, node.target, m.max_norm)
        if isinstance(m, nn.BatchNorm2d):
            raise self.fail(node, "a BatchNorm2d that does not directly follow a Conv2d cannot be folded")
        raise self.fail(node, f"the executor has no op for {t.__name__}")

    def lower_function(self, node: fx.Node) -> Any:
        fn = node.target
        a = lambda i, name, default=None: self.arg(node, i, name, default)  # noqa: E731
        if fn in _ADD + _MUL + _SUB + _DIV and len(node.args) == 2 and not node.kwargs and any(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in node.args):
            kind = "add" if fn in _ADD else "mul" if fn in _MUL else "sub" if fn in _SUB else "div"
            return self.scalar_arith(node, kind, a(0, "input"), a(1, "other"))
        if fn in _ADD:
            return self.binary(node, "add")
        if fn in _MUL:
            return self.binary(node, "mul")
        if fn in _SUB:
            return self.binary(node, "sub")
        if fn in _DIV:
            return self.binary(node, "div")
        if fn in (torch.matmul, operator.matmul, torch.bmm):
            return self.matmul(node, a(0, "input"), a(1, "other"))
        if fn is F.scaled_dot_product_attention:
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            defaults = [None, None, None, None, 0.0, False, None, False]
            return self.sdpa(node, *[a(i, n, d) for i, (n, d) in enumerate(zip(names, defaults))])
        if fn in (torch.transpose, torch.swapaxes):
            return self.transpose(node, a(0, "input"), a(1, "dim0"), a(2, "dim1"))
        if fn is torch.permute:
            return self.permute(node, a(0, "input"), a(1, "dims"))
        if fn in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(node, a(0, "tensors"), a(1, "dim", 0))
        if fn is F.embedding:
            weight = a(1, "weight")
            if not isinstance(weight, _Param):
                raise self.fail(node, "F.embedding needs a weight that is a parameter of the model")
            weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            return self.embedding(node, a(0, "input"), weight.tensor, weight_node.target, a(3, "max_norm"))
        if fn in _ACTIVATION_FUNCTIONS:
            kind = _ACTIVATION_FUNCTIONS[fn]
            if fn is F.gelu and a(1, "approximate", "none") != "none":
                raise self.fail(node, "gelu(approximate='tanh') (only the exact erf form)")
            return self.activation(node, kind, a(0, "input"))
        if fn in _DROPOUT_FUNCTIONS:
            if a(2, "training", True):
                raise self.fail(node, "dropout with training=True")
            return _Tensor(self.tensor(node, a(0, "input")))
        if fn is F.linear:
            weight, bias = a(1, "weight"), a(2, "bias")
            if not isinstance(weight, _Param) or not (bias is None or isinstance(bias, _Param)):
                raise self.fail(node, "F.linear needs a weight (and bias) that are parameters of the model")
            if weight.tensor.dim() != 2:
                raise self.fail(node, f"F.linear with a {weight.tensor.dim()}-D weight")
            key = self._param_pairs.setdefault((id(weight.tensor), id(getattr(bias, "tensor", None))),
                                               (weight.tensor, None if bias is None else bias.tensor))
            weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            return self.lower_linear(node, key, relu=False, path=weight_node.target)
        if fn is torch.flatten:
            return self.flatten(node, a(0, "input"), a(1, "start_dim", 0), a(2, "end_dim", -1))
        if fn is torch.reshape:
            return self.view(node, a(0, "input"), [a(1, "shape")])
        if fn in (F.softmax, torch.softmax):
            return self.softmax(node, a(0, "input"), a(1, "dim"), a(3 if fn is F.softmax else 2, "dtype"))
        if fn is F.layer_norm:
            return self.layernorm(node, a(0, "input"), a(1, "normalized_shape"), a(2, "weight"), a(3, "bias"),
                                  a(4, "eps", 1e-5))
        if fn is F.max_pool2d:
            return self.pool(node, True, a(0, "input"), a(1, "kernel_size"), a(2, "stride"), a(3, "padding", 0),
                             a(4, "dilation", 1), a(5, "ceil_mode", False),
                             return_indices=a(6, "return_indices", False))
        if fn is F.avg_pool2d:
            return self.pool(node, False, a(0, "input"), a(1, "kernel_size"), a(2, "stride"), a(3, "padding", 0), 1,
                             a(4, "ceil_mode", False), a(5, "count_include_pad", True), a(6, "divisor_override"))
        if fn is F.adaptive_avg_pool2d:
            return self.adaptive_avgpool(node, a(0, "input"), a(1, "output_size"))
        if fn is torch.mean:
            return self.mean(node, a(0, "input"), a(1, "dim"), a(2, "keepdim", False), a(3, "dtype"))
        if fn is getattr and len(node.args) == 2 and node.args[1] == "shape":
            return self.size(node, a(0, "obj"))
        if fn is getattr and len(node.args) == 2 and node.args[1] in ("device", "dtype"):
            src = self.tensor(node, a(0, "obj"), allow_ids=True)
            if node.args[1] == "device":
                return torch.device("cpu")
            return torch.int64 if src in self.id_buffers else torch.float32
        if fn is operator.getitem:
            container = a(0, "a")
            if isinstance(container, tuple) and isinstance(node.args[1], int):
                return container[node.args[1]]
            return self.getitem(node, container, a(1, "b"))
        if fn is torch.chunk:
            return self.chunk(node, a(0, "input"), a(1, "chunks"), a(2, "dim", 0))
        if fn is torch.split:
            return self.split(node, a(0, "tensor"), a(1, "split_size_or_sections"), a(2, "dim", 0))
        if fn is torch.narrow:
            src = self.tensor(node, a(0, "input"))
            start, length = a(2, "start"), a(3, "length")
            return self.reshape(node, self.slice_axis(node, src, self.sample_axis(node, src, a(1, "dim")), start,
                                                      start + length, 1, node.name))
        raise self.fail(node, "the executor has no op for it")

    def lower_method(self, node: fx.Node) -> Any:
        name = node.target
        a = lambda i, key, default=None: self.arg(node, i, key, default)  # noqa: E731
        if name == "size":
            return self.size(node, a(0, "self"), a(1, "dim"))
        if name == "dim":
            return len(self.shape_of(self.tensor(node, a(0, "self"), allow_ids=True))) + 1
        if name in ("view", "reshape"):
            if node.kwargs:
                raise self.fail(node, "keyword arguments to view/reshape")
            sizes = [self.arg(node, i, "") for i in range(1, len(node.args))]
            return self.view(node, a(0, "self"), sizes)
        if name == "flatten":
            return self.flatten(node, a(0, "self"), a(1, "start_dim", 0), a(2, "end_dim", -1))
        if name == "contiguous":
            return _Tensor(self.tensor(node, a(0, "self")))
        if name in _ACTIVATION_METHODS:
            return self.activation(node, _ACTIVATION_METHODS[name], a(0, "self"))
        if name == "softmax":
            return self.softmax(node, a(0, "self"), a(1, "dim"), a(2, "dtype"))
        if name in ("add", "mul", "sub", "div") and len(node.args) == 2 and not node.kwargs and isinstance(
                node.args[1], (int, float)) and not isinstance(node.args[1], bool):
            return self.scalar_arith(node, name, a(0, "self"), node.args[1])
        if name in ("add", "mul", "sub", "div"):
            return self.binary(node, name)
        if name == "chunk":
            return self.chunk(node, a(0, "self"), a(1, "chunks"), a(2, "dim", 0))
        if name == "split":
            return self.split(node, a(0, "self"), a(1, "split_size"), a(2, "dim", 0))
        if name == "unbind":
            src = self.tensor(node, a(0, "self"))
            n = self.shape_of(src)[self.sample_axis(node, src, a(1, "dim", 0))]
            return self.split_parts(node, _Tensor(src), [1] * n, a(1, "dim", 0), drop_axis=True)
        if name in ("narrow", "select"):
            src = self.tensor(node, a(0, "self"))
            axis = self.sample_axis(node, src, a(1, "dim"))
            start = a(2, "start" if name == "narrow" else "index")
            length = a(3, "length") if name == "narrow" else 1
            if not isinstance(start, int) or not isinstance(length, int):
                raise self.fail(node, f"{name} with non-constant bounds")
            size = self.shape_of(src)[axis]
            start = start % size if name == "select" and -size <= start < 0 else start
            return self.reshape(node, self.slice_axis(node, src, axis, start, start + length, 1, node.name))
        if name == "expand" and isinstance(a(0, "self"), _Param):
            return self.expand_param(node, a(0, "self"), [self.arg(node, i, "") for i in range(1, len(node.args))])
        if name in ("matmul", "bmm"):
            return self.matmul(node, a(0, "self"), a(1, "other"))
        if name in ("transpose", "swapaxes"):
            return self.transpose(node, a(0, "self"), a(1, "dim0"), a(2, "dim1"))
        if name == "permute":
            dims = [self.arg(node, i, "") for i in range(1, len(node.args))]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = list(dims[0])
            return self.permute(node, a(0, "self"), dims)
        if name == "mean":
            return self.mean(node, a(0, "self"), a(1, "dim"), a(2, "keepdim", False), a(3, "dtype"))
        raise self.fail(node, "the executor has no op for it")


def _compressed_arrays(name: str, keys: Tuple[str, str], pointers, indices, values, bias) -> Dict[str, np.ndarray]:
    """Spec arrays of a compressed-row weight: int64 row pointers, int32 indices (when they fit),
    float32 values and the optional bias, under `name`.<keys[0]> / `name`.<keys[1]> / ..."""
    arrays = {f"{name}.{keys[0]}": np.ascontiguousarray(pointers, dtype=np.int64),
              f"{name}.{keys[1]}": _small_indices(indices),
              f"{name}.values": np.ascontiguousarray(values, dtype=np.float32)}
    if bias is not None:
        arrays[f"{name}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
    return arrays


def _sparse_arrays(name: str, indptr, indices, values, bias) -> Dict[str, np.ndarray]:
    return _compressed_arrays(name, ("indptr", "indices"), indptr, indices, values, bias)


def _linear_format_arrays(name: str, weight: np.ndarray, bias, fmt: str, block) -> Dict[str, np.ndarray]:
    """The spec arrays of a linear weight stored as `fmt` (dense, csr or bsr)."""
    if fmt == "dense":
        arrays = {f"{name}.weight": np.ascontiguousarray(weight, dtype=np.float32)}
        if bias is not None:
            arrays[f"{name}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
        return arrays
    packed = formats.csr_arrays(weight) if fmt == "csr" else formats.bsr_arrays(weight, *block)
    return _sparse_arrays(name, *packed, bias)


def _conv_sparse_arrays(name: str, row_ptr, taps, values, bias) -> Dict[str, np.ndarray]:
    return _compressed_arrays(name, ("row_ptr", "taps"), row_ptr, taps, values, bias)


# kernel name -> spec format
_CONV_FORMATS = {"sparse-conv": "sparse", "pattern-conv": "pattern", "depthwise-conv": "depthwise", "dense-conv": "dense"}


def _one_conv_plan(arrays: Dict[str, np.ndarray], name: str, fields: Dict[str, Any], fmt: str,
                   in_shape: Sequence[int]):
    """A native plan of this one convolution, for timing a kernel exactly as the executor runs it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = fields["kernel"], fields["stride"], fields["padding"], fields["dilation"]
    out_shape = [fields["out_channels"], (in_shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                 (in_shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1]
    op = {"op": "conv2d", "in": 0, "out": 1, "weight": name, **fields, "format": fmt}
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "buffers": [{"shape": list(in_shape)}, {"shape": out_shape}],
            "inputs": [0], "outputs": [1], "ops": [op]}
    return _C.Plan(json.dumps(spec), arrays)


def _one_linear_plan(arrays: Dict[str, np.ndarray], name: str, fmt: str, block, rows: int, cols: int, has_bias: bool):
    """A native plan of this one linear layer, for timing a format exactly as the executor runs it."""
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "buffers": [{"shape": [cols]}, {"shape": [rows]}],
            "inputs": [0], "outputs": [1],
            "ops": [{"op": "linear", "in": 0, "out": 1, "weight": name, "format": fmt, "block": list(block),
                     "rows": rows, "cols": cols}]}
    return _C.Plan(json.dumps(spec), arrays)


def _small_indices(indices: np.ndarray) -> np.ndarray:
    """Column indices / taps as int32 when they fit (always, for real layers): the file then
    stores 8 bytes per nonzero instead of 12, 20% of the dense weight at 90% sparsity."""
    indices = np.asarray(indices)
    if indices.size == 0 or int(indices.max()) < 2**31:
        return np.ascontiguousarray(indices, dtype=np.int32)
    return np.ascontiguousarray(indices, dtype=np.int64)


def _fuse_activations(
    buffers: List[Dict[str, Any]], ops: List[Dict[str, Any]], outputs: Sequence[int]
) -> List[Dict[str, Any]]:
    """An activation op whose input only it reads, written by a linear/conv/add/mul without an
    activation, becomes that op's activation (one pass over the output instead of two)."""
    aliased = {b["alias_of"] for b in buffers if b["alias_of"] is not None}
    readers: Dict[int, int] = {}
    for op in ops:
        for b in _reads(op):
            readers[b] = readers.get(b, 0) + 1
    producer = {op["out"]: op for op in ops}
    kept = []
    for op in ops:
        if op["op"] == "activation":
            src = op["in"]
            prod = producer.get(src)
            if (prod is not None and prod["op"] in ("linear", "conv2d", "add", "mul", "affine")
                    and prod.get("activation") is None
                    and readers.get(src) == 1 and src not in aliased and src not in outputs
                    and buffers[src]["alias_of"] is None):
                prod["activation"] = op["kind"]
                prod["out"] = op["out"]
                producer[op["out"]] = prod
                continue
        kept.append(op)
    return kept


_READ_KEYS = ("in", "a", "b", "q", "k", "v", "residual")  # (slice reads "in")


def _reads(op: Dict[str, Any]) -> List[int]:
    """The buffers an op reads."""
    return [op[k] for k in _READ_KEYS if k in op] + list(op.get("inputs", ()))


def _drop_dead_ops(buffers, ops, outputs) -> List[Dict[str, Any]]:
    """Remove ops whose result nothing reads (e.g. a transpose copy a matmul now reads through
    transpose_b), repeatedly."""
    def root(b: int) -> int:
        while buffers[b]["alias_of"] is not None:
            b = buffers[b]["alias_of"]
        return b

    while True:
        live = {root(b) for b in outputs}
        for op in ops:
            live.update(root(b) for b in _reads(op))
        kept = [op for op in ops if root(op["out"]) in live]
        if len(kept) == len(ops):
            return ops
        ops = kept


def _fuse_residual_adds(
    buffers: List[Dict[str, Any]], ops: List[Dict[str, Any]], outputs: Sequence[int]
) -> List[Dict[str, Any]]:
    """add(conv(x), r) (+ activation) becomes one conv2d with residual r: the convolution adds the
    shortcut and applies the activation while it crops its output, saving a pass over it. The
    conv must have no activation of its own and be the only reader of its output, and r must be
    written before the conv runs (of a block's two branches, the one computed last is fused)."""
    aliased = {b["alias_of"] for b in buffers if b["alias_of"] is not None}
    readers: Dict[int, int] = {}
    for op in ops:
        for b in _reads(op):
            readers[b] = readers.get(b, 0) + 1

    def root(b: int) -> int:
        while buffers[b]["alias_of"] is not None:
            b = buffers[b]["alias_of"]
        return b

    written_at = {}  # storage root -> index of the op writing it (inputs: never, i.e. -1)
    for i, op in enumerate(ops):
        written_at.setdefault(root(op["out"]), i)
    kept = list(ops)
    for i, op in enumerate(ops):
        if op["op"] != "add":
            continue
        for conv_key, other_key in (("a", "b"), ("b", "a")):
            src, other = op[conv_key], op[other_key]
            j = written_at.get(root(src))
            conv = ops[j] if j is not None else None
            if (conv is None or conv["op"] != "conv2d" or conv.get("activation") is not None or "residual" in conv
                    or readers.get(src) != 1 or src in aliased or src in outputs or buffers[src]["alias_of"] is not None
                    or root(other) == root(src) or written_at.get(root(other), -1) >= j
                    or tuple(buffers[other]["shape"]) != tuple(buffers[src]["shape"])):
                continue
            conv["residual"] = other
            conv["activation"] = op.get("activation")
            conv["out"] = op["out"]
            kept[i] = None
            break
    return [op for op in kept if op is not None]


def _strip_name_prefix(lowering: "_Lowering", prefix: str) -> None:
    """Drop `prefix` from every layer, op, weight and array name the lowering produced."""
    def strip(name: Any) -> Any:
        return name[len(prefix):] if isinstance(name, str) and name.startswith(prefix) else name

    for op in lowering.ops:
        if "name" in op:
            op["name"] = strip(op["name"])
        if "weight" in op:
            op["weight"] = strip(op["weight"])
    for row in lowering.layers:
        row["name"] = strip(row["name"])
    renamed = {}
    for key, value in lowering.arrays.items():  # "<weight>.<part>": rename the weight part only
        weight, part = key.rsplit(".", 1)
        renamed[f"{strip(weight)}.{part}"] = value
    lowering.arrays = renamed


def _compact(buffers, ops, inputs, outputs):
    """Drop buffers nothing refers to and renumber the rest (order kept: aliases stay after
    their targets)."""
    used = set(inputs) | set(outputs)
    for op in ops:
        used.update(_reads(op))
        used.add(op["out"])
    for i in range(len(buffers) - 1, -1, -1):  # the buffers an alias views must exist too
        if i in used and buffers[i]["alias_of"] is not None:
            used.add(buffers[i]["alias_of"])
    new_id = {old: new for new, old in enumerate(sorted(used))}
    new_buffers = []
    for old in sorted(used):
        b = dict(buffers[old])
        if b["alias_of"] is not None:
            b["alias_of"] = new_id[b["alias_of"]]
        new_buffers.append(b)
    for op in ops:
        for k in _READ_KEYS + ("out",):
            if k in op:
                op[k] = new_id[op[k]]
        if "inputs" in op:
            op["inputs"] = [new_id[b] for b in op["inputs"]]
    return new_buffers, ops, [new_id[b] for b in inputs], [new_id[b] for b in outputs]


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
        if x.dtype not in (torch.float32, torch.int64, torch.int32) or x.device.type != "cpu":
            raise TypeError(f"example_inputs[{k}] must be a float32 (or integer token id) CPU tensor, got "
                            f"{x.dtype} on {x.device}")
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
                                   f"tuple/list of tensors. {_CONVERT_HINT}")
    return [t.detach().cpu().numpy() for t in items]


def verify(executable: Executable, example_inputs: Sequence[torch.Tensor], expected: Sequence[np.ndarray]) -> float:
    """Run `executable` on the example inputs; raise VerificationError unless every output is
    within fp32 tolerance of `expected`. Returns the largest absolute difference."""
    got = executable.run(*[x.contiguous().numpy() for x in example_inputs])
    got = list(got) if isinstance(got, tuple) else [got]
    worst = 0.0
    for k, (y, ref) in enumerate(zip(got, expected)):
        if y.shape != ref.shape:
            raise VerificationError(f"output {k} has shape {y.shape}, the model's has {ref.shape}")
        diff = np.abs(y.astype(np.float64) - ref.astype(np.float64))
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        bad = ~(diff <= ATOL_SCALE * scale + RTOL * np.abs(ref))
        if bad.any():
            raise VerificationError(
                f"output {k} differs from the model beyond fp32 tolerance: max |diff| = {float(np.nanmax(diff)):.3g} "
                f"at {int(bad.sum())} of {bad.size} entries (scale {scale:.3g}); please report this as a bug"
            )
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def compile(
    model: nn.Module,
    example_inputs,
    *,
    policy: str = "measure",
    num_threads: Optional[int] = None,
    check: bool = True,
) -> Executable:
    """Lower `model` to one native Executable that runs the whole network in a single call.

    example_inputs: a tensor or tuple of float32 tensors [batch, ...] (batch >= 1) used to trace
    shapes and to check the result; the executable then takes any batch size. BatchNorm2d after a
    Conv2d is folded in, activations are fused into the layer producing their input, pruned
    layers are read through their effective (masked) weights, and every Linear/Conv2d is packed
    sparse (a dense layer is stored with all its entries). policy="measure" (default) times CSR
    against the block-sparse formats that fit each Linear on this machine; "threshold" packs CSR
    without timing. num_threads: the executable's intra-op threads (default: torch's count).

    Raises UnsupportedOperation (a ValueError) naming the op and the module path when the model
    uses something the executor does not run (sparseprune.convert still works then), and
    VerificationError when check=True and the executable does not reproduce the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    threads = resolve_threads(num_threads)  # validates num_threads
    inputs = _as_inputs(example_inputs)
    batch = int(inputs[0].shape[0])

    work = _copy_model(model).eval()
    wrapped = _Tracer().is_leaf_module(work, "")
    if wrapped:  # a single layer (or attention module): fx would trace into its forward
        work = nn.Sequential(work)
    if is_pruned(work):
        remove(work)  # the effective (masked) weights become the plain weights of the copy
    with torch.no_grad():
        expected = _model_outputs(work(*inputs))
        prepare_fusions(work)
        try:
            graph = _Tracer().trace(work)
        except Exception as exc:
            raise UnsupportedOperation(
                f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. {_CONVERT_HINT}"
            ) from exc
        gm = fx.GraphModule(work, graph, type(work).__name__)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as exc:
            raise UnsupportedOperation(
                f"the torch.fx trace of {type(model).__name__} does not run on example_inputs "
                f"({type(exc).__name__}: {exc}). {_CONVERT_HINT}"
            ) from exc

    lowering = _Lowering(gm, batch, policy, threads)
    lowering.lower()
    if wrapped:  # name layers as in the caller's module ("linear1", not "0.linear1")
        _strip_name_prefix(lowering, "0.")
    if not lowering.ops:
        raise UnsupportedOperation(
            f"{type(model).__name__} computes nothing the executor runs (no ops). {_CONVERT_HINT}")
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
        **({"input_dtypes": lowering.input_dtypes} if "int64" in lowering.input_dtypes else {}),
        "metadata": {
            "producer": f"sparseprune {getattr(sys.modules.get('sparseprune'), '__version__', 'unknown')}",
            "model": type(model).__name__,
            "policy": policy,
            "example_batch": batch,
            "layers": lowering.layers,
        },
    }
    executable = Executable.from_spec(spec, lowering.arrays, n_threads=num_threads)
    if check:
        verify(executable, inputs, expected)
    return executable
