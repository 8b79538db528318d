"""The executable spec (version 1): checked in Python, field by field, before the native plan sees it.

A spec is a JSON object describing buffers (per-sample shapes; the batch dimension is implicit and
given by the inputs at run time), which buffers are inputs and outputs, and a list of ops over
them. Weights live in a flat dict of numpy arrays named `<weight>.<part>`.

validate() accepts a spec only when every field is known and well typed, every buffer id is in
range, every op's shapes agree, every array an op names exists with the right dtype, rank and
length, index arrays are monotone and in range, and every array is used by some op. Errors are
`SpecError` (a ValueError) naming the field, or TypeError for an array of the wrong dtype/type.
The native plan repeats the checks that guard memory (indices, lengths, shapes), so this layer
is for clear messages and for the rules that need the whole graph (read before write).

numpy only: this module must not import torch.
"""
from __future__ import annotations

import copy
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sparseprune.formats import BLOCK_SHAPES

SPEC_FORMAT = "sparseprune.executable"
SPEC_VERSION = 1

ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish")

# Limits shared with csrc/bindings/plan.cpp and csrc/kernels/plan.cpp (the native side refuses
# anything beyond them too).
MAX_RANK = 8
MAX_DIM = 1 << 31
MAX_PAIR = 1 << 20  # kernel/stride/padding/dilation entries
INT32_MAX = (1 << 31) - 1  # linear cols and conv taps per filter are stored as 32-bit offsets
# Per-sample float32 elements over all buffers that own storage (the plan keeps every buffer for
# the whole run). 2**28 floats = 1 GiB per sample: a ResNet-50 at 224x224 needs ~2.5e7 and a
# BERT-base encoder at sequence 512 ~1e8, so real models fit; a hostile file asking for more is
# refused at load instead of making the first run() allocate tens of GiB.
MAX_SAMPLE_ELEMENTS = 1 << 28

# Fields every op may carry besides its own: "op" and an optional "name" (the module path, for
# messages and reports; the native plan ignores it).
_COMMON_FIELDS = {"op", "name"}
# op -> (required fields, optional fields)
OP_FIELDS: Dict[str, Tuple[frozenset, frozenset]] = {
    "linear": (frozenset({"in", "out", "weight", "format", "block", "rows", "cols"}), frozenset({"activation"})),
    "conv2d": (
        frozenset({"in", "out", "weight", "in_channels", "out_channels", "kernel", "stride", "padding",
                   "dilation", "groups"}),
        frozenset({"activation"}),
    ),
    "activation": (frozenset({"kind", "in", "out"}), frozenset()),
    "add": (frozenset({"a", "b", "out"}), frozenset({"activation"})),
    "mul": (frozenset({"a", "b", "out"}), frozenset({"activation"})),
    "maxpool2d": (frozenset({"in", "out", "kernel", "stride", "padding"}), frozenset()),
    "avgpool2d": (frozenset({"in", "out", "kernel", "stride", "padding"}), frozenset()),
    "global_avgpool": (frozenset({"in", "out"}), frozenset()),
    "softmax": (frozenset({"in", "out"}), frozenset()),
    "layernorm": (frozenset({"in", "out", "weight", "eps"}), frozenset()),
}
_ELEMENTWISE = {"activation", "add", "mul"}
_TOP_FIELDS = {"format", "version", "buffers", "inputs", "outputs", "ops"}
_TOP_OPTIONAL = {"metadata"}  # free-form producer information (a JSON object); not executed
_BUFFER_FIELDS = {"shape"}
_BUFFER_OPTIONAL = {"alias_of", "name"}

_INDEX_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict = 2, 80, 80, 40, 6, 4


def _short(v: Any) -> str:
    """repr() of an untrusted value, bounded in length and depth."""
    return _REPR.repr(v)


class SpecError(ValueError):
    """An executable spec or its arrays are not valid; the message names the field."""


