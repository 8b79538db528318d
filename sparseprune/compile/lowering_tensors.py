"""Lowering of shape and value plumbing: views, permutes, cat, slicing, embeddings,
model constants and arithmetic with numbers."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx

from sparseprune.compile.values import (
    _BATCH,
    _NOT_CONSTANT,
    _Batch,
    _NotComputed,
    _Param,
    _Tensor,
)


class TensorLowering:
    """Shape and value plumbing, a mixin of compile's _Lowering (self is the lowering: fail,
    tensor, emit, reshape... come from there)."""

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
