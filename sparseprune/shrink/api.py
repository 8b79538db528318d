"""shrink(): delete removed channels and units for good, returning a smaller dense model."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from sparseprune.model_copy import deepcopy_model
from sparseprune.prune.reparam import remove
from sparseprune.shrink.graph import ModuleEntry, ShrinkContext, ShrinkError
from sparseprune.shrink.handlers import handler_for, registered_types
from sparseprune.shrink.report import KeptChannels, LayerShrink, ShrinkReport

UNKNOWN = ("error", "keep")


def shrink(
    model: nn.Module,
    example_inputs: Union[Tensor, Sequence[object]],
    *,
    inplace: bool = False,
    unknown: str = "error",
    leaf_modules: Union[Type[nn.Module], Sequence[Type[nn.Module]]] = (),
    verify: bool = True,
) -> nn.Module:
    """Physically delete the channels and units that pruning made constant; returns the model.

    The model is traced with torch.fx and run once on `example_inputs` (a tensor or a tuple of
    positional inputs) to learn every tensor's shape. A channel goes when, everywhere a Conv or
    Linear reads it, it holds a known constant: a zero constant is simply dropped, a nonzero one
    is folded into the reader's bias (exact for Linear and for convs without zero padding; before
    a zero-padded conv the channel stays, since the border outputs would change). A bias-free
    reader followed only by a BatchNorm folds into that BatchNorm's running mean instead, so no
    bias appears. A channel whose weights are all zero is such a constant: its bias, through
    BatchNorm (eval mode; a zero BatchNorm scale gives its shift whatever comes in) and the
    activation; a zero times a gate stays zero. Coupled channels (residual adds, gates) go only together, `torch.cat`
    concatenates channel ranges, flatten maps a channel to its H*W features, depthwise convs are
    cut with their input channels; grouped convs (1 < groups < in_channels) are kept whole.

    The model's inputs and outputs keep their shapes, and every layer keeps at least one
    channel. Modules without a shrink handler (LayerNorm, attention, transposed convs, ...) keep
    every channel flowing into them; an op the analysis cannot follow (a reshape that splits the
    channel dim, an unknown function) raises ShrinkError naming the node, unless
    `unknown="keep"`, which treats it like an unknown module. `leaf_modules` are module types to
    trace as opaque leaves (e.g. ones symbolic_trace cannot enter); they keep their channels.

    The result reproduces the model's eval-mode outputs (BatchNorm's running statistics, no
    dropout). Pruning masks are made permanent (sparseprune.prune.remove); with `inplace=False`
    (the default) that happens on a deep copy and `model` is left untouched. Cut layers get new
    Parameter objects (build the optimizer after shrinking). `verify` runs the result on
    `example_inputs` and, if its outputs differ from the original's, restores the layers and
    raises ShrinkError. The report (`ShrinkReport`) is attached as
    `result.sparseprune_shrink_report`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = _check_inputs(example_inputs)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if unknown not in UNKNOWN:
        raise ValueError(f"unknown must be one of {UNKNOWN}, got {unknown!r}")
    leaves = _check_leaves(leaf_modules)

    work = model if inplace else deepcopy_model(model)
    params_before = sum(p.numel() for p in work.parameters())
    gm = _trace(work, registered_types() + leaves)
    training = {m: m.training for m in work.modules()}
    try:
        work.eval()
        gm.eval()
        try:
            with torch.no_grad():
                reference = ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            raise ShrinkError(f"running {type(work).__name__} on example_inputs failed: {type(e).__name__}: {e}") from e
        ctx = ShrinkContext(gm, unknown, handler_for)
        ctx.run()
        removed, why = _decide(ctx)
        remove(work)  # masks permanent: the handlers cut plain parameters
        layers = _cut(ctx, removed)
        if verify:
            _verify(work, inputs, reference, ctx)
    finally:
        for m, flag in training.items():
            m.training = flag

    report = ShrinkReport(
        layers=layers,
        kept=_kept(ctx, removed, why),
        notes=list(dict.fromkeys(ctx.notes)),
        params_before=params_before,
        params_after=sum(p.numel() for p in work.parameters()),
    )
    work.sparseprune_shrink_report = report
    return work