@dataclass(frozen=True)
class PlanLayout:
    """What validate() learned: per-sample shapes, storage roots and the canonical spec."""

    spec: Dict[str, Any]  # canonical: ints are Python ints, optional fields filled in
    shapes: Tuple[Tuple[int, ...], ...]
    roots: Tuple[int, ...]
    input_shapes: Tuple[Tuple[int, ...], ...]
    output_shapes: Tuple[Tuple[int, ...], ...]
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    used_arrays: frozenset


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_DIM) -> int:
    if not _is_int(v):
        raise SpecError(f"{where} must be an int, got {type(v).__name__}")
    v = int(v)
    if not lo <= v <= hi:
        raise SpecError(f"{where} = {_short(v)} is out of range [{lo}, {hi}]")
    return v


def _pair(v: Any, where: str, lo: int) -> List[int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise SpecError(f"{where} must be a list of 2 ints, got {_short(v)}")
    return [_int(x, f"{where}[{i}]", lo, MAX_PAIR) for i, x in enumerate(v)]


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise SpecError(f"{where} must be a string, got {type(v).__name__}")
    return v


def _activation(v: Any, where: str) -> Optional[str]:
    if v is None or v == "none":
        return None
    if not isinstance(v, str) or v not in ACTIVATIONS:
        raise SpecError(f"{where} must be null or one of {ACTIVATIONS}, got {_short(v)}")
    return v


def _check_fields(obj: Mapping, required, optional, where: str) -> None:
    missing = sorted(set(required) - set(obj))
    if missing:
        raise SpecError(f"{where} has no field {_short(missing[0])}")
    unknown = sorted(str(k) for k in set(obj) - set(required) - set(optional))
    if unknown:
        allowed = sorted(set(required) | set(optional))
        raise SpecError(f"{where} has unknown field {_short(unknown[0])} (allowed: {allowed})")


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class _Arrays:
    """Typed access to the weight arrays, remembering which ones the ops use."""

    def __init__(self, arrays: Mapping[str, Any]):
        if not isinstance(arrays, Mapping):
            raise TypeError(f"arrays must be a dict of numpy arrays, got {type(arrays).__name__}")
        for key in arrays:
            if not isinstance(key, str):
                raise TypeError(f"array names must be strings, got {_short(key)}")
        self.arrays = arrays
        self.used: set = set()

    def get(self, name: str, dtypes, what: str, required: bool = True) -> Optional[np.ndarray]:
        if name not in self.arrays:
            if required:
                raise SpecError(f"array {_short(name)} ({what}) is missing")
            return None
        self.used.add(name)
        a = self.arrays[name]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"array {_short(name)} must be a numpy array, got {type(a).__name__}")
        if a.ndim != 1:
            raise SpecError(f"array {_short(name)} must be 1-D, got shape {a.shape}")
        if a.dtype not in dtypes:
            names = " or ".join(str(d) for d in dtypes)
            raise TypeError(f"array {_short(name)} must be {names}, got {a.dtype}")
        return a


def _check_row_pointers(
    ptr: np.ndarray, idx: np.ndarray, n_rows: int, n_cols: int, ptr_name: str, idx_name: str, what: str
) -> None:
    """ptr[n_rows + 1] monotone from 0 to len(idx); idx in [0, n_cols), no entry twice in a row."""
    if ptr.shape[0] != n_rows + 1:
        raise SpecError(f"array {_short(ptr_name)} must have {n_rows + 1} entries, got {ptr.shape[0]}")
    if ptr[0] != 0:
        raise SpecError(f"array {_short(ptr_name)} must start at 0, got {int(ptr[0])}")
    # Compare, never subtract: differences of hostile int64 values could wrap around.
    falls = ptr[1:] < ptr[:-1]
    if falls.any():
        at = int(np.argmax(falls))
        raise SpecError(f"array {_short(ptr_name)} must be non-decreasing (entry {at + 1} < entry {at})")
    if int(ptr[-1]) != idx.shape[0]:
        raise SpecError(f"array {_short(ptr_name)} must end at the length of {_short(idx_name)} = {idx.shape[0]}, "
                        f"got {int(ptr[-1])}")
    steps = np.diff(ptr)  # now each in [0, len(idx)]
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n_cols:
            bad = lo if lo < 0 else hi
            raise SpecError(f"array {_short(idx_name)} holds {bad}, out of range [0, {n_cols}) for the {what}")
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), steps)
        keys = np.sort(rows * n_cols + idx.astype(np.int64))
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if dup.size:
            k = int(keys[dup[0]])
            raise SpecError(f"array {_short(idx_name)} holds {k % n_cols} twice in row {k // n_cols}")


