"""The dependency analysis behind shrink(): which channels of which tensors are tied together.

Every channel of every traced tensor is a slot in a `ChannelTable` (a union-find). Ops that
carry channels through unchanged (activations, BatchNorm, pooling, depthwise convs) hand their
input's slots on; ops that combine tensors elementwise (residual adds, gates) merge the slots of
their operands, so coupled channels are kept or removed together; `cat` along the channel dim
concatenates slot lists and `flatten` repeats each slot once per flattened position. Convs and
Linears start fresh slots for their outputs (they are producers) and record the slots they read
(they are consumers).

Next to the slots, each tensor carries one number per channel: the constant value that channel
holds at every position and for every input, or NaN when it varies. A channel can be deleted
exactly when, wherever a consumer reads it, it is a known constant that the consumer's bias can
absorb (zero always can; a nonzero constant only where no zero padding cuts the kernel).
Channels that reach the model's outputs, come from its inputs, or pass through anything the
analysis cannot see into are pinned (always kept), with the reason recorded.
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune


class ShrinkError(ValueError):
    """shrink() cannot follow the model's data flow; the message names the node or layer."""


# ---------------------------------------------------------------------------------------------
# Slots


class ChannelTable:
    """Union-find over channel slots, with a reason for each slot that must be kept."""

    def __init__(self) -> None:
        self._parent: List[int] = []
        self._pins: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, n: int, pin: Optional[str] = None) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        ids = np.arange(start, start + n, dtype=np.int64)
        if pin is not None:
            self.pin(ids, pin)
        return ids

    def find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:  # the older slot stays the root
                self._parent[max(rx, ry)] = min(rx, ry)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(i) for i in ids.tolist()), dtype=np.int64, count=len(ids))

    def pin(self, ids: np.ndarray, reason: str) -> None:
        for i in ids.tolist():
            self._pins.setdefault(i, reason)

    def pinned_roots(self) -> Dict[int, str]:
        """root -> reason of its oldest pinned slot."""
        out: Dict[int, str] = {}
        for i in sorted(self._pins):
            out.setdefault(self.find(i), self._pins[i])
        return out


def nan_const(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.full((n,), float("nan"), dtype=dtype)


@dataclass
class Flow:
    """What the analysis knows about one traced tensor's channels.

    `cdim` is the channel dim, `slots[i]` the slot of channel i (flattened tensors repeat a slot
    once per position) and `const[i]` the value channel i holds everywhere, NaN if it varies.
    """

    cdim: int
    slots: np.ndarray
    const: Tensor

    def __post_init__(self) -> None:
        if self.const.shape != (len(self.slots),):
            raise ShrinkError(f"internal: {len(self.slots)} slots but {tuple(self.const.shape)} constants")


@dataclass
class Space:
    """One channel index space of a module: its inputs ("in"), outputs ("out") or both at once.

    `reads`: the module mixes these channels into its outputs, so removing one needs a constant
    here (`const`), which gets folded into the bias; `fold_nonzero`: a nonzero constant folds
    exactly (no zero padding cuts the kernel).
    """

    role: str
    slots: np.ndarray
    reads: bool = False
    const: Optional[Tensor] = None
    fold_nonzero: bool = False


@dataclass
class ModuleEntry:
    path: str
    module: nn.Module
    handler: object  # ShrinkHandler
    spaces: Dict[str, Space] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Helpers


def describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.name}' (module '{node.target}')"
    if node.op == "call_method":
        return f"'{node.name}' (method .{node.target}())"
    if node.op == "call_function":
        target = node.target
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", repr(target))
        if mod in ("_operator", "operator"):
            mod = "operator"
        elif mod.startswith("torch._C"):
            mod = "torch"
        return f"'{node.name}' ({mod + '.' if mod else ''}{name})"
    return f"'{node.name}' ({node.op} {node.target})"


def norm_dim(d: int, nd: int, node: fx.Node) -> int:
    if not isinstance(d, int) or not -max(nd, 1) <= d < max(nd, 1):
        raise ShrinkError(f"node {describe(node)}: dim {d!r} out of range for a {nd}-d tensor")
    return d % max(nd, 1)


def has_own_hooks(module: nn.Module) -> bool:
    """Forward hooks other than torch's pruning reparametrisation (which the analysis reads)."""
    if module._forward_hooks:
        return True
    return any(not isinstance(h, torch_prune.BasePruningMethod) for h in module._forward_pre_hooks.values())


