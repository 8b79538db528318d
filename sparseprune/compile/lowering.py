"""_Lowering: walks a traced fx graph and turns every node into ops of the executable spec over
per-sample buffers (see compiler.py for the whole flow). Attention and tensor plumbing live in
the mixins of lowering_attention.py and lowering_tensors.py."""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from sparseprune import formats
from sparseprune.compile.errors import CONVERT_HINT, UnsupportedOperation
from sparseprune.compile.kernel_choice import (
    _CONV_FORMATS,
    CONV_SPARSITY_THRESHOLD,
    _conv_sparse_arrays,
    _linear_format_arrays,
    _one_conv_plan,
    _one_linear_plan,
    _sparse_arrays,
)
from sparseprune.compile.lowering_attention import AttentionLowering
from sparseprune.compile.lowering_tensors import TensorLowering
from sparseprune.compile.torch_ops import (
    _ACTIVATION_FUNCTIONS,
    _ACTIVATION_METHODS,
    _ACTIVATION_MODULES,
    _ADD,
    _ATTENTION_LEAVES,
    _DIV,
    _DROPOUT_FUNCTIONS,
    _IDENTITY_MODULES,
    _MUL,
    _SUB,
    _fn_name,
    _pair,
)
from sparseprune.compile.values import _NOT_CONSTANT, _NotComputed, _Param, _Tensor
from sparseprune.convert.fusion import fuses_relu
from sparseprune.convert.selection import CSR_SPARSITY_THRESHOLD, MIN_BLOCK_FILL
from sparseprune.nn.sparse_conv import (
    SparseConv2d,
    UnsupportedLayer,
    conv_padding,
    count_kernel_patterns,
)
from sparseprune.nn.sparse_linear import SparseLinear
from sparseprune.runtime.spec import MAX_KERNEL_PATTERNS
from sparseprune.timing import time_interleaved


class _Lowering(AttentionLowering, TensorLowering):
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
        self.mask_buffers: set = set()  # bool inputs (attention padding masks only)
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
        return UnsupportedOperation(f"cannot compile {self.where(node)}: {why}. {CONVERT_HINT}")

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
        if allow_ids and meta.dtype in (torch.int64, torch.int32, torch.bool):
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

    def tensor(self, node: fx.Node, value: Any, what: str = "input", allow_ids: bool = False,
               allow_masks: bool = False) -> int:
        if isinstance(value, fx.Node):
            value = self.env[value]
        if not isinstance(value, _Tensor):
            raise self.fail(node, f"its {what} is {self._describe(value)}, not an activation tensor")
        if value.buffer in self.id_buffers and not allow_ids:
            raise self.fail(node, f"its {what} is an integer (token id) input: the executor only feeds those to "
                                  "embeddings")
        if value.buffer in self.mask_buffers and not allow_masks:
            raise self.fail(node, f"its {what} is a bool input: the executor only takes those as attention padding "
                                  "masks (key_padding_mask / src_key_padding_mask)")
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
        if self.policy == "threshold":  # no timing: pack only the chosen format
            best = "csr" if sparsity >= CSR_SPARSITY_THRESHOLD else "dense"
            why = f"policy='threshold': sparsity {sparsity:.2f} {'>=' if best == 'csr' else '<'} {CSR_SPARSITY_THRESHOLD}"
            return best, best, (1, 1), _linear_format_arrays(name, weight, bias, best, (1, 1)), why
        candidates = {"dense": ("dense", (1, 1))}
        if sparsity > 0.0:
            candidates["csr"] = ("csr", (1, 1))
            for r, c in formats.BLOCK_SHAPES:
                if formats.block_fill(weight, r, c) >= MIN_BLOCK_FILL:
                    candidates[f"bsr{r}x{c}"] = ("bsr", (r, c))
        arrays = {k: _linear_format_arrays(name, weight, bias, fmt, block) for k, (fmt, block) in candidates.items()}
        rows, cols = weight.shape
        x = np.random.default_rng(0).standard_normal((max(x_rows, 1), cols)).astype(np.float32)
        plans = {k: _one_linear_plan(arrays[k], name, fmt, block, rows, cols, bias is not None)
                 for k, (fmt, block) in candidates.items()}
        times = time_interleaved({k: (lambda p=p: p.run([x], self.threads)) for k, p in plans.items()},
                                 warmup=1, repeats=5, min_time_s=0.005)
        best = min(times, key=lambda k: times[k].min_s)
        fmt, block = candidates[best]
        return best, fmt, block, arrays[best], f"fastest measured of {sorted(candidates)} at {x_rows} rows"

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
                    f"of tensors computed from the inputs. {CONVERT_HINT}")
            self.outputs.append(self.env[item].buffer)

    def lower_node(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            buffer = self.new_buffer(self.sample_shape(node, allow_ids=True), node.name)
            self.inputs.append(buffer)
            dtype = node.meta["tensor_meta"].dtype
            kind = "bool" if dtype == torch.bool else "float32" if dtype == torch.float32 else "int64"
            self.input_dtypes.append(kind)
            if kind == "int64":
                self.id_buffers.add(buffer)
            elif kind == "bool":
                self.mask_buffers.add(buffer)
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
