"""AtenLowering: walks a torch.export program (ATen ops, functionalised) and turns every node into
ops of the executable spec over per-sample buffers (see compiler.py for the whole flow).

One table (`_HANDLERS`, filled by @lowers) maps each ATen overload to the method lowering it;
anything else is an UnsupportedOperation naming the ATen op and the module path. Nodes that
depend on no input are computed once with torch and become constants (a dynamic dim's size is
taken at its maximum: the executable writes the leading block of such a constant, see the
runtime's "constant" op). Permutes and broadcasts stay lazy (values._View) until an op needs
them in memory.

Kernel choice (dense / CSR / block-sparse / the convolution kernels), the format arrays and the
timing plans come from the shared lowering base (lowering_base.py / kernel_choice.py).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx

from sparseprune.compile.capture import Captured
from sparseprune.compile.errors import CONVERT_HINT, UnsupportedOperation
from sparseprune.compile.kernel_choice import _CONV_FORMATS, _conv_sparse_arrays, choose_conv
from sparseprune.compile.lowering_base import LoweringBase
from sparseprune.compile.values import _Merged, _NotComputed, _Param, _Ramp, _Size, _Tensor, _View

aten = torch.ops.aten
InputKind = torch.export.graph_signature.InputKind

_HANDLERS: Dict[Any, Callable] = {}


def lowers(*targets):
    """Register the decorated method as the lowering of these ATen overloads."""
    def register(fn):
        for t in targets:
            _HANDLERS[t] = fn
        return fn
    return register


# Ops that only check or re-tag a tensor (no data change for float32 activations).
_IDENTITY = (aten.dropout.default, aten.clone.default, aten.alias.default, aten.detach.default,
             aten.contiguous.default, aten.lift_fresh_copy.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int,
             aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
_ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.sigmoid.default: "sigmoid",
                aten.tanh.default: "tanh", aten.hardswish.default: "hardswish",
                aten.hardsigmoid.default: "hardsigmoid", aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt",
                aten.exp.default: "exp", aten.relu6.default: "relu6"}
_BINARY = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.div.Tensor: "div",
           aten.__and__.Tensor: "mul", aten.logical_and.default: "mul"}
_SCALAR = {aten.add.Scalar: "add", aten.sub.Scalar: "sub", aten.mul.Scalar: "mul", aten.div.Scalar: "div"}
# In-place overloads export keeps (it does not functionalise): lowered as their functional form.
_INPLACE = {aten.add_.Tensor: aten.add.Tensor, aten.mul_.Tensor: aten.mul.Tensor, aten.sub_.Tensor: aten.sub.Tensor,
            aten.div_.Tensor: aten.div.Tensor, aten.relu_.default: aten.relu.default,
            aten.hardtanh_.default: aten.hardtanh.default, aten.silu_.default: aten.silu.default,
            aten.sigmoid_.default: aten.sigmoid.default, aten.tanh_.default: aten.tanh.default,
            aten.hardswish_.default: aten.hardswish.default, aten.hardsigmoid_.default: aten.hardsigmoid.default,
            aten.gelu_.default: aten.gelu.default}
_BN = (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class AtenLowering(LoweringBase):
    def __init__(self, captured: Captured, policy: str, threads: int, converted: Optional[Dict] = None):
        program = captured.program
        super().__init__(program.graph_module, int(captured.example_inputs[0].shape[0]), policy, threads,
                         converted)
        self.captured = captured
        self.program = program
        self.graph = program.graph_module.graph
        self.dim_of_symbol = {sym: name for sym, (name, _, _, _) in captured.dims.items()}
        self.dim_max = {name: hi for (name, _, hi, _) in captured.dims.values()}
        self.dim_example = {name: ex for (name, _, _, ex) in captured.dims.values()}
        self.materialized: Dict[_View, int] = {}
        self.bn_folds: Dict[fx.Node, Tuple[torch.Tensor, torch.Tensor]] = {}  # conv node -> (scale, shift)
        self.conv_of_bn: Dict[fx.Node, fx.Node] = {}  # folded batch norm node -> its conv node
        inputs = {s.arg.name: s for s in program.graph_signature.input_specs}
        self.input_specs = inputs

    # --- shapes --------------------------------------------------------------------------------

    def dim(self, size: Any, node: fx.Node) -> Any:
        """A per-sample size as the spec writes it: an int, a dim name or [k, name]."""
        if isinstance(size, int):
            return size
        expr = size.node.expr if isinstance(size, torch.SymInt) else size
        if expr.is_Integer:
            return int(expr)
        if str(expr) in self.dim_of_symbol:
            return self.dim_of_symbol[str(expr)]
        coeff, rest = expr.as_coeff_Mul()
        if coeff.is_Integer and str(rest) in self.dim_of_symbol and int(coeff) >= 1:
            return [int(coeff), self.dim_of_symbol[str(rest)]]
        raise self.fail(node, f"its shape has the size {expr}, which is not a constant, a dynamic dim or a multiple "
                              "of one")

    def concrete(self, d: Any) -> int:
        """The example value of a spec dim (for timing)."""
        if isinstance(d, int):
            return d
        if isinstance(d, str):
            return self.dim_example[d]
        return d[0] * self.dim_example[d[1]]

    def at_max(self, d: Any) -> int:
        if isinstance(d, int):
            return d
        if isinstance(d, str):
            return self.dim_max[d]
        return d[0] * self.dim_max[d[1]]

    def is_batch(self, size: Any) -> bool:
        return isinstance(size, torch.SymInt) and size.node.expr == self.captured.batch_symbol

    def sample_shape(self, node: fx.Node, allow_ids: bool = False) -> Tuple[Any, ...]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise self.fail(node, "its result is not a single tensor")
        if len(val.shape) < 1 or not self.is_batch(val.shape[0]):
            raise self.fail(node, f"its result has shape {tuple(val.shape)}, whose first dimension is not the batch "
                                  "(the executor keeps the batch first and whole)")
        if val.dtype not in (torch.float32, torch.bool) and not allow_ids:
            raise self.fail(node, f"it computes a {val.dtype} tensor (the executor runs float32)")
        return tuple(self.dim(d, node) for d in val.shape[1:])

    # --- values --------------------------------------------------------------------------------

    def where(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        inside = ""
        if stack:
            path, cls = list(stack.values())[-1]
            cls = str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
            inside = f" inside module '{path}' ({cls})" if path else f" inside the model ({cls})"
        return f"ATen op '{node.target}' (node '{node.name}'){inside}"

    def value(self, v: Any) -> Any:
        if isinstance(v, fx.Node):
            return self.env[v]
        if isinstance(v, (list, tuple)):
            return type(v)(self.value(x) for x in v)
        return v

    def args(self, node: fx.Node, names: Sequence[str], defaults: Sequence[Any] = ()) -> List[Any]:
        """node's arguments by position or keyword, as lowered values."""
        out = []
        pad = [None] * (len(names) - len(defaults)) + list(defaults)
        for i, (name, default) in enumerate(zip(names, pad)):
            raw = node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            out.append(self.value(raw))
        return out

    def buf(self, node: fx.Node, v: Any, what: str = "input", allow_ids: bool = False) -> int:
        """The buffer holding activation `v` in its logical layout (a lazy view is copied once)."""
        if isinstance(v, _View):
            if v in self.materialized:
                return self.materialized[v]
            b = v.buffer
            if v.perm is not None:
                shape = self.shape_of(b)
                out_shape = tuple(shape[p] for p in v.perm)
                b = self.emit_shaped({"op": "permute", "in": b, "perm": list(v.perm), "name": f"{node.name}_perm"},
                                     out_shape, f"{node.name}_perm")
            if v.shape is not None and tuple(v.shape) != self.shape_of(b):
                b = self.emit_shaped({"op": "expand", "in": b, "name": f"{node.name}_expand"}, v.shape,
                                     f"{node.name}_expand")
            self.materialized[v] = b
            return b
        if isinstance(v, _Merged):
            raise self.fail(node, f"its {what} merges the batch with other dimensions (only a matmul with a weight "
                                  "and the view back to (batch, ...) may read that)")
        return self.tensor(node, v, what, allow_ids=allow_ids, allow_masks=True)

    def param(self, node: fx.Node, v: Any, what: str) -> torch.Tensor:
        if not isinstance(v, _Param):
            raise self.fail(node, f"its {what} is computed from the inputs, not a parameter of the model")
        return v.tensor

    def constant_operand(self, node: fx.Node, arg: Any, value: torch.Tensor, out_rank: int) -> int:
        """A buffer holding the model constant `value` as one sample's operand of a broadcasting op
        (its batch axis, if any, must be 1)."""
        value = value.detach().to(torch.float32)
        shape = tuple(value.shape)
        sym = tuple(arg.meta["val"].shape) if isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor) \
            else shape
        if len(shape) == out_rank + 1:
            if shape[0] != 1:
                raise self.fail(node, f"a constant of shape {shape} would differ between samples")
            shape, sym, value = shape[1:], sym[1:], value[0]
        if not shape:
            shape, sym, value = (1,), (1,), value.reshape(1)
        dims = tuple(self.dim(d, node) for d in sym)
        name = f"{node.name}.constant"
        k = 0
        while f"{name}.value" in self.arrays:
            k += 1
            name = f"{node.name}.constant{k}"
        self.arrays[f"{name}.value"] = np.ascontiguousarray(value.cpu().numpy()).reshape(-1).copy()
        op = {"op": "constant", "weight": name, "name": name}
        if any(not isinstance(d, int) for d in dims):
            op["shape"] = [int(s) for s in shape]  # stored at the dims' maximum (prefix semantics)
        return self.emit_shaped(op, dims, name)

    # --- the walk ------------------------------------------------------------------------------

    def lower(self) -> None:
        self.find_bn_folds()
        live = self.live_nodes()
        for node in self.graph.nodes:
            if node.op == "output":
                self.lower_output(node)
            elif node.op == "placeholder" or node in live:
                self.env[node] = self.lower_node(node)

    def live_nodes(self) -> set:
        """The nodes the outputs depend on (export keeps dead code, e.g. attention weights a
        model does not use), with in-place ops and what they read."""
        stack = [n for n in self.graph.nodes if n.op == "output" or n.target in _INPLACE]
        live = set()
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(node.all_input_nodes)
        return live

    def lower_output(self, node: fx.Node) -> None:
        for k, item in enumerate(node.args[0]):
            if item is None:
                continue
            v = self.env.get(item) if isinstance(item, fx.Node) else item
            if not isinstance(v, (_Tensor, _View)):
                raise UnsupportedOperation(
                    f"cannot compile the model's output {k} ({self.captured.output_names[k]!r}): it is not computed "
                    f"from the inputs per sample ({type(v).__name__}). {CONVERT_HINT}")
            self.outputs.append(self.buf(item, v, "output"))

    def lower_node(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.placeholder(node)
        if node.op == "get_attr":
            return _Param(getattr(self.gm, node.target))
        if node.op != "call_function":
            raise self.fail(node, f"graph node kind {node.op!r}")
        if node.target is operator.getitem:
            container, index = self.value(node.args[0]), node.args[1]
            return container[index]
        conv = self.conv_of_bn.get(node)
        if conv is not None:
            out = self.env[conv]
            return (out, _NotComputed("batch norm statistics"), _NotComputed("batch norm statistics")) \
                if node.target is _BN[0] else out
        folded = self.fold(node)
        if folded is not None:
            return folded
        if node.target in _INPLACE:  # x.add_(y): lowered as x + y, and x is that result from now on
            result = _HANDLERS[_INPLACE[node.target]](self, node)
            if isinstance(node.args[0], fx.Node):
                self.env[node.args[0]] = result
            return result
        handler = _HANDLERS.get(node.target)
        if handler is None:
            raise self.fail(node, "the executor has no op for it")
        return handler(self, node)

    def placeholder(self, node: fx.Node) -> Any:
        spec = self.input_specs[node.name]
        if spec.kind != InputKind.USER_INPUT:
            value = self.program.state_dict.get(spec.target)
            if value is None:
                value = self.program.constants.get(spec.target)
            if not isinstance(value, torch.Tensor):
                raise self.fail(node, f"the model constant {spec.target!r} is not a tensor")
            return _Param(value.detach())
        val = node.meta["val"]
        kind = "float32" if val.dtype == torch.float32 else "bool" if val.dtype == torch.bool or \
            self.only_read_as_bool(node) else "int64"
        buffer = self.new_buffer(self.sample_shape(node, allow_ids=True), self.captured.input_names[len(self.inputs)])
        self.inputs.append(buffer)
        self.input_dtypes.append(kind)
        (self.id_buffers if kind == "int64" else self.mask_buffers if kind == "bool" else set()).add(buffer)
        return _Tensor(buffer)

    def only_read_as_bool(self, node: fx.Node) -> bool:
        """An integer input that every use converts to bool (transformers' attention_mask): the
        executable takes it as a mask (nonzero = 1)."""
        users = list(node.users)
        while users:
            u = users.pop()
            if u.target in _RESHAPES:
                users.extend(u.users)
            elif u.target in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device) and \
                    u.meta.get("val") is not None and u.meta["val"].dtype == torch.bool:
                continue
            elif u.target in (aten._assert_tensor_metadata.default, aten.sym_size.int):
                continue
            else:
                return False
        return True

    # --- constants -----------------------------------------------------------------------------

    def fold(self, node: fx.Node) -> Optional[Any]:
        """The value of a node that depends on no input, computed with torch (None otherwise).
        Sizes of dynamic dims are taken at their maximum."""
        if node.target is aten.sym_size.int:
            return self.sym_size(node)
        inputs = [self.env[n] for n in node.all_input_nodes]
        if any(not isinstance(v, (_Param, _Size)) or (isinstance(v, _Size) and v.value == "batch") for v in inputs):
            return None

        def concrete(v: Any) -> Any:
            if isinstance(v, fx.Node):
                v = self.env[v]
            if isinstance(v, _Param):
                return v.tensor
            if isinstance(v, _Size):
                return self.at_max(v.value)
            if isinstance(v, (list, tuple)):
                return type(v)(concrete(x) for x in v)
            return v

        try:
            with torch.no_grad():
                result = node.target(*concrete(node.args), **{k: concrete(v) for k, v in node.kwargs.items()})
        except Exception as exc:
            raise self.fail(node, f"evaluating it as a constant failed ({type(exc).__name__}: {exc})") from None
        if isinstance(result, torch.Tensor):
            return _Param(result)
        if isinstance(result, (list, tuple)) and all(isinstance(r, torch.Tensor) for r in result):
            return type(result)(_Param(r) for r in result)
        return result

    def sym_size(self, node: fx.Node) -> _Size:
        size = node.meta["val"]
        if self.is_batch(size):
            return _Size("batch")
        return _Size(self.dim(size, node))

    # --- batch norm folding ----------------------------------------------------------------------

    def find_bn_folds(self) -> None:
        """Each inference BatchNorm reading only a conv2d's output is folded into that conv's
        weight and bias."""
        for node in self.graph.nodes:
            if node.target not in _BN:
                continue
            src = node.args[0]
            if not (isinstance(src, fx.Node) and src.target in (aten.conv2d.default, aten.conv2d.padding)
                    and len(src.users) == 1):
                continue
            if node.target is aten.batch_norm.default and node.args[5]:
                continue  # training mode
            weight, bias, mean, var = (self._const_arg(a) for a in node.args[1:5])
            if mean is None or var is None:
                continue
            eps = float(node.args[7] if node.target is aten.batch_norm.default else node.args[6])
            c = mean.shape[0]
            scale = (torch.ones(c) if weight is None else weight.float()) / torch.sqrt(var.float() + eps)
            shift = (torch.zeros(c) if bias is None else bias.float()) - mean.float() * scale
            self.bn_folds[src] = (scale, shift)
            self.conv_of_bn[node] = src

    def _const_arg(self, a: Any) -> Optional[torch.Tensor]:
        if not isinstance(a, fx.Node) or a.op != "placeholder":
            return None
        spec = self.input_specs[a.name]
        if spec.kind == InputKind.USER_INPUT:
            return None
        value = self.program.state_dict.get(spec.target)
        return self.program.constants.get(spec.target) if value is None else value

    # --- weighted layers -----------------------------------------------------------------------

    def layer_path(self, node: fx.Node, weight_arg: Any) -> str:
        if isinstance(weight_arg, fx.Node) and weight_arg.op == "placeholder":
            target = self.input_specs[weight_arg.name].target
            if target:
                return target[:-len(".weight")] if target.endswith(".weight") else target
        return node.name

    def linear_layer(self, node: fx.Node, src: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     path: str, transposed: bool = False) -> int:
        """y = x W^T + b over the last axis of `src` (W stored [in, out] when transposed)."""
        key = (id(weight), id(bias), transposed)
        if key not in self._param_pairs:
            self._param_pairs[key] = (weight.t() if transposed else weight, bias)
        pair = self._param_pairs[key]
        shape = self.shape_of(src)
        rows_per_sample = math.prod(self.concrete(d) for d in shape[:-1])
        name, fields = self.linear_arrays(pair, path, tuple(b * rows_per_sample for b in self.batches))
        if shape[-1] != fields["cols"]:
            raise self.fail(node, f"its input has {shape[-1]} features, the layer expects {fields['cols']}")
        op = {"op": "linear", "name": path, "in": src, **fields, "activation": None}
        return self.emit_shaped(op, shape[:-1] + (fields["rows"],), path)

    @lowers(aten.linear.default)
    def _linear(self, node: fx.Node) -> Any:
        x, w, b = self.args(node, ("input", "weight", "bias"), (None,))
        weight = self.param(node, w, "weight")
        bias = None if b is None else self.param(node, b, "bias")
        if weight.dim() != 2:
            raise self.fail(node, f"a {weight.dim()}-D linear weight")
        if isinstance(x, _Merged):
            return _Merged(self.linear_layer(node, x.buffer, weight, bias, self.layer_path(node, node.args[1])))
        return _Tensor(self.linear_layer(node, self.buf(node, x), weight, bias, self.layer_path(node, node.args[1])))

    @lowers(aten.addmm.default, aten.mm.default)
    def _addmm(self, node: fx.Node) -> Any:
        """bias + x @ W with W [in, out] a parameter (transformers' Conv1D) on merged rows."""
        if node.target is aten.addmm.default:
            b, x, w, beta, alpha = self.args(node, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
            if beta != 1 or alpha != 1:
                raise self.fail(node, "addmm with beta/alpha != 1")
            bias = self.param(node, b, "bias")
            w_arg = node.args[2]
        else:
            x, w = self.args(node, ("input", "mat2"))
            bias, w_arg = None, node.args[1]
        weight = self.param(node, w, "weight")
        if not isinstance(x, _Merged) or weight.dim() != 2 or (bias is not None and bias.dim() != 1):
            raise self.fail(node, "a matrix product with a weight is supported on (batch * rows, features) views of "
                                  "an activation, with a 2-D weight and a 1-D bias")
        return _Merged(self.linear_layer(node, x.buffer, weight, bias, self.layer_path(node, w_arg), transposed=True))

    @lowers(aten.conv2d.default, aten.conv2d.padding)
    def _conv2d(self, node: fx.Node) -> Any:
        x, w, b, stride, padding, dilation, groups = self.args(
            node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
        weight = self.param(node, w, "weight").float()
        bias = None if b is None else self.param(node, b, "bias").float()
        if weight.dim() != 4:
            raise self.fail(node, f"a {weight.dim()}-D convolution weight (only 2-D convolutions)")
        kernel = list(weight.shape[2:])
        pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]  # noqa: E731
        stride, dilation = pair(stride), pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                padding = [0, 0]
            else:  # 'same' with stride 1: symmetric only when each total is even
                total = [d * (k - 1) for d, k in zip(dilation, kernel)]
                if any(t % 2 for t in total):
                    raise self.fail(node, "padding='same' that pads unequally on the two sides")
                padding = [t // 2 for t in total]
        padding = pair(padding)
        if node in self.bn_folds:
            scale, shift = self.bn_folds[node]
            weight = weight * scale.reshape(-1, 1, 1, 1)
            bias = shift if bias is None else bias * scale + shift
        src = self.buf(node, x)
        in_shape = self.shape_of(src)
        out_channels, in_per_group = int(weight.shape[0]), int(weight.shape[1])
        groups = int(groups)
        if len(in_shape) != 3 or in_shape[0] != in_per_group * groups:
            raise self.fail(node, f"its input has per-sample shape {in_shape}, the layer expects "
                                  f"({in_per_group * groups}, H, W)")
        if not all(isinstance(d, int) for d in in_shape):
            raise self.fail(node, "a convolution over a dynamic size")
        path = self.layer_path(node, node.args[1])
        key = ("conv", id(self.param(node, w, "weight")), node in self.bn_folds and id(node))
        if key in self._param_pairs:
            name, fields = self._param_pairs[key]
        else:
            fields = {"in_channels": in_shape[0], "out_channels": out_channels, "kernel": kernel, "stride": stride,
                      "padding": padding, "dilation": dilation, "groups": groups}
            w_np = weight.detach().contiguous().numpy()
            b_np = None if bias is None else bias.detach().contiguous().numpy()
            converted = None if node in self.bn_folds else self.converted_layer(self.param(node, w, "weight"))
            if converted is not None:  # packed by convert: its arrays and kernel as they are
                p = converted.packed
                kernel_name, reason, sparsity = converted.kernel, "already converted", converted.sparsity
                arrays = _conv_sparse_arrays(path, p.row_ptr, p.taps, p.values, p.bias)
                dense_from = None
            else:
                sparsity = 1.0 - np.count_nonzero(w_np) / max(w_np.size, 1)
                choice = choose_conv(path, w_np, b_np, fields, policy=self.policy, threads=self.threads,
                                     in_shape=in_shape, batches=self.batches, switch=True)
                kernel_name, arrays, reason, dense_from = choice.kernel, choice.arrays, choice.reason, choice.dense_from
            if kernel_name != "sparse-conv":
                fields = {**fields, "format": _CONV_FORMATS[kernel_name]}
            switch = {} if dense_from is None else {"dense_from": int(dense_from)}
            fields = {**fields, **switch}
            self.arrays.update(arrays)
            self.layers.append({"name": path, "op": "conv2d", "kernel": kernel_name,
                                "sparsity": round(float(sparsity), 6), "reason": reason, **switch})
            name = path
            self._param_pairs[key] = (name, fields)
        op = {"op": "conv2d", "name": path, "in": src, "weight": name, **fields, "activation": None}
        return self.emit(op, node)

    @lowers(*_BN)
    def _batch_norm(self, node: fx.Node) -> Any:
        """A BatchNorm not folded into a convolution: x * scale + shift per channel (axis 1)."""
        x = self.value(node.args[0])
        weight, bias, mean, var = (None if a is None else self.param(node, self.value(a), "statistics")
                                   for a in node.args[1:5])
        if node.target is aten.batch_norm.default and node.args[5]:
            raise self.fail(node, "batch norm in training mode")
        eps = float(node.args[7] if node.target is aten.batch_norm.default else node.args[6])
        scale = (torch.ones_like(mean) if weight is None else weight.float()) / torch.sqrt(var.float() + eps)
        shift = (torch.zeros_like(mean) if bias is None else bias.float()) - mean.float() * scale
        src = self.buf(node, x)
        rank = len(self.shape_of(src))
        per_channel = (-1,) + (1,) * (rank - 1)
        scaled = self.binary_with_constant(node, "mul", src, scale.reshape(per_channel), None)
        out = _Tensor(self.binary_with_constant(node, "add", scaled, shift.reshape(per_channel), None))
        if node.target is _BN[0]:
            return (out, _NotComputed("batch norm statistics"), _NotComputed("batch norm statistics"))
        return out

    @lowers(aten.layer_norm.default)
    def _layer_norm(self, node: fx.Node) -> Any:
        x, normalized, w, b, eps = self.args(node, ("input", "normalized_shape", "weight", "bias", "eps"),
                                             (None, None, 1e-5))
        src = self.buf(node, x)
        shape = self.shape_of(src)
        if list(normalized) != [shape[-1]] or not isinstance(shape[-1], int):
            raise self.fail(node, f"layer norm over {list(normalized)}: only the last dimension is supported")
        n = shape[-1]
        name = self.layer_path(node, node.args[2] if len(node.args) > 2 else None)
        if name == node.name or name in {f[:-len(".gamma")] for f in self.arrays if f.endswith(".gamma")}:
            name = node.name
        gamma = np.ones(n, np.float32) if w is None else self.param(node, w, "weight").float().numpy().reshape(-1)
        beta = np.zeros(n, np.float32) if b is None else self.param(node, b, "bias").float().numpy().reshape(-1)
        self.arrays[f"{name}.gamma"] = np.ascontiguousarray(gamma).copy()
        self.arrays[f"{name}.beta"] = np.ascontiguousarray(beta).copy()
        return self.emit({"op": "layernorm", "in": src, "weight": name, "eps": float(eps), "name": name}, node)

    @lowers(aten.embedding.default)
    def _embedding(self, node: fx.Node) -> Any:
        w, ids = self.args(node, ("weight", "indices"))
        table = self.param(node, w, "weight")
        src = self.buf(node, ids, "indices", allow_ids=True)
        if src not in self.id_buffers:
            raise self.fail(node, "the embedding's ids must be an integer input of the model")
        name = self.layer_path(node, node.args[0])
        if f"{name}.table" not in self.arrays:
            self.arrays[f"{name}.table"] = np.ascontiguousarray(table.detach().float().numpy())
            self.layers.append({"name": name, "op": "embedding", "kernel": "lookup", "sparsity": 0.0,
                                "reason": "table rows copied"})
        return self.emit({"op": "embedding", "in": src, "weight": name, "name": name}, node)

    # --- elementwise -----------------------------------------------------------------------------

    def activation_op(self, node: fx.Node, kind: str, x: Any) -> _Tensor:
        return self.emit({"op": "activation", "kind": kind, "in": self.buf(node, x), "name": node.name}, node)

    @lowers(*_ACTIVATIONS)
    def _activation(self, node: fx.Node) -> Any:
        return self.activation_op(node, _ACTIVATIONS[_INPLACE.get(node.target, node.target)], self.value(node.args[0]))

    @lowers(aten.gelu.default)
    def _gelu(self, node: fx.Node) -> Any:
        x, approximate = self.args(node, ("input", "approximate"), ("none",))
        return self.activation_op(node, "gelu" if approximate == "none" else "gelu_tanh", x)

    @lowers(aten.hardtanh.default)
    def _hardtanh(self, node: fx.Node) -> Any:
        x, lo, hi = self.args(node, ("input", "min_val", "max_val"), (-1.0, 1.0))
        if (lo, hi) != (0.0, 6.0):
            raise self.fail(node, f"hardtanh({lo}, {hi}) (only relu6)")
        return self.activation_op(node, "relu6", x)

    def binary_with_constant(self, node: fx.Node, kind: str, a: int, value: torch.Tensor, arg: Any,
                             constant_first: bool = False) -> int:
        c = self.constant_operand(node, arg, value, len(self.shape_of(a)))
        operands = (c, a) if constant_first else (a, c)
        out_shape = self.broadcast(node, self.shape_of(operands[0]), self.shape_of(operands[1]))
        return self.emit_shaped({"op": kind, "a": operands[0], "b": operands[1], "activation": None,
                                 "name": node.name}, out_shape, node.name)

    def broadcast(self, node: fx.Node, a: Sequence[Any], b: Sequence[Any]) -> Tuple[Any, ...]:
        out = []
        for k in range(max(len(a), len(b))):
            da = a[len(a) - 1 - k] if k < len(a) else 1
            db = b[len(b) - 1 - k] if k < len(b) else 1
            if da != db and 1 not in (da, db):
                raise self.fail(node, f"operands of per-sample shapes {tuple(a)} and {tuple(b)} do not broadcast")
            out.append(db if da == 1 else da)
        return tuple(reversed(out))

    @lowers(*_BINARY)
    def _binary(self, node: fx.Node) -> Any:
        kind = _BINARY[_INPLACE.get(node.target, node.target)]
        a, b = self.value(node.args[0]), self.value(node.args[1])
        if node.kwargs.get("alpha", 1) != 1:
            raise self.fail(node, "alpha != 1")
        if _is_number(a) or _is_number(b):
            return self.scalar_arith(node, kind, a, b)
        if kind == "mul":  # x * ones, mask & True (when that keeps x's shape): x itself
            for x, c, x_arg in ((a, b, node.args[0]), (b, a, node.args[1])):
                if isinstance(c, _Param) and not isinstance(x, _Param) and bool((c.tensor == 1).all()) and \
                        tuple(x_arg.meta["val"].shape) == tuple(node.meta["val"].shape):
                    return x
        if isinstance(a, _Param):
            if kind == "div":
                raise self.fail(node, "a constant divided by an activation")
            return _Tensor(self.binary_with_constant(node, kind, self.buf(node, b, "second operand"), a.tensor,
                                                     node.args[0], constant_first=True))
        if isinstance(b, _Param):
            return _Tensor(self.binary_with_constant(node, kind, self.buf(node, a, "first operand"), b.tensor,
                                                     node.args[1]))
        ba, bb = self.buf(node, a, "first operand"), self.buf(node, b, "second operand")
        return self.emit({"op": kind, "a": ba, "b": bb, "activation": None, "name": node.name}, node)

    @lowers(*_SCALAR, aten.rsub.Scalar)
    def _scalar(self, node: fx.Node) -> Any:
        a, b = self.value(node.args[0]), self.value(node.args[1])
        if node.target is aten.rsub.Scalar:
            return self.scalar_arith(node, "sub", b, a)
        return self.scalar_arith(node, _SCALAR[node.target], a, b)

    def scalar_arith(self, node: fx.Node, kind: str, a: Any, b: Any) -> Any:
        if isinstance(a, (_View, _Merged)) or isinstance(b, (_View, _Merged)):
            x = a if not _is_number(a) else b
            x = _Tensor(self.buf(node, x))
            a, b = (x, b) if not _is_number(a) else (a, x)
        return super().scalar_arith(node, kind, a, b)

    @lowers(aten.logical_not.default, aten.bitwise_not.default)
    def _not(self, node: fx.Node) -> Any:
        """~mask of a bool tensor: 1 - mask (bool values are 0/1 float32 in the executor)."""
        if node.meta["val"].dtype != torch.bool:
            raise self.fail(node, "a bitwise not of integers")
        src = self.buf(node, self.value(node.args[0]))
        return self.emit({"op": "affine", "in": src, "scale": -1.0, "shift": 1.0, "name": node.name}, node)

    @lowers(aten.pow.Tensor_Scalar)
    def _pow(self, node: fx.Node) -> Any:
        x, exponent = self.value(node.args[0]), node.args[1]
        src = self.buf(node, x)
        if exponent == 2:
            return self.emit({"op": "mul", "a": src, "b": src, "activation": None, "name": node.name}, node)
        if exponent == 3:
            sq = self.emit_shaped({"op": "mul", "a": src, "b": src, "activation": None, "name": f"{node.name}_sq"},
                                  self.shape_of(src), f"{node.name}_sq")
            return self.emit({"op": "mul", "a": sq, "b": src, "activation": None, "name": node.name}, node)
        if exponent == 0.5:
            return self.activation_op(node, "sqrt", x)
        if exponent == -0.5:
            return self.activation_op(node, "rsqrt", x)
        raise self.fail(node, f"x ** {exponent!r} (only 2, 3, 0.5 and -0.5)")

    @lowers(aten._softmax.default, aten.softmax.int)
    def _softmax(self, node: fx.Node) -> Any:
        x, dim = self.value(node.args[0]), node.args[1]
        src = self.buf(node, x)
        if dim not in (-1, len(self.shape_of(src))):
            raise self.fail(node, f"softmax over dim {dim} (only the last)")
        return self.emit({"op": "softmax", "in": src, "name": node.name}, node)

    # --- shapes and layout -----------------------------------------------------------------------

    @lowers(*_IDENTITY)
    def _identity(self, node: fx.Node) -> Any:
        if node.target is aten.dropout.default and node.args[2] if len(node.args) > 2 else False:
            raise self.fail(node, "dropout in training mode")
        return self.value(node.args[0])

    @lowers(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)
    def _to(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        dtype = node.meta["val"].dtype
        if isinstance(x, _Tensor) and x.buffer in self.id_buffers and dtype != torch.float32 and dtype != torch.bool:
            return x  # ids stay ids
        if dtype not in (torch.float32, torch.bool):
            raise self.fail(node, f"a conversion to {dtype}")
        if dtype == torch.bool and not (isinstance(x, (_Tensor, _View)) and self.root_of(x) in self.mask_buffers):
            raise self.fail(node, "a conversion of computed values to bool")
        return x

    def root_of(self, v: Any) -> int:
        b = v.buffer
        while self.buffers[b]["alias_of"] is not None:
            b = self.buffers[b]["alias_of"]
        return b

    @lowers(aten._assert_tensor_metadata.default)
    def _assert(self, node: fx.Node) -> Any:
        return None

    @lowers(*_RESHAPES)
    def _reshape(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        val = node.meta["val"]
        if isinstance(x, _Ramp):
            return self.ramp_reshape(node, x)
        if isinstance(x, _Merged):
            shape = self.sample_shape(node)
            if math.prod(self.concrete(d) for d in shape) and list(shape) == list(self.shape_of(x.buffer)):
                return _Tensor(x.buffer)
            return self.reshape_to(node, x.buffer, shape)
        if len(val.shape) == 2 and not self.is_batch(val.shape[0]) and \
                self.captured.batch_symbol in getattr(val.shape[0], "node", None).expr.free_symbols \
                if isinstance(val.shape[0], torch.SymInt) else False:
            src = self.buf(node, x)  # (batch * rows, features): only a weight product may read it
            if self.shape_of(src)[-1] != self.dim(val.shape[1], node):
                raise self.fail(node, "a view merging the batch with other dimensions")
            return _Merged(src)
        if isinstance(x, _View) and self.logical_shape(x) == self.sample_shape(node):
            return x  # a reshape to the shape it has: keep the view lazy
        src = self.buf(node, x, allow_ids=True)
        return self.reshape_to(node, src, self.sample_shape(node, allow_ids=True))

    def logical_shape(self, v: _View) -> Tuple[Any, ...]:
        if v.shape is not None:
            return tuple(v.shape)
        shape = self.shape_of(v.buffer)
        return shape if v.perm is None else tuple(shape[p] for p in v.perm)

    def reshape_to(self, node: fx.Node, src: int, shape: Tuple[Any, ...]) -> _Tensor:
        if tuple(shape) == self.shape_of(src):
            return _Tensor(src)
        if math.prod(self.at_max(d) for d in shape) != math.prod(self.at_max(d) for d in self.shape_of(src)):
            raise self.fail(node, "it changes the number of elements per sample")
        b = self.new_buffer(shape, node.name, alias_of=src)
        for group in (self.id_buffers, self.mask_buffers):
            if src in group:
                group.add(b)
        return _Tensor(b)

    def new_buffer(self, shape: Sequence[Any], name: str, alias_of: Optional[int] = None) -> int:
        self.buffers.append({"shape": [d if not isinstance(d, int) else int(d) for d in shape],
                             "alias_of": alias_of, "name": name})
        return len(self.buffers) - 1

    def shape_of(self, buffer: int) -> Tuple[Any, ...]:
        return tuple(tuple(d) if isinstance(d, list) else d for d in self.buffers[buffer]["shape"])

    @lowers(aten.transpose.int, aten.swapaxes.default, aten.swapdims.default, aten.permute.default)
    def _permute(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        ndim = len(node.meta["val"].shape)
        if node.target is not aten.permute.default:
            dims = list(range(ndim))
            d0, d1 = node.args[1] % ndim, node.args[2] % ndim
            dims[d0], dims[d1] = dims[d1], dims[d0]
        else:
            dims = [d % ndim for d in node.args[1]]
        if dims[0] != 0:
            raise self.fail(node, "it moves the batch dimension (the executor keeps the batch first)")
        perm = tuple(d - 1 for d in dims[1:])
        if isinstance(x, _View) and x.shape is None:
            base = x.perm or tuple(range(len(perm)))
            perm, src = tuple(base[p] for p in perm), x.buffer
        else:
            src = self.buf(node, x)
        if perm == tuple(range(len(perm))):
            return _Tensor(src)
        return _View(src, perm)

    @lowers(aten.expand.default)
    def _expand(self, node: fx.Node) -> Any:
        x = self.value(node.args[0])
        val = node.meta["val"]
        if isinstance(x, _Param):  # a class token or a constant mask over the batch: the same in every sample
            if not self.is_batch(val.shape[0]) or (x.tensor.dim() == len(val.shape) and x.tensor.shape[0] != 1):
                raise self.fail(node, "expanding a constant to anything but (batch, ...)")
            return _Param(x.tensor.expand([1] + [self.at_max(self.dim(d, node)) for d in val.shape[1:]]))
        src = self.buf(node, x)
        shape = self.sample_shape(node)
        if tuple(shape) == self.shape_of(src):
            return _Tensor(src)
        return _View(src, None, tuple(shape))

    @lowers(aten.cat.default, aten.concat.default)
    def _cat(self, node: fx.Node) -> Any:
        tensors, dim = self.args(node, ("tensors", "dim"), (0,))
        ndim = len(node.meta["val"].shape)
        if dim % ndim == 0:
            raise self.fail(node, "cat along the batch dimension")
        ids = []
        for arg, t in zip(node.args[0], tensors):
            if isinstance(t, _Param):
                ids.append(self.constant_operand(node, arg, t.tensor, ndim - 1))
            else:
                ids.append(self.buf(node, t, "operand"))
        if len(ids) == 1:
            return _Tensor(ids[0])
        return self.emit({"op": "cat", "inputs": ids, "axis": dim % ndim - 1, "name": node.name}, node)

    @lowers(aten.slice.Tensor)
    def _slice(self, node: fx.Node) -> Any:
        x, dim, start, end, step = self.args(node, ("input", "dim", "start", "end", "step"), (0, None, None, 1))
        src = self.buf(node, x)
        ndim = len(self.shape_of(src)) + 1
        if dim % ndim == 0:
            if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2 ** 62) or
                                       end == _Size("batch")) and step == 1:
                return _Tensor(src)
            raise self.fail(node, "it slices the batch dimension")
        axis = dim % ndim - 1
        size = self.shape_of(src)[axis]
        out = self.sample_shape(node)
        if isinstance(end, _Size) and end.value == size and start in (None, 0) and step == 1:
            return _Tensor(src)
        if not isinstance(size, int):
            raise self.fail(node, "slicing a dynamic dimension")
        return _Tensor(self.slice_axis(node, src, axis, start, end if isinstance(end, int) else None, step, node.name)) \
            if out != self.shape_of(src) else _Tensor(src)

    @lowers(aten.select.int)
    def _select(self, node: fx.Node) -> Any:
        x, dim, index = self.args(node, ("input", "dim", "index"))
        src = self.buf(node, x)
        axis = self.sample_axis(node, src, dim)
        size = self.shape_of(src)[axis]
        if not isinstance(size, int) and index < 0:
            raise self.fail(node, "selecting from the end of a dynamic dimension")
        i = index % size if isinstance(size, int) else index
        return self.reshape_to(node, self.slice_axis_any(node, src, axis, i), self.sample_shape(node))

    def slice_axis_any(self, node: fx.Node, src: int, axis: int, i: int) -> int:
        shape = self.shape_of(src)
        out_shape = shape[:axis] + (1,) + shape[axis + 1:]
        return self.emit_shaped({"op": "slice", "in": src, "axis": axis, "start": int(i), "step": 1,
                                 "name": f"{node.name}_slice"}, out_shape, f"{node.name}_slice")

    @lowers(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
    def _split(self, node: fx.Node) -> Any:
        """Consecutive parts along a per-sample axis: split (sizes or a part size), chunk (a part
        count: parts of ceil(length / chunks), the last shorter), unbind (parts of 1, axis dropped)."""
        if node.target is aten.unbind.int:
            (x, dim), sizes = self.args(node, ("input", "dim"), (0,)), None
        else:
            x, sizes, dim = self.args(node, ("input", "split_size", "dim"), (0,))
        src = self.buf(node, x)
        axis = self.sample_axis(node, src, dim)
        length = self.shape_of(src)[axis]
        if not isinstance(length, int):
            raise self.fail(node, "splitting a dynamic dimension")
        if node.target is aten.unbind.int:
            sizes = 1
        elif node.target is aten.chunk.default:
            sizes = -(-length // sizes)
        if isinstance(sizes, int):
            sizes = [min(sizes, length - s) for s in range(0, length, sizes)]
        parts, start = [], 0
        for k, (size, val) in enumerate(zip(sizes, node.meta["val"])):
            part = self.slice_axis(node, src, axis, start, start + size, 1, f"{node.name}_{k}")
            shape = tuple(self.dim(d, node) for d in val.shape[1:])
            parts.append(self.reshape_to(node, part, shape) if shape != self.shape_of(part) else _Tensor(part))
            start += size
        return tuple(parts)

    @lowers(aten.narrow.default)
    def _narrow(self, node: fx.Node) -> Any:
        x, dim, start, length = self.args(node, ("input", "dim", "start", "length"))
        src = self.buf(node, x)
        axis = self.sample_axis(node, src, dim)
        if not isinstance(start, int) or not isinstance(length, int):
            raise self.fail(node, "narrow with bounds computed from the inputs")
        start = start % self.shape_of(src)[axis] if start < 0 else start
        return _Tensor(self.slice_axis(node, src, axis, start, start + length, 1, node.name))

    # --- reductions, pooling, padding ------------------------------------------------------------

    @lowers(aten.mean.dim, aten.sum.dim_IntList)
    def _reduce(self, node: fx.Node) -> Any:
        x, dims, keepdim = self.args(node, ("input", "dim", "keepdim"), (False,))
        src = self.buf(node, x)
        shape = self.shape_of(src)
        ndim = len(shape) + 1
        dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
        if any(d % ndim == 0 for d in dims):
            raise self.fail(node, "a reduction over the batch dimension")
        axes = sorted({d % ndim - 1 for d in dims})
        kept = tuple(1 if i in axes else s for i, s in enumerate(shape))
        kind = "mean" if node.target is aten.mean.dim else "sum"
        if kind == "mean" and len(shape) == 3 and axes == [1, 2]:
            out = self.emit_shaped({"op": "global_avgpool", "in": src, "name": node.name}, kept, node.name)
        else:
            out = self.emit_shaped({"op": "reduce", "kind": kind, "in": src, "axes": axes, "name": node.name},
                                   kept, node.name)
        return self.reshape_to(node, out, self.sample_shape(node))

    @lowers(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
    def _adaptive_avg_pool(self, node: fx.Node) -> Any:
        x, size = self.args(node, ("input", "output_size"))
        return self.adaptive_avgpool(node, _Tensor(self.buf(node, x)), size)

    @lowers(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
    def _max_pool(self, node: fx.Node) -> Any:
        x, k, s, p, d, ceil = self.args(node, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                                        ([], 0, 1, False))
        src = self.buf(node, x)
        if ceil and self.floor_mode_agrees(node, src, k, s, p):
            ceil = False
        out = self.pool(node, True, _Tensor(src), k, s, p, d, ceil)
        return (out, _NotComputed("max pooling indices")) if node.target is aten.max_pool2d_with_indices.default \
            else out

    @lowers(aten.avg_pool2d.default)
    def _avg_pool(self, node: fx.Node) -> Any:
        x, k, s, p, ceil, count_pad, divisor = self.args(
            node, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
            ([], 0, False, True, None))
        src = self.buf(node, x)
        kk = [k, k] if isinstance(k, int) else list(k) * (2 // len(k))
        if ceil and self.sample_shape(node)[1:] == (1, 1) and list(p or [0]) in ([0], [0, 0]) and \
                all(isinstance(n, int) and kk[i] >= n for i, n in enumerate(self.shape_of(src)[1:])):
            # one window clipped to the whole map (EfficientNet's pooler): torch divides by the clipped size
            return self.emit({"op": "global_avgpool", "in": src, "name": node.name}, node)
        if ceil and self.floor_mode_agrees(node, src, k, s, p):
            ceil = False
        return self.pool(node, False, _Tensor(src), k, s, p, 1, ceil, count_pad, divisor)

    def floor_mode_agrees(self, node: fx.Node, src: int, k, s, p) -> bool:
        """ceil_mode makes no difference when the windows tile the input exactly (a pooler whose
        kernel is the whole map, as EfficientNet's)."""
        pair = lambda v: [v, v] if isinstance(v, int) else list(v) * (2 // len(v))  # noqa: E731
        k, s, p = pair(k), pair(s or k), pair(p)
        h, w = self.shape_of(src)[1:]
        floor = [(n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip((h, w), k, s, p)]
        return list(self.sample_shape(node)[1:]) == floor

    @lowers(aten.constant_pad_nd.default, aten.pad.default)
    def _pad(self, node: fx.Node) -> Any:
        if node.target is aten.pad.default:
            x, pad, mode, value = self.args(node, ("input", "pad", "mode", "value"), ("constant", None))
            if mode != "constant":
                raise self.fail(node, f"padding mode {mode!r} (only constant)")
        else:
            x, pad, value = self.args(node, ("input", "pad", "value"), (0.0,))
        src = self.buf(node, x)
        shape = self.shape_of(src)
        pad = list(pad)
        if len(pad) % 2 or len(pad) // 2 > len(shape) or any(p < 0 for p in pad):
            raise self.fail(node, f"padding {pad} (non-negative pairs over per-sample dims only)")
        pairs = [[0, 0] for _ in shape]
        for k in range(len(pad) // 2):  # F.pad lists the last dim first
            pairs[len(shape) - 1 - k] = [int(pad[2 * k]), int(pad[2 * k + 1])]
        if all(p == [0, 0] for p in pairs):
            return _Tensor(src)
        return self.emit({"op": "pad", "in": src, "pads": pairs, "value": float(value or 0.0), "name": node.name},
                         node)

    # --- attention, matmul, masks ------------------------------------------------------------------

    def sequence_first(self, node: fx.Node, v: Any) -> Optional[Tuple[int, int]]:
        """(buffer [seq, heads * dim], heads) when `v` is a [heads, seq, dim] transpose of a [seq, heads,
        dim] view of such a buffer, as attention code writes q/k/v; None otherwise."""
        if not (isinstance(v, _View) and v.shape is None and v.perm == (1, 0, 2)):
            return None
        seq, heads, dim = self.shape_of(v.buffer)
        if not isinstance(heads, int) or not isinstance(dim, int):
            return None
        b = self.new_buffer((seq, heads * dim), f"{node.name}_rows", alias_of=v.buffer)
        return b, heads

    @lowers(aten.scaled_dot_product_attention.default)
    def _sdpa(self, node: fx.Node) -> Any:
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = self.args(
            node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
            (None, 0.0, False, None, False))
        if dropout_p or enable_gqa:
            raise self.fail(node, "dropout_p != 0 or enable_gqa")
        head_dim = node.args[0].meta["val"].shape[-1]
        scale = 1.0 / math.sqrt(int(head_dim)) if scale is None else float(scale)
        op = {"op": "attention", "scale": scale, "causal": bool(is_causal), "name": node.name}
        if isinstance(mask, _Param):
            if mask.tensor.dtype == torch.bool and bool(mask.tensor.all()):
                mask = None  # every key allowed
            else:
                mask = _Tensor(self.constant_operand(node, node.args[3], mask.tensor.float()
                                                     if mask.tensor.dtype == torch.bool else mask.tensor, 3))
                op["mask_kind"] = "bool" if node.args[3].meta["val"].dtype == torch.bool else "additive"
        elif mask is not None:
            op["mask_kind"] = "bool" if node.args[3].meta["val"].dtype == torch.bool else "additive"
        if mask is not None:
            op["mask"] = mask.buffer if isinstance(mask, _View) and mask.perm is None else self.buf(node, mask, "mask")
        rows = [self.sequence_first(node, t) for t in (q, k, v)]
        if all(r is not None for r in rows) and len({r[1] for r in rows}) == 1:
            (bq, heads), (bk, _), (bv, _) = rows
            op.update({"q": bq, "k": bk, "v": bv, "layout": "sequence_first", "heads": heads})
            seq_q, dv = self.shape_of(bq)[0], self.shape_of(bv)[1]
            out = self.emit_shaped(op, (seq_q, dv), node.name)
            view = self.new_buffer((seq_q, heads, self.shape_of(v.buffer)[2]), f"{node.name}_heads", alias_of=out)
            return _View(view, (1, 0, 2))
        bq, bk, bv = (self.buf(node, t, n) for t, n in ((q, "query"), (k, "key"), (v, "value")))
        ranks = {len(self.shape_of(b)) for b in (bq, bk, bv)}
        if ranks == {2}:  # [batch, seq, dim]: one head
            bq, bk, bv = (self.reshape_to(node, b, (1,) + self.shape_of(b)).buffer for b in (bq, bk, bv))
        elif ranks != {3}:
            raise self.fail(node, "attention over inputs that are not [batch, heads, seq, dim] or [batch, seq, dim]")
        op.update({"q": bq, "k": bk, "v": bv, "layout": "heads_first", "heads": 1})
        out_shape = self.shape_of(bq)[:-1] + self.shape_of(bv)[-1:]
        out = self.emit_shaped(op, out_shape, node.name)
        return self.reshape_to(node, out, self.sample_shape(node))

    @lowers(aten.reciprocal.default)
    def _reciprocal(self, node: fx.Node) -> Any:
        raise self.fail(node, "a number divided by an activation")

    @lowers(aten.matmul.default, aten.bmm.default)
    def _matmul(self, node: fx.Node) -> Any:
        a, b = self.value(node.args[0]), self.value(node.args[1])
        if isinstance(b, _Param):
            if b.tensor.dim() != 2:
                raise self.fail(node, "a product with a constant that is not a 2-D matrix")
            return _Tensor(self.linear_layer(node, self.buf(node, a), b.tensor, None,
                                             self.layer_path(node, node.args[1]), transposed=True))
        ba = self.buf(node, a, "first operand")
        # b = y.transpose(-2, -1) of some layout y: read y with transpose_b instead of copying b
        # (only when y keeps the buffer's last axis last: its rows are then contiguous, as the GEMM reads them)
        transpose_b = isinstance(b, _View) and b.shape is None and b.perm is not None and len(b.perm) >= 2 \
            and b.perm[-2] == len(b.perm) - 1
        if transpose_b:
            inner = b.perm[:-2] + (b.perm[-1], b.perm[-2])
            y = _View(b.buffer, inner)
            bb = b.buffer if inner == tuple(range(len(inner))) else self.buf(node, y, "second operand")
        else:
            bb = self.buf(node, b, "second operand")
        sa, sb = self.shape_of(ba), self.shape_of(bb)
        if len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            raise self.fail(node, f"matmul of per-sample shapes {sa} and {sb} (no broadcasting)")
        return self.emit({"op": "matmul", "a": ba, "b": bb, "transpose_b": transpose_b, "scale": 1.0,
                          "name": node.name}, node)

    @lowers(aten.arange.default, aten.arange.start)
    def _arange(self, node: fx.Node) -> Any:
        args = self.value(node.args)
        if node.target is aten.arange.default and args == (_Size("batch"),) or \
                node.target is aten.arange.start and args == (0, _Size("batch")):
            return _Ramp(rank=1, axis=0)
        raise self.fail(node, "an arange over a size computed from the inputs")

    def ramp_reshape(self, node: fx.Node, ramp: _Ramp) -> _Ramp:
        shape = node.meta["val"].shape
        axes = [i for i, s in enumerate(shape) if self.is_batch(s)]
        if len(axes) != 1:
            raise self.fail(node, "reshaping the batch index")
        return _Ramp(rank=len(shape), axis=axes[0])

    @lowers(aten.index.Tensor)
    def _index(self, node: fx.Node) -> Any:
        """x[ramp(batch), ramp(n)...] with broadcast ramps, as mask code writes a view with new unit
        axes: an alias (the ramps must keep x's axes in order)."""
        x, indices = self.args(node, ("input", "indices"))
        src = self.buf(node, x, allow_ids=True)
        if len(indices) != len(self.shape_of(src)) + 1 or not isinstance(indices[0], _Ramp):
            raise self.fail(node, "advanced indexing (only the broadcast-ramp form of mask code)")
        positions = [indices[0].axis]
        for axis, idx in enumerate(indices[1:]):
            t = idx.tensor if isinstance(idx, _Param) else None
            n = self.shape_of(src)[axis]
            if t is None or t.dim() != indices[0].rank:
                raise self.fail(node, "advanced indexing with computed indices")
            nonunit = [i for i, s in enumerate(t.shape) if s != 1]
            flat = t.reshape(-1)
            want = self.at_max(n)
            if len(nonunit) != 1 or flat.numel() != want or not torch.equal(flat, torch.arange(want)):
                raise self.fail(node, "advanced indexing that is not a broadcast ramp")
            positions.append(nonunit[0])
        if positions != sorted(positions):
            raise self.fail(node, "advanced indexing that reorders axes")
        return self.reshape_to(node, src, self.sample_shape(node))