def apply_const(fn: Callable[..., Tensor], *consts: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Run `fn` on the known constants (NaN entries stay NaN, non-finite results become NaN)."""
    n = max(len(c) for c in consts)
    known = torch.ones(n, dtype=torch.bool)
    for c in consts:
        known = known & torch.isfinite(c)
    out_dtype = dtype if dtype is not None else consts[0].dtype
    if not out_dtype.is_floating_point:
        out_dtype = torch.float64
    if not bool(known.any()):
        return nan_const(n, out_dtype)
    vals = [torch.where(torch.isfinite(c), c, torch.zeros((), dtype=c.dtype)).clone() for c in consts]
    with torch.no_grad():
        out = fn(*vals)
    if not isinstance(out, Tensor) or out.shape != (n,):
        return nan_const(n, out_dtype)
    out = out.detach().to(out_dtype)
    return torch.where(known & torch.isfinite(out), out, torch.full((), float("nan"), dtype=out_dtype))


def _literal(x: object) -> bool:
    """No graph node anywhere inside x."""
    found = []
    fx.node.map_arg(x, lambda n: found.append(n))
    return not found


# ---------------------------------------------------------------------------------------------
# The analysis


class ShrinkContext:
    """Walks the traced graph once, giving every tensor a `Flow` and every module its spaces.

    Module handlers call `channels_of`, `register`, `pin` and `new_slots` from their `analyze`.
    """

    def __init__(self, gm: fx.GraphModule, unknown: str, handler_for: Callable[[nn.Module], object]) -> None:
        self.gm = gm
        self.unknown = unknown
        self._handler_for = handler_for
        self.table = ChannelTable()
        self.flows: Dict[fx.Node, Optional[Flow]] = {}
        self.entries: Dict[int, ModuleEntry] = {}
        self.notes: List[str] = []
        self._clobbered: Set[fx.Node] = set()
        self.roots: Dict[Tuple[int, str], np.ndarray] = {}  # (id(module), role) -> slot roots, after run()
        self.snapshots: List[tuple] = []  # module states before the cut, to restore on failure
        # id(module) -> the BatchNorm that alone reads its output (None: several readers or calls)
        self.bias_sinks: Dict[int, Optional[nn.Module]] = {}
        self._calls: Dict[int, int] = {}

    # -- tensor facts from shape propagation ---------------------------------------------------

    @staticmethod
    def tensor_meta(node: object):
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return meta if meta is not None and hasattr(meta, "shape") else None

    def shape(self, node: fx.Node) -> Tuple[int, ...]:
        meta = self.tensor_meta(node)
        if meta is None:
            raise ShrinkError(f"node {describe(node)} does not produce a single tensor")
        return tuple(int(s) for s in meta.shape)

    def dtype(self, node: fx.Node) -> torch.dtype:
        meta = self.tensor_meta(node)
        dt = meta.dtype if meta is not None else torch.float32
        return dt if dt.is_floating_point else torch.float64

    def flow(self, arg: object) -> Optional[Flow]:
        return self.flows.get(arg) if isinstance(arg, fx.Node) else None

    # -- API for handlers --------------------------------------------------------------------------

    def new_slots(self, n: int, pin: Optional[str] = None) -> np.ndarray:
        return self.table.new(n, pin)

    def pin(self, slots: np.ndarray, reason: str) -> None:
        self.table.pin(slots, reason)

    def untracked_source(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"model input '{node.target}'"
        if node.op == "get_attr":
            return f"tensor attribute '{node.target}'"
        return f"node {describe(node)}, whose channels are not followed"

    def channels_of(self, arg: object, node: fx.Node, cdim: int, who: str) -> Flow:
        """The flow of tensor `arg` with its channels on `cdim` (negative counts from the end).

        An untracked tensor gets fresh slots, pinned: its channels come from somewhere that
        cannot shrink (a model input, an unknown op).
        """
        if not isinstance(arg, fx.Node):
            raise ShrinkError(f"{who}: node {describe(node)} takes a non-tensor input {arg!r}")
        shape = self.shape(arg)
        cdim = norm_dim(cdim, len(shape), node)
        f = self.flow(arg)
        if f is None:
            n = shape[cdim]
            return Flow(cdim, self.table.new(n, pin=f"comes from {self.untracked_source(arg)}"),
                        nan_const(n, self.dtype(arg)))
        if f.cdim != cdim:
            raise ShrinkError(
                f"{who} (node {describe(node)}) reads channels on dim {cdim} of '{arg.name}', but the "
                f"channels there are on dim {f.cdim}"
            )
        return f

    def register(
        self,
        module: nn.Module,
        path: str,
        role: str,
        slots: np.ndarray,
        *,
        reads: bool = False,
        const: Optional[Tensor] = None,
        fold_nonzero: bool = False,
    ) -> np.ndarray:
        """Record that `module`'s index space `role` holds channels `slots`; returns the slots to use.

        A module called at several places is cut once, so the slots of every call are merged (and
        a constant it reads counts only where all calls read the same one).
        """
        entry = self.entries.get(id(module))
        if entry is None:
            entry = self.entries[id(module)] = ModuleEntry(path, module, self._handler_for(module))
        space = entry.spaces.get(role)
        const = None if const is None else const.detach().clone()
        if space is None:
            entry.spaces[role] = Space(role, slots, reads, const, fold_nonzero)
            return slots
        if len(space.slots) != len(slots):
            raise ShrinkError(f"module '{path}' is called with {len(slots)} and {len(space.slots)} channels")
        self.table.union(space.slots, slots)
        if space.const is not None and const is not None:
            same = space.const == const.to(space.const.dtype)
            space.const = torch.where(same, space.const, torch.full((), float("nan"), dtype=space.const.dtype))
        space.reads = space.reads or reads
        space.fold_nonzero = space.fold_nonzero and fold_nonzero
        return space.slots

    def keep_through(self, node: fx.Node, reason: str) -> None:
        """Pin every tracked input of `node` (its output is untracked)."""
        for n in node.all_input_nodes:
            f = self.flow(n)
            if f is not None:
                self.pin(f.slots, reason)

    # -- the walk --------------------------------------------------------------------------------

    def run(self) -> None:
        self._find_clobbered()
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                key = id(self.gm.get_submodule(node.target))
                self._calls[key] = self._calls.get(key, 0) + 1
        for node in self.gm.graph.nodes:
            try:
                flow = self._visit(node)
            except ShrinkError:
                raise
            except Exception as e:  # a handler tripped over something it did not expect
                raise ShrinkError(f"cannot analyse node {describe(node)}: {type(e).__name__}: {e}") from e
            if flow is not None:
                shape = self.shape(node)
                if not 0 <= flow.cdim < len(shape) or shape[flow.cdim] != len(flow.slots):
                    raise ShrinkError(f"internal: node {describe(node)} has shape {shape} but {len(flow.slots)} "
                                      f"tracked channels on dim {flow.cdim}")
                if node in self._clobbered:  # an in-place op changes it later: its values are unknown
                    flow = Flow(flow.cdim, flow.slots, nan_const(len(flow.slots), flow.const.dtype))
            self.flows[node] = flow
        self._pin_direct_reads()

    def _visit(self, node: fx.Node) -> Optional[Flow]:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.keep_through(node, "reaches the model output")
            return None
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            handler = self._handler_for(module)
            kind = type(module).__name__
            if handler is None or has_own_hooks(module) or parametrize.is_parametrized(module):
                why = ("has no shrink handler" if handler is None else
                       "has forward hooks" if has_own_hooks(module) else "has parametrizations")
                if any(self.flow(n) is not None for n in node.all_input_nodes):
                    self.notes.append(f"kept every channel flowing into '{node.target}' ({kind}): it {why}")
                self.keep_through(node, f"flows into '{node.target}' ({kind}), which {why}")
                return None
            flow = handler.analyze(self, node, module, str(node.target))
            self._note_bias_sink(node, module)
            return flow
        if not any(self.flow(n) is not None for n in node.all_input_nodes):
            return None  # nothing tracked flows in
        rule = _rule_for(node)
        if rule is None:
            if self.unknown == "keep":
                self.notes.append(f"kept every channel flowing into node {describe(node)}: unknown op")
                self.keep_through(node, f"flows into node {describe(node)}, an op shrink() does not know")
                return None
            raise ShrinkError(
                f"cannot follow channels through node {describe(node)}: shrink() does not know how this op "
                "moves channels; rewrite it with supported ops, make its module a leaf (leaf_modules=...), "
                "or pass unknown='keep' to keep every channel flowing into it"
            )
        return rule(self, node)

    def _note_bias_sink(self, node: fx.Node, module: nn.Module) -> None:
        """A bias-free layer read only by a BatchNorm can fold constants into that BatchNorm's
        running mean (BN(x + d) with mean m is BN(x) with mean m - d) instead of growing a bias."""
        sink = None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and tuple(users[0].args) == (node,):
            bn = self.gm.get_submodule(users[0].target)
            if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
                    and self._calls.get(id(bn)) == 1 and not has_own_hooks(bn)):
                sink = bn
        if id(module) in self.bias_sinks or self._calls.get(id(module), 0) != 1:
            sink = None
        self.bias_sinks[id(module)] = sink

    def _find_clobbered(self) -> None:
        """Nodes that an in-place op overwrites while later nodes still read them."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for node in self.gm.graph.nodes:
            target = self._mutated_arg(node)
            if isinstance(target, fx.Node) and any(order[u] > order[node] for u in target.users if u is not node):
                self._clobbered.add(target)

    def _mutated_arg(self, node: fx.Node) -> Optional[object]:
        if not node.args:
            return None
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            return node.args[0] if getattr(module, "inplace", False) is True else None
        if node.op == "call_method":
            name = str(node.target)
            return node.args[0] if name.endswith("_") and not name.endswith("__") else None
        if node.op == "call_function":
            if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
                return node.args[0]
            name = getattr(node.target, "__name__", "")
            if name.endswith("_") and not name.endswith("__"):
                return node.args[0]
            if node.kwargs.get("inplace") is True:
                return node.args[0]
            try:
                pair = fx.operator_schemas.normalize_function(
                    node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
            except Exception:
                pair = None
            if pair is not None and pair.kwargs.get("inplace") is True:
                return node.args[0]
        return None

    def _pin_direct_reads(self) -> None:
        """Modules whose parameters the graph also reads directly, or that share parameters with
        another module, must keep their shapes."""
        by_path = {e.path: e for e in self.entries.values()}
        for node in self.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            owner = str(node.target).rpartition(".")[0]
            while True:
                entry = by_path.get(owner)
                if entry is not None:
                    self._pin_entry(entry, f"'{node.target}' is read directly by node '{node.name}'")
                if not owner:
                    break
                owner = owner.rpartition(".")[0]
        owners: Dict[int, Set[int]] = {}
        for m in self.gm.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), set()).add(id(m))
        for entry in self.entries.values():
            for name, p in entry.module._parameters.items():
                if p is not None and len(owners.get(id(p), ())) > 1:
                    self._pin_entry(entry, f"'{entry.path}.{name}' is shared with another module")

    def _pin_entry(self, entry: ModuleEntry, reason: str) -> None:
        for space in entry.spaces.values():
            self.pin(space.slots, reason)


