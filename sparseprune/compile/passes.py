"""Passes over the lowered op list: fuse activations and shortcut adds into the ops producing
their inputs, drop dead ops, and compact the buffer table."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence


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
            if (prod is not None and prod["op"] in ("linear", "conv2d", "add", "sub", "mul", "div", "affine")
                    and prod.get("activation") is None
                    and readers.get(src) == 1 and src not in aliased and src not in outputs
                    and buffers[src]["alias_of"] is None):
                prod["activation"] = op["kind"]
                prod["out"] = op["out"]
                producer[op["out"]] = prod
                continue
        kept.append(op)
    return kept


_READ_KEYS = ("in", "a", "b", "q", "k", "v", "residual", "key_mask", "mask")  # (slice reads "in")


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