def _eps(v: Any, where: str) -> float:
    """A float32-representable epsilon in [float32 tiny, float32 max]."""
    ok = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))
    if ok:
        try:
            x = float(v)
        except OverflowError:  # an int too large for a float
            ok = False
        else:
            f32 = np.finfo(np.float32)
            ok = math.isfinite(x) and float(f32.tiny) <= x <= float(f32.max)
    if not ok:
        raise SpecError(f"{where} must be a finite number > 0 (as float32), got {_short(v)}")
    return x


MAX_METADATA_DEPTH = 16


def _check_metadata(meta: Any) -> None:
    """spec.metadata: a JSON object of JSON values, nested at most MAX_METADATA_DEPTH deep."""
    if not isinstance(meta, Mapping):
        raise SpecError("spec.metadata must be a JSON object")
    stack = [(meta, 1)]
    while stack:  # iterative: a hostile file may nest deeply
        value, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise SpecError(f"spec.metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise SpecError("spec.metadata keys must be strings")
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        elif not (value is None or isinstance(value, (str, bool, int, float))):
            raise SpecError(f"spec.metadata holds a {type(value).__name__}, not a JSON value")


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    span = d * (k - 1) + 1
    return (size + 2 * p - span) // s + 1 if size + 2 * p >= span else 0


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1 if size + 2 * p >= k else 0


def validate(spec: Any, arrays: Mapping[str, Any]) -> PlanLayout:
    """Check `spec` (a dict, as parsed from JSON) against `arrays`; return the layout.

    Raises SpecError (ValueError) naming the field, or TypeError for arrays of the wrong type.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec must be a JSON object, got {type(spec).__name__}")
    if spec.get("format") != SPEC_FORMAT:
        raise SpecError(f"spec.format must be {SPEC_FORMAT!r}, got {_short(spec.get('format'))}")
    if "version" not in spec or not _is_int(spec["version"]) or int(spec["version"]) != SPEC_VERSION:
        raise SpecError(
            f"spec.version must be {SPEC_VERSION} (this sparseprune reads version {SPEC_VERSION}), "
            f"got {_short(spec.get('version'))}"
        )
    _check_fields(spec, _TOP_FIELDS, _TOP_OPTIONAL, "spec")
    if "metadata" in spec:
        _check_metadata(spec["metadata"])
    store = _Arrays(arrays)

    # Buffers.
    raw_buffers = spec["buffers"]
    if not isinstance(raw_buffers, list) or not raw_buffers:
        raise SpecError("spec.buffers must be a non-empty list")
    shapes: List[Tuple[int, ...]] = []
    roots: List[int] = []
    names: List[str] = []
    buffers_out = []
    storage = 0
    for i, b in enumerate(raw_buffers):
        where = f"spec.buffers[{i}]"
        if not isinstance(b, Mapping):
            raise SpecError(f"{where} must be an object")
        _check_fields(b, _BUFFER_FIELDS, _BUFFER_OPTIONAL, where)
        shape = b["shape"]
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
            raise SpecError(f"{where}.shape must be a list of 1 to {MAX_RANK} ints, got {_short(shape)}")
        dims = tuple(_int(d, f"{where}.shape[{k}]", 1, MAX_DIM) for k, d in enumerate(shape))
        numel = math.prod(dims)
        if numel > MAX_SAMPLE_ELEMENTS:
            raise SpecError(
                f"{where}.shape {_shape_str(dims)} holds more than {MAX_SAMPLE_ELEMENTS} elements per sample")
        alias = b.get("alias_of")
        if alias is None:
            roots.append(i)
            storage += numel
            if storage > MAX_SAMPLE_ELEMENTS:
                raise SpecError(f"{where}: the buffers need more than {MAX_SAMPLE_ELEMENTS} elements per sample")
        else:
            alias = _int(alias, f"{where}.alias_of", 0, MAX_DIM)
            if alias >= i:
                raise SpecError(f"{where}.alias_of = {alias} must name an earlier buffer (0..{i - 1})")
            if math.prod(shapes[alias]) != numel:
                raise SpecError(
                    f"{where}.shape {_shape_str(dims)} must have the element count of buffer {alias} "
                    f"{_shape_str(shapes[alias])} it is an alias of"
                )
            roots.append(roots[alias])
        name = _str(b["name"], f"{where}.name") if "name" in b else ""
        shapes.append(dims)
        names.append(name)
        # Aliases point at the buffer owning the storage: equivalent, and no alias chains.
        entry = {"shape": list(dims), "alias_of": None if alias is None else roots[i]}
        if name:
            entry["name"] = name
        buffers_out.append(entry)
    n_buf = len(shapes)

    def buffer_id(v: Any, where: str) -> int:
        if not _is_int(v):
            raise SpecError(f"{where} must be a buffer id (int), got {type(v).__name__}")
        if not 0 <= int(v) < n_buf:
            raise SpecError(f"{where} = {_short(int(v))} is not a buffer id (0..{n_buf - 1})")
        return int(v)

    def id_list(key: str) -> List[int]:
        v = spec[key]
        if not isinstance(v, list) or not v:
            raise SpecError(f"spec.{key} must be a non-empty list of buffer ids")
        return [buffer_id(x, f"spec.{key}[{k}]") for k, x in enumerate(v)]

    inputs, outputs = id_list("inputs"), id_list("outputs")
    input_roots = [roots[b] for b in inputs]
    if len(set(input_roots)) != len(input_roots):
        raise SpecError("spec.inputs must name distinct buffers (no two share storage)")

    # Ops.
    raw_ops = spec["ops"]
    if not isinstance(raw_ops, list) or not raw_ops:
        raise SpecError("spec.ops must be a non-empty list")
    written = set(input_roots)
    ops_out = []
    for i, o in enumerate(raw_ops):
        where = f"spec.ops[{i}]"
        if not isinstance(o, Mapping):
            raise SpecError(f"{where} must be an object")
        kind = o.get("op")
        if not isinstance(kind, str) or kind not in OP_FIELDS:
            raise SpecError(f"{where}.op must be one of {sorted(OP_FIELDS)}, got {_short(kind)}")
        required, optional = OP_FIELDS[kind]
        _check_fields(o, required | {"op"}, optional | _COMMON_FIELDS, where)
        if "name" in o:
            _str(o["name"], f"{where}.name")
            where = f"{where} ({o['name']:.200})"
        op: Dict[str, Any] = {"op": kind}
        if "name" in o:
            op["name"] = o["name"]
        reads = ["a", "b"] if kind in ("add", "mul") else ["in"]
        for key in reads + ["out"]:
            op[key] = buffer_id(o[key], f"{where}.{key}")
        for key in reads:
            if roots[op[key]] not in written:
                raise SpecError(f"{where}.{key} = {op[key]} reads a buffer that no input or earlier op writes")
        out = op["out"]
        si = shapes[op[reads[0]]]
        so = shapes[out]
        if kind not in _ELEMENTWISE and roots[op["in"]] == roots[out]:
            raise SpecError(f"{where}: out must not share storage with in (only elementwise ops run in place)")

        def want_out(want: Sequence[int]) -> None:
            if tuple(want) != so:
                raise SpecError(
                    f"{where}: output buffer {out} must have shape {_shape_str(want)}, got {_shape_str(so)}")

        if kind in ("linear", "conv2d", "add", "mul"):
            op["activation"] = _activation(o.get("activation"), f"{where}.activation")
        if kind == "linear":
            op["weight"] = w = _str(o["weight"], f"{where}.weight")
            fmt = op["format"] = _str(o["format"], f"{where}.format")
            r, c = op["block"] = _pair(o["block"], f"{where}.block", 1)
            rows = op["rows"] = _int(o["rows"], f"{where}.rows", 1)
            cols = op["cols"] = _int(o["cols"], f"{where}.cols", 1, INT32_MAX)
            if fmt == "csr":
                if (r, c) != (1, 1):
                    raise SpecError(f"{where}.block must be [1, 1] for format 'csr', got {[r, c]}")
            elif fmt == "bsr":
                if (r, c) not in BLOCK_SHAPES:
                    raise SpecError(f"{where}.block {[r, c]} is not one of {[list(b) for b in BLOCK_SHAPES]}")
            else:
                raise SpecError(f"{where}.format must be 'csr' or 'bsr', got {_short(fmt)}")
            if si[-1] != cols:
                raise SpecError(f"{where}: input buffer {op['in']} {_shape_str(si)} must end in cols = {cols}")
            want_out(si[:-1] + (rows,))
            n_row_groups, n_col_groups = -(-rows // r), -(-cols // c)
            ptr = store.get(f"{w}.indptr", (np.dtype(np.int64),), "int64 row pointers")
            idx = store.get(f"{w}.indices", _INDEX_DTYPES, "column indices")
            val = store.get(f"{w}.values", (np.dtype(np.float32),), "float32 values")
            bias = store.get(f"{w}.bias", (np.dtype(np.float32),), "float32 bias", required=False)
            _check_row_pointers(ptr, idx, n_row_groups, n_col_groups, f"{w}.indptr", f"{w}.indices",
                                f"{n_col_groups} {'columns' if c == 1 else 'column blocks'}")
            if val.shape[0] != idx.shape[0] * r * c:
                raise SpecError(
                    f"array {_short(w + '.values')} must have {idx.shape[0] * r * c} entries, got {val.shape[0]}")
            if bias is not None and bias.shape[0] != rows:
                raise SpecError(f"array {_short(w + '.bias')} must have rows = {rows} entries, got {bias.shape[0]}")
        elif kind == "conv2d":
            op["weight"] = w = _str(o["weight"], f"{where}.weight")
            cin = op["in_channels"] = _int(o["in_channels"], f"{where}.in_channels", 1)
            cout = op["out_channels"] = _int(o["out_channels"], f"{where}.out_channels", 1)
            kh, kw = op["kernel"] = _pair(o["kernel"], f"{where}.kernel", 1)
            sh, sw = op["stride"] = _pair(o["stride"], f"{where}.stride", 1)
            ph, pw = op["padding"] = _pair(o["padding"], f"{where}.padding", 0)
            dh, dw = op["dilation"] = _pair(o["dilation"], f"{where}.dilation", 1)
            g = op["groups"] = _int(o["groups"], f"{where}.groups", 1, MAX_PAIR)
            if cin % g or cout % g:
                raise SpecError(f"{where}.groups = {g} must divide in_channels = {cin} and out_channels = {cout}")
            if (cin // g) * kh * kw > INT32_MAX:
                raise SpecError(f"{where}: a filter of in_channels / groups * kh * kw > {INT32_MAX} taps is too large")
            if len(si) != 3 or si[0] != cin:
                raise SpecError(f"{where}: input buffer {op['in']} must be ({cin}, H, W), got {_shape_str(si)}")
            oh, ow = _conv_out(si[1], kh, sh, ph, dh), _conv_out(si[2], kw, sw, pw, dw)
            if oh < 1 or ow < 1:
                raise SpecError(f"{where}: input {_shape_str(si)} is smaller than the (dilated) kernel after padding")
            want_out((cout, oh, ow))
            ptr = store.get(f"{w}.row_ptr", (np.dtype(np.int64),), "int64 row pointers")
            taps = store.get(f"{w}.taps", _INDEX_DTYPES, "kernel taps")
            val = store.get(f"{w}.values", (np.dtype(np.float32),), "float32 values")
            bias = store.get(f"{w}.bias", (np.dtype(np.float32),), "float32 bias", required=False)
            _check_row_pointers(ptr, taps, cout, (cin // g) * kh * kw, f"{w}.row_ptr", f"{w}.taps",
                                "taps of a filter (in_channels / groups * kh * kw)")
            if val.shape[0] != taps.shape[0]:
                raise SpecError(
                    f"array {_short(w + '.values')} must have len(taps) = {taps.shape[0]} entries, got {val.shape[0]}")
            if bias is not None and bias.shape[0] != cout:
                raise SpecError(
                    f"array {_short(w + '.bias')} must have out_channels = {cout} entries, got {bias.shape[0]}")
        elif kind == "activation":
            if o["kind"] not in ACTIVATIONS:
                raise SpecError(f"{where}.kind must be one of {ACTIVATIONS}, got {_short(o['kind'])}")
            op["kind"] = o["kind"]
            want_out(si)
        elif kind in ("add", "mul"):
            sb = shapes[op["b"]]
            if sb != si:
                raise SpecError(
                    f"{where}: a {_shape_str(si)} and b {_shape_str(sb)} must have the same shape (no broadcasting)")
            want_out(si)
        elif kind in ("maxpool2d", "avgpool2d"):
            kh, kw = op["kernel"] = _pair(o["kernel"], f"{where}.kernel", 1)
            sh, sw = op["stride"] = _pair(o["stride"], f"{where}.stride", 1)
            ph, pw = op["padding"] = _pair(o["padding"], f"{where}.padding", 0)
            if 2 * ph > kh or 2 * pw > kw:
                raise SpecError(f"{where}.padding {[ph, pw]} must be at most half the kernel {[kh, kw]}")
            if len(si) != 3:
                raise SpecError(f"{where}: input buffer {op['in']} must be (C, H, W), got {_shape_str(si)}")
            oh, ow = _pool_out(si[1], kh, sh, ph), _pool_out(si[2], kw, sw, pw)
            if oh < 1 or ow < 1:
                raise SpecError(f"{where}: input {_shape_str(si)} is smaller than the kernel after padding")
            want_out((si[0], oh, ow))
        elif kind == "global_avgpool":
            if len(si) != 3:
                raise SpecError(f"{where}: input buffer {op['in']} must be (C, H, W), got {_shape_str(si)}")
            want_out((si[0], 1, 1))
        elif kind == "softmax":
            want_out(si)
        elif kind == "layernorm":
            op["weight"] = w = _str(o["weight"], f"{where}.weight")
            op["eps"] = _eps(o["eps"], f"{where}.eps")
            want_out(si)
            for part in ("gamma", "beta"):
                a = store.get(f"{w}.{part}", (np.dtype(np.float32),), f"float32 {part}")
                if a.shape[0] != si[-1]:
                    raise SpecError(
                        f"array {_short(f'{w}.{part}')} must have {si[-1]} entries (the last dim), got {a.shape[0]}")
        written.add(roots[out])
        ops_out.append(op)

    for k, b in enumerate(outputs):
        if roots[b] not in written:
            raise SpecError(f"spec.outputs[{k}] = {b} is a buffer that no input or op writes")
    unused = sorted(set(store.arrays) - store.used)
    if unused:
        raise SpecError(f"array {_short(unused[0])} is not used by any op (a misspelled name?)")

    canonical: Dict[str, Any] = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "buffers": buffers_out,
        "inputs": inputs,
        "outputs": outputs,
        "ops": ops_out,
    }
    if "metadata" in spec:
        canonical["metadata"] = copy.deepcopy(dict(spec["metadata"]))

    def io_name(b: int, kind: str, k: int) -> str:
        return f"{kind} {k}" + (f" ({_short(names[b])})" if names[b] else "")

    return PlanLayout(
        spec=canonical,
        shapes=tuple(shapes),
        roots=tuple(roots),
        input_shapes=tuple(shapes[b] for b in inputs),
        output_shapes=tuple(shapes[b] for b in outputs),
        input_names=tuple(io_name(b, "input", k) for k, b in enumerate(inputs)),
        output_names=tuple(io_name(b, "output", k) for k, b in enumerate(outputs)),
        used_arrays=frozenset(store.used),
    )