# ---------------------------------------------------------------------------------------------
# Rules for functions and methods. Each takes (ctx, node) and returns the node's Flow (or None).

Rule = Callable[[ShrinkContext, fx.Node], Optional[Flow]]


def _self_and_rest(node: fx.Node) -> Tuple[object, tuple, dict]:
    if node.args:
        return node.args[0], tuple(node.args[1:]), dict(node.kwargs)
    kwargs = dict(node.kwargs)
    x = kwargs.pop("input", kwargs.pop("self", None))
    return x, (), kwargs


def _tracked_self(ctx: ShrinkContext, node: fx.Node, allow_values: bool = False) -> Tuple[fx.Node, Flow, tuple, dict]:
    """(input, its flow, other args, kwargs). The other args must be literals, or with
    `allow_values` traced non-tensors (sizes), never traced tensors."""
    x, rest, kwargs = _self_and_rest(node)
    f = ctx.flow(x)
    others: List[fx.Node] = []
    fx.node.map_arg((rest, kwargs), others.append)
    if f is None or any(not allow_values or ctx.tensor_meta(n) is not None or ctx.flow(n) is not None for n in others):
        raise ShrinkError(
            f"cannot follow channels through node {describe(node)}: only its first argument may be a "
            "traced tensor")
    return x, f, rest, kwargs  # type: ignore[return-value]