# ---------------------------------------------------------------------------------------------


def _check_inputs(example_inputs: object) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a non-empty tuple of positional inputs, "
                    f"got {type(example_inputs).__name__}")


def _check_leaves(leaf_modules: object) -> Tuple[Type[nn.Module], ...]:
    types = (leaf_modules,) if isinstance(leaf_modules, type) else leaf_modules
    if not isinstance(types, (tuple, list)) or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in types
    ):
        raise TypeError(f"leaf_modules must be an nn.Module subclass or a sequence of them, got {leaf_modules!r}")
    return tuple(types)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Tuple[Type[nn.Module], ...]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, leaves: Tuple[Type[nn.Module], ...]) -> fx.GraphModule:
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise ShrinkError(
            f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e} (make the offending module a "
            "leaf with leaf_modules=..., its channels are then kept)"
        ) from e
    return fx.GraphModule(tracer.root, graph)


def _decide(ctx: ShrinkContext) -> Tuple[Set[int], Dict[int, str]]:
    """The roots of the channel groups to delete, and for the others why they stay."""
    table = ctx.table
    pinned = table.pinned_roots()
    uses: Dict[int, List[Tuple[ModuleEntry, int, float, bool]]] = {}
    every: Set[int] = set()
    ctx.roots = {}
    for entry in ctx.entries.values():
        for role, space in entry.spaces.items():
            roots = table.roots(space.slots)
            ctx.roots[(id(entry.module), role)] = roots
            every.update(roots.tolist())
            if space.reads:
                consts = space.const.tolist() if space.const is not None else [float("nan")] * len(roots)
                for r, c in zip(roots.tolist(), consts):
                    uses.setdefault(r, []).append((entry, r, c, space.fold_nonzero))
    removed: Set[int] = set()
    why: Dict[int, str] = {}
    for r in sorted(every):
        if r in pinned:
            why[r] = pinned[r]
            continue
        if r not in uses:
            why[r] = "is not read by any Conv or Linear"
            continue
        for entry, _, c, fold_nonzero in uses[r]:
            if not np.isfinite(c):
                why[r] = f"is not one constant where '{entry.path}' reads it"
                break
            if c != 0 and not fold_nonzero:
                why[r] = (f"holds a nonzero constant where zero-padded '{entry.path}' reads it (folding it into "
                          "the bias would be wrong at the borders)")
                break
        else:
            removed.add(r)
    changed = True
    while changed:  # never leave a layer without channels
        changed = False
        for entry in ctx.entries.values():
            for role in entry.spaces:
                roots = ctx.roots[(id(entry.module), role)]
                if len(roots) and all(r in removed for r in roots.tolist()):
                    r = int(roots[0])
                    removed.discard(r)
                    why[r] = f"is kept so that '{entry.path}' keeps at least one channel"
                    changed = True
    return removed, why


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def _cut(ctx: ShrinkContext, removed: Set[int]) -> List[LayerShrink]:
    layers: List[LayerShrink] = []
    # every module first: a layer's fold may shift the running mean of the BatchNorm after it
    snapshots = [_snapshot(entry.module) for entry in ctx.entries.values()]
    try:
        for entry in ctx.entries.values():
            m = entry.module
            keep: Dict[str, Tensor] = {}
            fold: Dict[str, Tensor] = {}
            folded = 0
            for role, space in entry.spaces.items():
                roots = ctx.roots[(id(m), role)]
                gone = np.fromiter((r in removed for r in roots.tolist()), dtype=bool, count=len(roots))
                keep[role] = torch.from_numpy(np.flatnonzero(~gone)).long()
                if space.reads and space.const is not None:
                    mask = torch.from_numpy(gone)
                    fold[role] = torch.where(mask, space.const, torch.zeros((), dtype=space.const.dtype))
                    folded += int(((fold[role] != 0) & mask).sum())
            spaces = entry.spaces
            ins = spaces.get("in", spaces.get("channels"))
            outs = spaces.get("out", spaces.get("channels"))
            in_role = "in" if "in" in spaces else "channels"
            out_role = "out" if "out" in spaces else "channels"
            before = _own_params(m)
            changed = any(len(k) != len(spaces[r].slots) for r, k in keep.items()) or folded
            if changed:
                sink = ctx.bias_sinks.get(id(m))
                if sink is None:
                    entry.handler.apply(m, keep, fold)
                else:
                    entry.handler.apply(m, keep, fold, bias_sink=sink)
            layers.append(LayerShrink(
                path=entry.path,
                layer_type=type(m).__name__,
                in_before=len(ins.slots) if ins is not None else None,
                in_after=len(keep[in_role]) if ins is not None else None,
                out_before=len(outs.slots) if outs is not None else None,
                out_after=len(keep[out_role]) if outs is not None else None,
                params_before=before,
                params_after=_own_params(m),
                folded=folded,
            ))
    except Exception:
        for snap in reversed(snapshots):
            _restore(*snap)
        raise
    ctx.snapshots = snapshots
    return layers


