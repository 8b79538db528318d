"""The lowering's shared state and helpers: buffers, ops and arrays being built, kernel choice for
weighted layers (dense / CSR / block-sparse, and the convolution kernels), and the small op
builders (pooling, slicing, arithmetic with a number) the ATen lowering (aten_lowering.py) uses."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx

from sparseprune.compile.errors import CONVERT_HINT, UnsupportedOperation
from sparseprune.compile.kernel_choice import _sparse_arrays, choose_linear
from sparseprune.compile.values import _NotComputed, _Param, _Tensor


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


class LoweringBase:
    """What a lowering builds (buffers, ops, arrays, the layer table) and the helpers shared by
    its op handlers. Subclasses define where(), sample_shape(), new_buffer() and shape_of()."""

    def __init__(self, gm: fx.GraphModule, batch: int, policy: str, threads: int,
                 converted: Optional[Dict[Tuple[int, Tuple[int, ...]], Any]] = None):
        self.gm = gm
        self.batch = batch
        self.batches: Tuple[int, ...] = (batch,)  # the batch sizes kernels are timed at
        self.policy = policy
        self.threads = threads
        self.buffers: List[Dict[str, Any]] = []
        self.ops: List[Dict[str, Any]] = []
        self.arrays: Dict[str, np.ndarray] = {}
        self.layers: List[Dict[str, Any]] = []  # metadata: one row per weighted layer
        self.packed_names: Dict[int, str] = {}  # id((weight, bias)) -> weight name (shared weights packed once)
        self.env: Dict[fx.Node, Any] = {}
        self.inputs: List[int] = []
        self.outputs: List[int] = []
        self._linear_fields: Dict[str, Dict[str, Any]] = {}  # weight name -> spec fields
        self._param_pairs: Dict[Any, Any] = {}
        self.id_buffers: set = set()  # inputs holding integer ids (embedding lookups only)
        self.mask_buffers: set = set()  # bool inputs (attention masks)
        self.input_dtypes: List[str] = []
        # (data pointer, shape) of a weight -> the SparseLinear / SparseConv2d convert packed it into
        self.converted = dict(converted or {})

    # --- helpers -------------------------------------------------------------------------------

    def fail(self, node: fx.Node, why: str) -> UnsupportedOperation:
        return UnsupportedOperation(f"cannot compile {self.where(node)}: {why}. {CONVERT_HINT}")

    def tensor(self, node: fx.Node, value: Any, what: str = "input", allow_ids: bool = False,
               allow_masks: bool = False) -> int:
        """The buffer of activation `value` (an error naming `what` for anything else)."""
        if isinstance(value, fx.Node):
            value = self.env[value]
        if not isinstance(value, _Tensor):
            raise self.fail(node, f"its {what} is {self._describe(value)}, not an activation tensor")
        if value.buffer in self.id_buffers and not allow_ids:
            raise self.fail(node, f"its {what} is an integer (token id) input: the executor only feeds those to "
                                  "embeddings")
        if value.buffer in self.mask_buffers and not allow_masks:
            raise self.fail(node, f"its {what} is a bool input: the executor only takes those as attention masks")
        return value.buffer

    @staticmethod
    def _describe(value: Any) -> str:
        if isinstance(value, _Param):
            return "a parameter/constant tensor"
        if isinstance(value, _NotComputed):
            return f"{value.what}, which the executable does not compute"
        return f"the constant {value!r:.60}"

    def emit(self, op: Dict[str, Any], node: fx.Node) -> _Tensor:
        """Append `op`, writing a new buffer shaped like `node`'s result."""
        out = self.new_buffer(self.sample_shape(node), node.name)
        op["out"] = out
        self.ops.append(op)
        return _Tensor(out)

    def emit_shaped(self, op: Dict[str, Any], shape: Sequence[Any], name: str) -> int:
        """Append `op`, writing a new buffer of per-sample `shape`."""
        out = self.new_buffer(shape, name)
        op["out"] = out
        self.ops.append(op)
        return out

    # --- weighted layers -----------------------------------------------------------------------

    def converted_layer(self, weight: torch.Tensor) -> Optional[Any]:
        return self.converted.get((weight.data_ptr(), tuple(weight.shape)))

    def linear_arrays(self, pair: Tuple[torch.Tensor, Optional[torch.Tensor]], path: str,
                      x_rows: Sequence[int]) -> Tuple[str, Dict[str, Any]]:
        """Pack a (weight [out, in], bias) pair once; returns its weight name and the spec fields."""
        if id(pair) in self.packed_names:
            name = self.packed_names[id(pair)]
            return name, self._linear_fields[name]
        name = path
        w_t, b_t = pair
        converted = self.converted_layer(w_t)
        if converted is not None:  # packed by convert: its arrays and kernel as they are
            p = converted.packed
            fmt, block, (rows, cols) = p.format, tuple(p.block_shape), p.shape
            arrays = _sparse_arrays(name, p.indptr, p.indices, p.values, p.bias)
            kernel, reason, sparsity = converted.kernel, "already converted", converted.sparsity
            dense_from = None
        else:
            weight = w_t.detach().to(torch.float32).cpu().contiguous().numpy()
            bias = None if b_t is None else b_t.detach().to(torch.float32).cpu().numpy().reshape(-1)
            rows, cols = weight.shape
            sparsity = 1.0 - np.count_nonzero(weight) / max(weight.size, 1)
            choice = choose_linear(name, weight, bias, policy=self.policy, threads=self.threads, rows=x_rows,
                                   switch=True)
            kernel, fmt, block, arrays = choice.kernel, choice.fmt, choice.block, choice.arrays
            reason, dense_from = choice.reason, choice.dense_from
        self.arrays.update(arrays)
        fields = {"weight": name, "format": fmt, "block": list(block), "rows": int(rows), "cols": int(cols)}
        if dense_from is not None:
            fields["dense_from"] = int(dense_from)
        self.packed_names[id(pair)] = name
        self._linear_fields[name] = fields
        self.layers.append({"name": path, "op": "linear", "kernel": kernel, "sparsity": round(float(sparsity), 6),
                            "reason": reason, **({"dense_from": int(dense_from)} if dense_from is not None else {})})
        return name, fields

    # --- small op builders -----------------------------------------------------------------------

    def pool(self, node: fx.Node, is_max: bool, src_value: Any, kernel, stride, padding, dilation=1,
             ceil_mode=False, count_include_pad=True, divisor_override=None) -> _Tensor:
        src = self.tensor(node, src_value)
        if ceil_mode:
            raise self.fail(node, "ceil_mode=True is not supported")
        if is_max and _pair(dilation) != [1, 1]:
            raise self.fail(node, "max pooling with dilation is not supported")
        if not is_max and (not count_include_pad or divisor_override is not None):
            raise self.fail(node, "average pooling needs count_include_pad=True and no divisor_override")
        kernel = _pair(kernel)
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
        if len(self.shape_of(src)) != 3:
            raise self.fail(node, f"pooling needs (N, C, H, W) input, got per-sample shape {self.shape_of(src)}")
        op = {"op": "maxpool2d" if is_max else "avgpool2d", "in": src, "kernel": kernel, "stride": stride,
              "padding": _pair(padding), "name": node.name}
        return self.emit(op, node)

    def adaptive_avgpool(self, node: fx.Node, src_value: Any, output_size) -> _Tensor:
        src = self.tensor(node, src_value)
        shape = self.shape_of(src)
        if len(shape) != 3:
            raise self.fail(node, f"pooling needs (N, C, H, W) input, got per-sample shape {shape}")
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        oh, ow = shape[1] if oh is None else oh, shape[2] if ow is None else ow
        if (oh, ow) == (1, 1):
            return self.emit({"op": "global_avgpool", "in": src, "name": node.name}, node)
        if (oh, ow) == shape[1:]:
            return _Tensor(src)
        if shape[1] % oh == 0 and shape[2] % ow == 0:  # equal windows: a plain average pool
            k = [shape[1] // oh, shape[2] // ow]
            return self.emit({"op": "avgpool2d", "in": src, "kernel": k, "stride": k, "padding": [0, 0],
                              "name": node.name}, node)
        raise self.fail(node, f"adaptive average pooling from {shape[1:]} to {(oh, ow)} (unequal windows)")

    def scalar_arith(self, node: fx.Node, kind: str, a: Any, b: Any) -> _Tensor:
        """x + c, c + x, x - c, c - x, x * c, c * x, x / c for a Python number c: one affine op."""
        a_num = isinstance(a, (int, float)) and not isinstance(a, bool)
        b_num = isinstance(b, (int, float)) and not isinstance(b, bool)
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