def _call(node: fx.Node, x: Tensor, rest: tuple, kwargs: dict) -> Tensor:
    if node.op == "call_method":
        return getattr(x, str(node.target))(*rest, **kwargs)
    return node.target(x, *rest, **kwargs)  # type: ignore[operator]


def _unary(ctx: ShrinkContext, node: fx.Node) -> Flow:
    """Elementwise: channels unchanged, constants mapped through the op itself."""
    x, f, rest, kwargs = _tracked_self(ctx, node)
    const = apply_const(lambda c: _call(node, c, rest, kwargs), f.const, dtype=ctx.dtype(node))
    return Flow(f.cdim, f.slots, const)


def _identity(ctx: ShrinkContext, node: fx.Node) -> Flow:
    """Channels and values unchanged (dropout counts as in eval mode)."""
    x, f, rest, kwargs = _tracked_self(ctx, node)
    return Flow(f.cdim, f.slots, f.const.to(ctx.dtype(node)))


def _binary(ctx: ShrinkContext, node: fx.Node) -> Flow:
    """Elementwise op of two operands: the channels of tracked operands are merged."""
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for key in ("input", "other"):
        if key in kwargs and len(args) < 2:
            args.append(kwargs.pop(key))
    if len(args) < 2:
        raise ShrinkError(f"node {describe(node)}: expected two operands")
    a, b = args[0], args[1]
    rest = tuple(args[2:])
    if not _literal(rest) or not _literal(kwargs):
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: extra traced arguments")
    out_nd = len(ctx.shape(node))
    operands = []
    for arg in (a, b):
        f = ctx.flow(arg)
        meta = ctx.tensor_meta(arg)
        if f is not None:
            operands.append(("flow", arg, f, f.cdim + out_nd - len(ctx.shape(arg))))
        elif meta is not None:
            operands.append(("tensor", arg, None, None))
        elif isinstance(arg, fx.Node):
            operands.append(("value", arg, None, None))  # a traced non-tensor (e.g. from .size())
        else:
            operands.append(("literal", arg, None, None))
    tracked = [o for o in operands if o[0] == "flow"]
    cdim = tracked[0][3]
    if any(o[3] != cdim for o in tracked):
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: the operands carry "
                          "channels on different dims")
    n = max(len(o[2].slots) for o in tracked)
    dtype = ctx.dtype(node)
    consts = []
    slots = None
    for kind, arg, f, _ in operands:
        if kind == "flow":
            if len(f.slots) == n:
                if slots is None:
                    slots = f.slots
                else:
                    ctx.table.union(slots, f.slots)
            elif len(f.slots) == 1:
                ctx.pin(f.slots, f"is broadcast across {n} channels in node {describe(node)}")
            else:
                raise ShrinkError(f"node {describe(node)}: operands with {len(f.slots)} and {n} channels")
            consts.append(f.const)
        elif kind == "tensor":
            shape = ctx.shape(arg)
            idx = cdim - (out_nd - len(shape))
            if idx >= 0 and shape[idx] != 1:
                for o in tracked:
                    ctx.pin(o[2].slots, f"is combined with per-channel tensor '{arg.name}' in node {describe(node)}")
            consts.append(nan_const(1, dtype))
        elif kind == "value":
            consts.append(nan_const(1, dtype))
        else:
            consts.append(None)
    if slots is None:
        raise ShrinkError(f"internal: no operand of node {describe(node)} carries all {n} channels")
    tensors = [c for c in consts if c is not None]

    def op(*vals: Tensor) -> Tensor:
        it = iter(vals)
        full = [next(it) if c is not None else arg for c, (_, arg, _, _) in zip(consts, operands)]
        if node.op == "call_method":
            return getattr(full[0], str(node.target))(full[1], *rest, **kwargs)
        return node.target(full[0], full[1], *rest, **kwargs)  # type: ignore[operator]

    tensors = [c.expand(n) if len(c) == 1 else c for c in tensors]
    const = apply_const(op, *tensors, dtype=dtype)
    if _is_mul(node):  # zero times anything (finite) is zero: a zeroed channel stays zero through a gate
        for c in tensors:
            const = torch.where(c == 0, torch.zeros((), dtype=dtype), const)
    return Flow(cdim, slots, const)