def _snapshot(m: nn.Module):
    attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")}
    return m, dict(m._parameters), dict(m._buffers), attrs


def _restore(m: nn.Module, params: dict, buffers: dict, attrs: dict) -> None:
    m._parameters.clear()
    m._parameters.update(params)
    m._buffers.clear()
    m._buffers.update(buffers)
    m.__dict__.update(attrs)


def _leaves_of(x: object) -> List[object]:
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _leaves_of(item)]
    if isinstance(x, dict):
        return [y for k in sorted(x, key=repr) for y in [repr(k)] + _leaves_of(x[k])]
    return [x]


def _mismatch(reference: object, output: object) -> Optional[str]:
    ref, out = _leaves_of(reference), _leaves_of(output)
    if len(ref) != len(out):
        return f"{len(out)} outputs instead of {len(ref)}"
    for i, (a, b) in enumerate(zip(ref, out)):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return f"output {i} changed type"
        if not isinstance(a, Tensor):
            if a != b:
                return f"output {i} changed from {a!r} to {b!r}"
            continue
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} changed"
            continue
        if a.numel() == 0:
            continue
        a64, b64 = a.double(), b.double()
        rtol = 1e-3 if a.dtype in (torch.float32, torch.float64) else 5e-2
        err = float((a64 - b64).abs().max())
        scale = float(a64.abs().max())
        if not err <= rtol * scale + 1e-5:
            return f"output {i} differs by up to {err:.3g} (largest magnitude {scale:.3g})"
    return None


def _verify(model: nn.Module, inputs: tuple, reference: object, ctx: ShrinkContext) -> None:
    try:
        with torch.no_grad():
            output = model(*inputs)
        problem = _mismatch(reference, output)
    except Exception as e:
        problem = f"running it failed: {type(e).__name__}: {e}"
    if problem is not None:
        for snap in reversed(ctx.snapshots):
            _restore(*snap)
        raise ShrinkError(
            f"the shrunk model does not reproduce the original on example_inputs ({problem}); its layers were "
            "restored. The forward probably depends on channel counts in a way the trace does not show."
        )


def _kept(ctx: ShrinkContext, removed: Set[int], why: Dict[int, str]) -> List[KeptChannels]:
    """Output channels that hold a constant where they are made, yet stay."""
    out: Dict[Tuple[str, str], List[int]] = {}
    for entry in ctx.entries.values():
        space = entry.spaces.get("out")
        if space is None or space.const is None:
            continue
        roots = ctx.roots[(id(entry.module), "out")]
        for pos, (r, c) in enumerate(zip(roots.tolist(), space.const.tolist())):
            if np.isfinite(c) and r not in removed:
                out.setdefault((entry.path, why.get(r, "")), []).append(pos)
    return [KeptChannels(path, chans, reason) for (path, reason), chans in out.items()]