def _is_mul(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("mul", "mul_")
    return node.target in (operator.mul, operator.imul, torch.mul, torch.multiply)


def _getitem(ctx: ShrinkContext, node: fx.Node) -> Flow:
    """Basic indexing that leaves the channel dim whole: None, ..., ints and slices elsewhere."""
    x = node.args[0]
    f = ctx.flow(x)
    idx = node.args[1] if len(node.args) > 1 else None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if f is None or not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items) or not all(
        _literal(i.start) and _literal(i.stop) and _literal(i.step) for i in items if isinstance(i, slice)
    ):
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: only basic indexing with "
                          "None, ..., ints and slices is followed")
    nd = len(ctx.shape(x))
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if sum(1 for i in items if i is Ellipsis) > 1 or consumed > nd:
        raise ShrinkError(f"node {describe(node)}: cannot read its index")
    in_pos = out_pos = 0
    new_cdim = None
    for i in items:
        if i is None:
            out_pos += 1
        elif i is Ellipsis:
            k = nd - consumed
            if in_pos <= f.cdim < in_pos + k:
                new_cdim = out_pos + f.cdim - in_pos
            in_pos, out_pos = in_pos + k, out_pos + k
        else:
            if in_pos == f.cdim:
                if not (isinstance(i, slice) and i == slice(None)):
                    raise ShrinkError(f"cannot follow channels through node {describe(node)}: it indexes the "
                                      "channel dim")
                new_cdim = out_pos
            in_pos += 1
            out_pos += 0 if isinstance(i, int) else 1
    if new_cdim is None:
        new_cdim = out_pos + f.cdim - in_pos
    return Flow(new_cdim, f.slots, f.const.to(ctx.dtype(node)))


def _cat(ctx: ShrinkContext, node: fx.Node) -> Flow:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: needs a list of tensors and an int dim")
    nd = len(ctx.shape(node))
    dim = norm_dim(dim, nd, node)
    cdims = {ctx.flow(t).cdim for t in tensors if ctx.flow(t) is not None}  # type: ignore[union-attr]
    if len(cdims) != 1:
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: inputs carry channels on different dims")
    cdim = cdims.pop()
    flows = [ctx.channels_of(t, node, cdim, f"torch.cat {describe(node)}") for t in tensors]
    dtype = ctx.dtype(node)
    if dim == cdim:
        return Flow(cdim, np.concatenate([f.slots for f in flows]), torch.cat([f.const.to(dtype) for f in flows]))
    first = flows[0]
    const = first.const.to(dtype)
    for f in flows[1:]:
        ctx.table.union(first.slots, f.slots)
        same = const == f.const.to(dtype)
        const = torch.where(same, const, torch.full((), float("nan"), dtype=dtype))
    return Flow(cdim, first.slots, const)


def flatten_flow(ctx: ShrinkContext, node: fx.Node, x: fx.Node, f: Flow, start: int, end: int) -> Flow:
    shape = ctx.shape(x)
    nd = len(shape)
    if nd == 0:
        return f
    start, end = norm_dim(start, nd, node), norm_dim(end, nd, node)
    if start > end:
        raise ShrinkError(f"node {describe(node)}: flatten start_dim {start} > end_dim {end}")
    if f.cdim < start:
        return f
    if f.cdim > end:
        return Flow(f.cdim - (end - start), f.slots, f.const)
    if start == 0 and f.cdim != 0:
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: it flattens the batch dim "
                          "into the channels")
    outer = math.prod(shape[start:f.cdim])
    inner = math.prod(shape[f.cdim + 1:end + 1])
    slots = np.tile(np.repeat(f.slots, inner), outer)
    const = f.const.repeat_interleave(inner).repeat(outer)
    return Flow(start, slots, const)


def _flatten(ctx: ShrinkContext, node: fx.Node) -> Flow:
    x, f, rest, kwargs = _tracked_self(ctx, node)
    start = rest[0] if rest else kwargs.get("start_dim", 0)
    end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
    return flatten_flow(ctx, node, x, f, start, end)


def _shape_spec(node: fx.Node, rest: tuple, kwargs: dict) -> Optional[list]:
    spec: object = None
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        spec = rest[0]
    elif len(rest) == 1 and isinstance(rest[0], fx.Node):
        return None  # a traced shape: its entries cannot be inspected
    elif rest:
        spec = rest
    else:
        spec = kwargs.get("shape", kwargs.get("size"))
    return list(spec) if isinstance(spec, (list, tuple)) else None


def _reshape(ctx: ShrinkContext, node: fx.Node) -> Flow:
    """view/reshape: allowed when it keeps the channel dim whole or flattens it with its
    neighbours (the layout flatten gives); a literal channel count in the target shape pins the
    channels (shrinking would break that shape)."""
    x, f, rest, kwargs = _reshape_args(ctx, node)
    ins, outs = ctx.shape(x), ctx.shape(node)
    c = f.cdim
    nd = len(ins)
    tail = nd - c  # dims from the channel dim to the end
    if outs == ins or outs[:c + 1] == ins[:c + 1]:
        out_flow, pos = Flow(c, f.slots, f.const), c
    elif len(outs) >= tail and outs[len(outs) - tail:] == ins[c:]:
        pos = len(outs) - tail
        out_flow = Flow(pos, f.slots, f.const)
    else:
        match = None
        for s in list(range(1, c + 1)) + [0]:
            for e in range(c, nd):
                if (s, e) != (c, c) and outs == ins[:s] + (math.prod(ins[s:e + 1]),) + ins[e + 1:]:
                    match = (s, e)
                    break
            if match:
                break
        if match is None:
            raise ShrinkError(
                f"cannot follow channels through node {describe(node)}: reshaping {list(ins)} to {list(outs)} "
                f"splits or mixes the channel dim {c}")
        out_flow, pos = flatten_flow(ctx, node, x, f, match[0], match[1]), match[0]
    spec = _shape_spec(node, rest, kwargs)
    if spec is None:
        ctx.pin(f.slots, f"node {describe(node)} reshapes to a traced shape")
    elif len(spec) == len(outs) and isinstance(spec[pos], int) and spec[pos] != -1:
        ctx.pin(f.slots, f"node {describe(node)} hardcodes {spec[pos]} channels in its shape")
    return out_flow


def _reshape_args(ctx: ShrinkContext, node: fx.Node):
    x, rest, kwargs = _self_and_rest(node)
    f = ctx.flow(x)
    if f is None:
        raise ShrinkError(f"cannot follow channels through node {describe(node)}")
    return x, f, rest, kwargs


def _dims_arg(rest: tuple, kwargs: dict, key: str):
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if rest:
        return list(rest)
    v = kwargs.get(key)
    return list(v) if isinstance(v, (list, tuple)) else v


def _permute(ctx: ShrinkContext, node: fx.Node) -> Flow:
    x, f, rest, kwargs = _tracked_self(ctx, node)
    nd = len(ctx.shape(x))
    dims = _dims_arg(rest, kwargs, "dims")
    if not isinstance(dims, list) or len(dims) != nd:
        raise ShrinkError(f"node {describe(node)}: cannot read its permutation")
    dims = [norm_dim(d, nd, node) for d in dims]
    return Flow(dims.index(f.cdim), f.slots, f.const)


def _transpose(ctx: ShrinkContext, node: fx.Node) -> Flow:
    x, f, rest, kwargs = _tracked_self(ctx, node)
    nd = len(ctx.shape(x))
    d0 = rest[0] if rest else kwargs.get("dim0")
    d1 = rest[1] if len(rest) > 1 else kwargs.get("dim1")
    d0, d1 = norm_dim(d0, nd, node), norm_dim(d1, nd, node)
    c = d1 if f.cdim == d0 else d0 if f.cdim == d1 else f.cdim
    return Flow(c, f.slots, f.const)


def _unsqueeze(ctx: ShrinkContext, node: fx.Node) -> Flow:
    x, f, rest, kwargs = _tracked_self(ctx, node)
    d = rest[0] if rest else kwargs.get("dim")
    d = norm_dim(d, len(ctx.shape(node)), node)
    return Flow(f.cdim + (1 if d <= f.cdim else 0), f.slots, f.const)


def _squeeze(ctx: ShrinkContext, node: fx.Node) -> Flow:
    x, f, rest, kwargs = _tracked_self(ctx, node)
    d = rest[0] if rest else kwargs.get("dim")
    if d is None:
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: squeeze() without a dim "
                          "may drop the channel dim")
    dims = [d] if isinstance(d, int) else list(d)
    shape = ctx.shape(x)
    dims = [norm_dim(i, len(shape), node) for i in dims]
    if f.cdim in dims:
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: it squeezes the channel dim")
    removed = sum(1 for i in dims if i < f.cdim and shape[i] == 1)
    return Flow(f.cdim - removed, f.slots, f.const)


def _reduce(ctx: ShrinkContext, node: fx.Node) -> Flow:
    """mean/sum/amax/amin over dims other than the channel dim."""
    x, f, rest, kwargs = _tracked_self(ctx, node)
    shape = ctx.shape(x)
    dims = rest[0] if rest else kwargs.get("dim")
    keepdim = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: it reduces over the channels")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [norm_dim(d, len(shape), node) for d in dims]
    if f.cdim in dims:
        raise ShrinkError(f"cannot follow channels through node {describe(node)}: it reduces over the channel dim")
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    const = f.const.to(ctx.dtype(node))
    if name == "sum":
        const = const * math.prod(shape[d] for d in dims)
    cdim = f.cdim if keepdim else f.cdim - sum(1 for d in dims if d < f.cdim)
    return Flow(cdim, f.slots, const)


def _spatial(preserves_constants: bool) -> Rule:
    """Pooling/resampling along the dims after the channel dim (N, C, *spatial)."""

    def rule(ctx: ShrinkContext, node: fx.Node) -> Flow:
        x, f, rest, kwargs = _tracked_self(ctx, node, allow_values=True)
        if f.cdim != 1 or ctx.tensor_meta(node) is None:
            raise ShrinkError(f"cannot follow channels through node {describe(node)}: expects channels on dim 1 "
                              "and one tensor out")
        const = f.const.to(ctx.dtype(node))
        if not preserves_constants:  # zero padding / partial windows change nonzero constants at borders
            const = torch.where(const == 0, const, torch.full((), float("nan"), dtype=const.dtype))
        return Flow(1, f.slots, const)

    return rule


def _metadata(ctx: ShrinkContext, node: fx.Node) -> None:
    return None


_FUNCTION_RULES: Dict[object, Rule] = {}
_METHOD_RULES: Dict[str, Rule] = {}


def _add(rules: Dict, keys, rule: Rule) -> None:
    for k in keys:
        if k is not None:
            rules[k] = rule


_UNARY_FUNCS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh,
    F.softsign, F.logsigmoid, F.tanhshrink, F.hardshrink, F.softshrink, torch.clamp, torch.clip,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "float", "double", "half", "bfloat16", "to",
]
_IDENTITY_FUNCS = [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout]
_IDENTITY_METHODS = ["contiguous", "clone", "detach"]
_BINARY_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
    torch.true_divide, torch.maximum, torch.minimum,
]
_BINARY_METHODS = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"]

_add(_FUNCTION_RULES, _UNARY_FUNCS, _unary)
_add(_METHOD_RULES, _UNARY_METHODS, _unary)
_add(_FUNCTION_RULES, _IDENTITY_FUNCS, _identity)
_add(_METHOD_RULES, _IDENTITY_METHODS, _identity)
_add(_FUNCTION_RULES, _BINARY_FUNCS, _binary)
_add(_METHOD_RULES, _BINARY_METHODS, _binary)
_add(_FUNCTION_RULES, [torch.cat, getattr(torch, "concat", None), getattr(torch, "concatenate", None)], _cat)
_add(_FUNCTION_RULES, [torch.flatten], _flatten)
_add(_METHOD_RULES, ["flatten"], _flatten)
_add(_FUNCTION_RULES, [torch.reshape], _reshape)
_add(_METHOD_RULES, ["view", "reshape"], _reshape)
_add(_FUNCTION_RULES, [torch.permute], _permute)
_add(_METHOD_RULES, ["permute"], _permute)
_add(_FUNCTION_RULES, [torch.transpose], _transpose)
_add(_METHOD_RULES, ["transpose"], _transpose)
_add(_FUNCTION_RULES, [torch.unsqueeze], _unsqueeze)
_add(_METHOD_RULES, ["unsqueeze"], _unsqueeze)
_add(_FUNCTION_RULES, [torch.squeeze], _squeeze)
_add(_METHOD_RULES, ["squeeze"], _squeeze)
_add(_FUNCTION_RULES, [torch.mean, torch.sum, torch.amax, torch.amin], _reduce)
_add(_METHOD_RULES, ["mean", "sum", "amax", "amin"], _reduce)
_add(_FUNCTION_RULES, [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
], _spatial(True))
_add(_FUNCTION_RULES, [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d], _spatial(False))
_add(_METHOD_RULES, ["size", "dim", "numel"], _metadata)
_add(_FUNCTION_RULES, [builtins.len], _metadata)
_add(_FUNCTION_RULES, [operator.getitem], _getitem)
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device"}


def _rule_for(node: fx.Node) -> Optional[Rule]:
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target))
    if node.op == "call_function":
        if node.target is builtins.getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS:
            return _metadata
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None
