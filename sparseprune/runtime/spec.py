"""The executable spec (version 1): checked in Python, field by field, before the native plan sees it.

A spec is a JSON object describing buffers (per-sample float32 shapes; the batch dimension is
implicit and given by the inputs at run time), which buffers are inputs and outputs, and a list
of ops over them. Weights live in a flat dict of numpy arrays named `<weight>.<part>`. An optional
top-level "input_dtypes" marks inputs as "float32" (the default) or "int64" (token ids, converted
to float32 by Executable.run before the native plan sees them).

Dynamic per-sample dims: an optional top-level "dims" ({"seq": {"min": 1, "max": 512}, ...}, at
most MAX_DIMS identifiers) lets one spec serve every size in a range. A buffer shape entry is an
int >= 1, a dim name ("seq") or [k, "seq"] (k * seq: a view flattening a dynamic dim with a static
one). Run time infers each dim from the inputs' shapes (every dim appears in some input). Op
fields stay static. Shape rules are checked on concrete shapes, at the dims' min values, at their
max values and at a point where different dims take different values (so a rule relating two dims
does not pass only because they coincide at min and max); the native plan checks them again for
every assignment it runs. Memory limits hold at the max values. A "constant" writing a buffer with
dims stores its value at the max values (op field "shape") and writes the leading block.

validate() accepts a spec only when every field is known and well typed, every buffer id is in
range, every op's shapes agree, every buffer an op reads was written before (by an input or an
earlier op), an op's output shares storage with what it reads only for elementwise ops, scalars
are finite numbers, every array an op names exists with the right dtype, rank and shape, index
arrays are monotone and in range, and every array is used by some op. Errors are `SpecError` (a
ValueError) naming the field, or TypeError for an array of the wrong dtype/type. The native plan
repeats the checks that guard memory (indices, lengths, shapes), so this layer is for clear
messages and for the rules that need the whole graph (read before write). Embedding ids are data:
they are checked at run time (by the native plan and by Executable.run for "int64" inputs).

numpy only: this module must not import torch.
"""
from __future__ import annotations

import copy
import math
import re
import reprlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from sparseprune.formats import BLOCK_SHAPES

SPEC_FORMAT = "sparseprune.executable"
SPEC_VERSION = 1

ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "gelu_tanh", "hardsigmoid", "sqrt",
               "rsqrt", "exp")

# Limits shared with csrc/bindings/plan.cpp and csrc/kernels/plan.cpp (the native side refuses
# anything beyond them too).
MAX_RANK = 8
MAX_DIMS = 8  # entries of spec.dims
MAX_KERNEL_PATTERNS = 64  # the native pattern kernel's limit (PackedConv::kMaxPatterns)
MAX_DIM = 1 << 31
MAX_PAIR = 1 << 20  # kernel/stride/padding/dilation entries
INT32_MAX = (1 << 31) - 1  # linear cols and conv taps per filter are stored as 32-bit offsets
MAX_LIST = 64  # entries of a cat's "inputs" (and of a permute's "perm"; ranks stop at MAX_RANK anyway)
MAX_HEADS = 1 << 20  # attention heads
MAX_SCALAR = float(np.finfo(np.float32).max)  # |scale|, |shift|, eps: finite as float32 (the native bound too)
# Per-sample float32 elements over all buffers that own storage (the plan keeps every buffer for
# the whole run). 2**28 floats = 1 GiB per sample: a ResNet-50 at 224x224 needs ~2.5e7 and a
# BERT-base encoder at sequence 512 ~1e8, so real models fit; a hostile file asking for more is
# refused at load instead of making the first run() allocate tens of GiB.
MAX_SAMPLE_ELEMENTS = 1 << 28
# The dense weights the native plan builds at load for "dense_from" switches, in bytes, are at
# most this many times the bytes of all the file's arrays: a file cannot make load allocate more
# than a fixed multiple of its own size. CSR at 90% sparsity stores 8 bytes per nonzero, dense 40
# (5x); 98% sparse layers need 25x, so every layer of a real model may switch.
# Buffers and ops per spec: the native plan lays buffers out in O(buffers^2) at load (0.7 s for
# 30,000): without a bound a small file could hold load for minutes. Real models use ~100-5,000.
MAX_BUFFERS = 20_000
MAX_OPS = 20_000
MAX_DENSE_SWITCH_FACTOR = 64

# Fields every op may carry besides its own: "op" and an optional "name" (the module path, for
# messages and reports; the native plan ignores it).
_COMMON_FIELDS = {"op", "name"}
# op -> (required fields, optional fields)
OP_FIELDS: Dict[str, Tuple[frozenset, frozenset]] = {
    # dense_from (linear and conv2d stored sparse): from this many input rows on (linear: batch x
    # the input's leading per-sample dims; conv2d: images) the op runs the dense kernel, on dense
    # weights the native plan builds from the sparse arrays at load (see kernel_at)
    "linear": (frozenset({"in", "out", "weight", "format", "block", "rows", "cols"}),
               frozenset({"activation", "dense_from"})),
    "conv2d": (
        frozenset({"in", "out", "weight", "in_channels", "out_channels", "kernel", "stride", "padding",
                   "dilation", "groups"}),
        # format: "sparse" (default), "pattern" (the same arrays, run by the pattern kernel: at
        # most MAX_KERNEL_PATTERNS distinct k x k patterns), "depthwise" (the same arrays, run by
        # the depthwise kernel: groups == in == out channels, at most 64 taps) or "dense";
        # residual: a buffer added to the output before the activation (a ResNet block's shortcut)
        frozenset({"activation", "format", "residual", "dense_from"}),
    ),
    "activation": (frozenset({"kind", "in", "out"}), frozenset()),
    # add, sub, mul, div: numpy broadcasting between a's and b's per-sample shapes; out has the
    # broadcast shape
    "add": (frozenset({"a", "b", "out"}), frozenset({"activation"})),
    "sub": (frozenset({"a", "b", "out"}), frozenset({"activation"})),
    "mul": (frozenset({"a", "b", "out"}), frozenset({"activation"})),
    "div": (frozenset({"a", "b", "out"}), frozenset({"activation"})),
    "maxpool2d": (frozenset({"in", "out", "kernel", "stride", "padding"}), frozenset()),
    "avgpool2d": (frozenset({"in", "out", "kernel", "stride", "padding"}), frozenset()),
    "global_avgpool": (frozenset({"in", "out"}), frozenset()),
    "softmax": (frozenset({"in", "out"}), frozenset()),
    "layernorm": (frozenset({"in", "out", "weight", "eps"}), frozenset()),
    "affine": (frozenset({"in", "out", "scale", "shift"}), frozenset({"activation"})),
    "matmul": (frozenset({"a", "b", "out", "transpose_b", "scale"}), frozenset()),
    # key_mask: a buffer of one entry per key; nonzero = a padding key no query attends to.
    # mask + mask_kind (both or neither): a buffer broadcasting to [heads, q rows, keys] (see
    # _check_attention_mask); "bool": nonzero = this query may attend this key (torch SDPA's bool
    # attn_mask), "additive": added to the scaled scores. With a mask, a query row left with no
    # key gives zeros (torch's SDPA); with key_mask alone it gives NaN.
    "attention": (frozenset({"q", "k", "v", "out", "layout", "heads", "scale", "causal"}),
                  frozenset({"key_mask", "mask", "mask_kind"})),
    "permute": (frozenset({"in", "out", "perm"}), frozenset()),
    "cat": (frozenset({"inputs", "out", "axis"}), frozenset()),
    "embedding": (frozenset({"in", "out", "weight"}), frozenset()),
    # constant: writes array <weight>.value (one sample's values, flat) into every sample of out;
    # shape: the value's per-sample shape (static; required when out has dims: the value is
    # stored at the dims' max values and a run writes its leading block out[i, j, ..] = value[i, j, ..])
    "constant": (frozenset({"out", "weight"}), frozenset({"shape"})),
    # slice: out index i along `axis` (a per-sample dim) is in index start + i * step
    "slice": (frozenset({"in", "out", "axis", "start", "step"}), frozenset()),
    # reduce: "mean" or "sum" over the per-sample "axes" (sorted, unique, at least one); out keeps
    # them as size 1 (keepdim)
    "reduce": (frozenset({"in", "out", "kind", "axes"}), frozenset()),
    # pad: "pads" one [before, after] pair per per-sample dim; out dim = in dim + before + after,
    # filled with "value" around the input
    "pad": (frozenset({"in", "out", "pads", "value"}), frozenset()),
    # expand: in broadcast (numpy rules) to out's shape
    "expand": (frozenset({"in", "out"}), frozenset()),
}
# Ops that may write over what they read (out sharing storage with an operand).
_ELEMENTWISE = {"activation", "add", "sub", "mul", "div", "affine"}
_BINARY = ("add", "sub", "mul", "div")
# The buffer fields each op reads, in order ("cat" reads the list in its "inputs" field).
_READS: Dict[str, Tuple[str, ...]] = {
    "add": ("a", "b"),
    "sub": ("a", "b"),
    "mul": ("a", "b"),
    "div": ("a", "b"),
    "matmul": ("a", "b"),
    "attention": ("q", "k", "v"),
    "constant": (),
}
_ACTIVATED = {"linear", "conv2d", "add", "sub", "mul", "div", "affine"}  # ops with an optional "activation"
LINEAR_FORMATS = ("csr", "bsr", "dense")
ATTENTION_LAYOUTS = ("sequence_first", "heads_first")
INPUT_DTYPES = ("float32", "int64", "bool")
_TOP_FIELDS = {"format", "version", "buffers", "inputs", "outputs", "ops"}
# metadata: free-form producer information (a JSON object), not executed; input_dtypes: see above.
_TOP_OPTIONAL = {"metadata", "input_dtypes", "dims"}
_BUFFER_FIELDS = {"shape"}
_BUFFER_OPTIONAL = {"alias_of", "name"}

_INDEX_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))

# The kernel each stored format runs, by op (a linear bsr weight: "bsr{r}x{c}").
_CONV_KERNELS = {"sparse": "sparse-conv", "pattern": "pattern-conv", "depthwise": "depthwise-conv",
                 "dense": "dense-conv"}


def stored_kernel(op: Mapping[str, Any]) -> str:
    """The kernel a validated linear / conv2d op's stored format runs: "dense", "csr", "bsr4x1",
    ... or "sparse-conv", "pattern-conv", "depthwise-conv", "dense-conv"."""
    if op["op"] == "linear":
        return "bsr{}x{}".format(*op["block"]) if op["format"] == "bsr" else op["format"]
    return _CONV_KERNELS[op.get("format", "sparse")]


def kernel_at(op: Mapping[str, Any], rows: int) -> str:
    """The kernel a validated linear / conv2d op runs on `rows` input rows (linear: batch x the
    input's leading per-sample dims; conv2d: the batch): its stored format's, or the dense one from
    its "dense_from" on (the native plan's PlanInstance::runs_dense)."""
    if "dense_from" in op and rows >= op["dense_from"]:
        return "dense" if op["op"] == "linear" else "dense-conv"
    return stored_kernel(op)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict = 2, 80, 80, 40, 6, 4


def _short(v: Any) -> str:
    """repr() of an untrusted value, bounded in length and depth."""
    return _REPR.repr(v)


class SpecError(ValueError):
    """An executable spec or its arrays are not valid; the message names the field."""


# A per-sample shape entry: an int, a dim name, or (k, dim name) for k * dim (JSON: [k, name]).
Dim = Union[int, str, Tuple[int, str]]
Shape = Tuple[Dim, ...]


def resolve_shape(shape: Sequence[Dim], env: Mapping[str, int]) -> Tuple[int, ...]:
    """The concrete shape of a (checked) symbolic shape for the dim values `env`."""
    return tuple(d if isinstance(d, int) else env[d] if isinstance(d, str) else d[0] * env[d[1]] for d in shape)


def shape_json(shape: Sequence[Dim]) -> List[Any]:
    """A shape as the spec writes it: ints, dim names and [k, name] lists."""
    return [list(d) if isinstance(d, tuple) else d for d in shape]


def batch_shape_str(shape: Sequence[Any]) -> str:
    """'(batch, seq, 768)' for a per-sample shape, k * dim entries written 'k*seq'."""
    def entry(d: Any) -> str:
        return f"{d[0]}*{d[1]}" if isinstance(d, (tuple, list)) else str(d)
    return "(batch" + "".join(f", {entry(d)}" for d in shape) + ")"


@dataclass(frozen=True)
class PlanLayout:
    """What validate() learned: per-sample shapes, storage roots and the canonical spec.

    Shapes are symbolic (entries int, dim name, or (k, dim name)) when the spec has dims; use
    concrete_shapes() for one assignment of the dims, infer_dims() to read it off the inputs."""

    spec: Dict[str, Any]  # canonical: ints are Python ints, optional fields filled in
    shapes: Tuple[Shape, ...]
    roots: Tuple[int, ...]
    input_shapes: Tuple[Shape, ...]
    output_shapes: Tuple[Shape, ...]
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    used_arrays: frozenset
    input_dtypes: Tuple[str, ...] = ()  # per input, "float32" or "int64" (validate() fills it in)
    dims: Tuple[Tuple[str, int, int], ...] = ()  # (name, min, max) in spec order; () = all static

    def concrete_shapes(self, env: Mapping[str, int]) -> Tuple[Tuple[int, ...], ...]:
        """Every buffer's shape for the dim values `env` (as infer_dims returns)."""
        return tuple(resolve_shape(s, env) for s in self.shapes)

    def infer_dims(self, input_shapes: Sequence[Sequence[int]]) -> Dict[str, int]:
        """The dim values the inputs' shapes ([batch, *per-sample] each, one per input) give; see
        match_input for the errors."""
        env: Dict[str, int] = {}
        for k, shape in enumerate(input_shapes):
            self.match_input(k, shape, env)
        return env

    def match_input(self, k: int, shape: Sequence[int], env: Dict[str, int]) -> None:
        """Check input k's array shape ([batch, *per-sample]) and record the values it gives its
        dims in `env` (which holds those of the inputs before it). Raises ValueError naming the
        input when the rank or a static size differs, a dim's value differs from an earlier
        input's, or is outside the dim's [min, max]."""
        name, want, got = self.input_names[k], self.input_shapes[k], tuple(shape)
        if len(got) != len(want) + 1:
            raise ValueError(f"{name} must have shape {batch_shape_str(want)}, got {got}")
        if got[1:] == want:  # static (a shape with dims never equals one of ints)
            return
        for axis, (d, size) in enumerate(zip(want, got[1:]), start=1):
            if isinstance(d, int):
                if size != d:
                    raise ValueError(f"{name} must have shape {batch_shape_str(want)}, got {got}")
                continue
            mult, dim = (1, d) if isinstance(d, str) else d
            lo, hi = next((lo, hi) for n, lo, hi in self.dims if n == dim)
            allowed = f"allowed {lo}..{hi}" if mult == 1 else f"allowed {mult}*{lo}..{mult}*{hi}"
            if size % mult:
                raise ValueError(f"{name} has size {size} along axis {axis}, not a multiple of {mult} "
                                 f"(the axis is {mult} * dim {dim!r}), {allowed}")
            value = size // mult
            if not lo <= value <= hi:
                raise ValueError(f"{name} has size {size} along axis {axis} (dim {dim!r} = {value}), {allowed}")
            if env.setdefault(dim, value) != value:
                first = next(self.input_names[j] for j in range(k + 1)
                             if any(e == dim or (isinstance(e, tuple) and e[1] == dim) for e in self.input_shapes[j]))
                raise ValueError(f"{name} has size {size} along axis {axis} (dim {dim!r} = {value}), but "
                                 f"{first} gives dim {dim!r} = {env[dim]}: the inputs must agree")


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


def _shape_str(shape: Sequence[Any]) -> str:
    def entry(d: Any) -> str:
        return f"{d[0]}*{d[1]}" if isinstance(d, (tuple, list)) else str(d)
    return "(" + ", ".join(entry(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


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
        # False on the second and later passes over the ops (another dim assignment): the costly
        # checks of array contents (row pointers, kernel patterns) ran on the first.
        self.deep = True

    def get(self, name: str, dtypes, what: str, required: bool = True, ndim: int = 1) -> Optional[np.ndarray]:
        if name not in self.arrays:
            if required:
                raise SpecError(f"array {_short(name)} ({what}) is missing")
            return None
        self.used.add(name)
        a = self.arrays[name]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"array {_short(name)} must be a numpy array, got {type(a).__name__}")
        if a.ndim != ndim:
            raise SpecError(f"array {_short(name)} must be {ndim}-D, got shape {a.shape}")
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


def _dense_from(o: Mapping, op: Dict[str, Any], where: str, stored_sparse: bool) -> None:
    """A linear / conv2d op's optional dense switch: an int >= 2 on a sparse format."""
    if "dense_from" not in o:
        return
    if not stored_sparse:
        raise SpecError(f"{where}.dense_from needs a sparse format (the dense weights are built from it), "
                        "but the op's format is 'dense'")
    op["dense_from"] = _int(o["dense_from"], f"{where}.dense_from", 2, MAX_DIM)


def _check_dense_switches(ops: Sequence[Mapping[str, Any]], arrays: Mapping[str, np.ndarray]) -> None:
    """The dense weights of all "dense_from" switches within MAX_DENSE_SWITCH_FACTOR x the arrays' bytes."""
    dense = 0
    for op in ops:
        if "dense_from" in op:
            if op["op"] == "linear":
                dense += 4 * op["rows"] * op["cols"]
            else:
                kh, kw = op["kernel"]
                dense += 4 * op["out_channels"] * (op["in_channels"] // op["groups"]) * kh * kw
    stored = sum(int(a.nbytes) for a in arrays.values())
    if dense > MAX_DENSE_SWITCH_FACTOR * stored:
        raise SpecError(f"the dense_from switches need {dense:,} bytes of dense weights, more than "
                        f"{MAX_DENSE_SWITCH_FACTOR} x the {stored:,} bytes of the file's arrays")


def _finite_float(v: Any) -> Optional[float]:
    """float(v) for an int or float (not bool) that is finite as a float, else None."""
    if not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v, (bool, np.bool_)):
        return None
    try:
        x = float(v)
    except OverflowError:  # an int too large for a float
        return None
    return x if math.isfinite(x) else None


def _count_patterns(row_ptr: np.ndarray, taps: np.ndarray, kernel_taps: int) -> int:
    """Distinct nonzero-position sets among the non-empty k x k kernels of a (checked) sparse
    conv weight: row o's tap t lies in kernel (o, t // kernel_taps) at position t % kernel_taps."""
    if taps.size == 0:
        return 0
    rows = np.repeat(np.arange(row_ptr.shape[0] - 1, dtype=np.int64), np.diff(row_ptr))
    t = taps.astype(np.int64)
    kernel = rows * (int(t.max()) // kernel_taps + 1) + t // kernel_taps
    position = t % kernel_taps
    order = np.lexsort((position, kernel))
    kernel, position = kernel[order], position[order]
    starts = np.flatnonzero(np.r_[True, kernel[1:] != kernel[:-1]])
    patterns = {tuple(p) for p in np.split(position, starts[1:])}
    return len(patterns)


def _eps(v: Any, where: str) -> float:
    """A float32-representable epsilon in [float32 tiny, float32 max]."""
    x = _finite_float(v)
    f32 = np.finfo(np.float32)
    if x is None or not float(f32.tiny) <= x <= float(f32.max):
        raise SpecError(f"{where} must be a finite number > 0 (as float32), got {_short(v)}")
    return x


def _number(v: Any, where: str) -> float:
    """A finite number (int or float, not bool) that float32 represents: |v| <= MAX_SCALAR."""
    x = _finite_float(v)
    if x is None or abs(x) > MAX_SCALAR:
        raise SpecError(f"{where} must be a finite number (int or float, |x| <= {MAX_SCALAR:g}), got {_short(v)}")
    return x


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise SpecError(f"{where} must be true or false, got {_short(v)}")
    return bool(v)


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


def _buffer_id(v: Any, where: str, n_buf: int) -> int:
    if not _is_int(v):
        raise SpecError(f"{where} must be a buffer id (int), got {type(v).__name__}")
    if not 0 <= int(v) < n_buf:
        raise SpecError(f"{where} = {_short(int(v))} is not a buffer id (0..{n_buf - 1})")
    return int(v)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    span = d * (k - 1) + 1
    return (size + 2 * p - span) // s + 1 if size + 2 * p >= span else 0


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1 if size + 2 * p >= k else 0


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """numpy's broadcast of two shapes (right-aligned, size-1 dims stretch), or None if they clash."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        return None
    return tuple(max(x, y) for x, y in zip(a, b))


def _check_binary(where: str, op: Mapping, shapes: Sequence[Tuple[int, ...]]) -> None:
    """add/sub/mul/div: a and b broadcast (numpy rules) to out's shape. In place needs no rule of
    its own: buffers sharing storage have one element count, so an operand sharing out's storage
    is never stretched (each element is read before its own position is written)."""
    sa, sb, so = shapes[op["a"]], shapes[op["b"]], shapes[op["out"]]
    want = broadcast_shape(sa, sb)
    if want is None:
        raise SpecError(f"{where}: a {_shape_str(sa)} and b {_shape_str(sb)} do not broadcast (numpy rules: "
                        "right-aligned dims must be equal or 1)")
    if want != so:
        raise SpecError(f"{where}: output buffer {op['out']} must have the broadcast shape {_shape_str(want)}, "
                        f"got {_shape_str(so)}")


REDUCE_KINDS = ("mean", "sum")


def _check_reduce(where: str, o: Mapping, op: Dict[str, Any], si: Tuple[int, ...], so: Tuple[int, ...]) -> None:
    kind = o["kind"]
    if not isinstance(kind, str) or kind not in REDUCE_KINDS:
        raise SpecError(f"{where}.kind must be one of {REDUCE_KINDS}, got {_short(kind)}")
    axes = o["axes"]
    rank = len(si)
    if not isinstance(axes, list) or not 1 <= len(axes) <= rank or not all(_is_int(a) for a in axes):
        raise SpecError(f"{where}.axes must be a list of 1 to {rank} ints (per-sample axes of input "
                        f"{_shape_str(si)}), got {_short(axes)}")
    axes = [int(a) for a in axes]
    if any(not 0 <= a < rank for a in axes):
        raise SpecError(f"{where}.axes = {_short(axes)} holds an axis out of range [0, {rank})")
    if any(b <= a for a, b in zip(axes, axes[1:])):
        raise SpecError(f"{where}.axes = {_short(axes)} must be sorted and unique")
    op["kind"], op["axes"] = kind, axes
    want = tuple(1 if d in axes else n for d, n in enumerate(si))
    if so != want:
        raise SpecError(f"{where}: output buffer {op['out']} must have shape {_shape_str(want)} (the input with the "
                        f"reduced axes kept as 1), got {_shape_str(so)}")


def _check_pad(where: str, o: Mapping, op: Dict[str, Any], si: Tuple[int, ...], so: Tuple[int, ...]) -> None:
    pads = o["pads"]
    if not isinstance(pads, list) or len(pads) != len(si):
        raise SpecError(f"{where}.pads must be a list of {len(si)} [before, after] pairs (one per dim of input "
                        f"{_shape_str(si)}), got {_short(pads)}")
    op["pads"] = [_pair_int(p, f"{where}.pads[{d}]") for d, p in enumerate(pads)]
    op["value"] = _number(o["value"], f"{where}.value")
    want = tuple(n + b + a for n, (b, a) in zip(si, op["pads"]))
    if so != want:
        raise SpecError(f"{where}: output buffer {op['out']} must have shape {_shape_str(want)} (input plus pads), "
                        f"got {_shape_str(so)}")


def _check_expand(where: str, op: Mapping, si: Tuple[int, ...], so: Tuple[int, ...]) -> None:
    if broadcast_shape(si, so) != so:
        raise SpecError(f"{where}: input {_shape_str(si)} does not broadcast to output buffer {op['out']} "
                        f"{_shape_str(so)} (numpy rules: right-aligned dims equal or 1, rank at most out's)")


def _pair_int(v: Any, where: str) -> List[int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise SpecError(f"{where} must be a list of 2 ints [before, after], got {_short(v)}")
    return [_int(x, f"{where}[{i}]", 0, MAX_DIM) for i, x in enumerate(v)]


MASK_KINDS = ("bool", "additive")


def _check_attention_mask(where: str, o: Mapping, op: Dict[str, Any], shapes: Sequence[Tuple[int, ...]]) -> None:
    """attention's optional mask: its per-sample shape broadcasts (numpy rules) to
    [*groups, q rows, keys], groups = [heads] (sequence_first) or q's leading dims (heads_first),
    with the group dims all 1 or all equal to the groups: [k], [q, k], [1, 1, k], [1, q, k],
    [heads, q, k] ([1, q, 1] too)."""
    if ("mask" in o) != ("mask_kind" in o):
        raise SpecError(f"{where}: mask and mask_kind come together, got only {'mask' if 'mask' in o else 'mask_kind'}")
    if "mask" not in o:
        return
    kind = o["mask_kind"]
    if not isinstance(kind, str) or kind not in MASK_KINDS:
        raise SpecError(f"{where}.mask_kind must be one of {MASK_KINDS}, got {_short(kind)}")
    op["mask_kind"] = kind
    sq, sk, sm = shapes[op["q"]], shapes[op["k"]], shapes[op["mask"]]
    groups = (op["heads"],) if op["layout"] == "sequence_first" else sq[:-2]
    target = groups + (sq[-2], sk[-2])
    padded = (1,) * (len(target) - len(sm)) + sm
    lead = padded[:len(groups)]
    if (len(sm) > len(target) or any(m not in (1, t) for m, t in zip(padded, target))
            or not (all(m == 1 for m in lead) or lead == groups)):
        raise SpecError(f"{where}.mask: buffer {op['mask']} {_shape_str(sm)} must broadcast to (heads, q rows, keys) "
                        f"= {_shape_str(target)}, each dim 1 or full (the head dims all 1 or all full)")



_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _parse_dims(raw: Any) -> Dict[str, Tuple[int, int]]:
    """spec.dims: {name: {"min": int >= 1, "max": int >= min}}, at most MAX_DIMS names."""
    if not isinstance(raw, Mapping) or len(raw) > MAX_DIMS:
        raise SpecError(f"spec.dims must be an object of at most {MAX_DIMS} dims, got {_short(raw)}")
    dims: Dict[str, Tuple[int, int]] = {}
    for name, r in raw.items():
        if not isinstance(name, str) or not _DIM_NAME.fullmatch(name):
            raise SpecError(f"spec.dims: the name {_short(name)} is not an identifier (letters, digits, _)")
        where = f"spec.dims.{name}"
        if not isinstance(r, Mapping):
            raise SpecError(f"{where} must be an object {{\"min\": int, \"max\": int}}, got {_short(r)}")
        _check_fields(r, ("min", "max"), (), where)
        lo = _int(r["min"], f"{where}.min", 1, MAX_DIM)
        dims[name] = (lo, _int(r["max"], f"{where}.max", lo, MAX_DIM))
    return dims


def _shape_entry(v: Any, where: str, dims: Mapping[str, Tuple[int, int]]) -> Dim:
    """One entry of a buffer shape in a spec with dims: int, dim name or [k, dim name]."""
    if _is_int(v):
        return _int(v, where, 1, MAX_DIM)
    name, k = v, 1
    if isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and isinstance(v[1], str):
        k, name = _int(v[0], f"{where}[0]", 1, MAX_DIM), v[1]
    elif not isinstance(v, str):
        raise SpecError(f"{where} must be an int >= 1, a dim name or [k, dim name], got {_short(v)}")
    if name not in dims:
        raise SpecError(f"{where} names {_short(name)}, not a dim of spec.dims {sorted(dims)}")
    return name if k == 1 else (k, name)


def _monomial(shape: Sequence[Dim]) -> Tuple[int, Tuple[Tuple[str, int], ...]]:
    """A symbolic element count as coefficient * product of dims ** powers: two shapes hold the
    same number of elements for every dim assignment iff their monomials are equal."""
    coef, powers = 1, Counter()
    for d in shape:
        if isinstance(d, int):
            coef *= d
        else:
            k, name = (1, d) if isinstance(d, str) else d
            coef *= k
            powers[name] += 1
    return coef, tuple(sorted(powers.items()))


def _check_points(dims: Mapping[str, Tuple[int, int]]) -> List[Dict[str, int]]:
    """Dim assignments the shape rules are checked at: all min, all max, and one where the dims
    take distinct values inside their ranges (where the ranges allow)."""
    lo = {name: a for name, (a, _) in dims.items()}
    hi = {name: b for name, (_, b) in dims.items()}
    mid = {name: min(b, (a + b) // 2 + i) for i, (name, (a, b)) in enumerate(dims.items())}
    points = [lo]
    for env in (hi, mid):
        if env not in points:
            points.append(env)
    return points


def _env_str(env: Mapping[str, int]) -> str:
    return ", ".join(f"{name}={v}" for name, v in env.items())


def validate(spec: Any, arrays: Mapping[str, Any], *, at: Optional[Mapping[str, int]] = None) -> PlanLayout:
    """Check `spec` (a dict, as parsed from JSON) against `arrays`; return the layout.

    at: one more dim assignment (as PlanLayout.infer_dims returns) to check the shape rules at.
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
    dims = _parse_dims(spec["dims"]) if "dims" in spec else {}
    max_env = {name: hi for name, (_, hi) in dims.items()}

    # Buffers: symbolic shapes; sizes and memory are bounded at the dims' max values.
    raw_buffers = spec["buffers"]
    if not isinstance(raw_buffers, list) or not raw_buffers:
        raise SpecError("spec.buffers must be a non-empty list")
    if len(raw_buffers) > MAX_BUFFERS:
        raise SpecError(f"spec.buffers has {len(raw_buffers):,} entries, more than the {MAX_BUFFERS:,} allowed")
    shapes: List[Shape] = []
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
        if dims:
            sym = tuple(_shape_entry(d, f"{where}.shape[{k}]", dims) for k, d in enumerate(shape))
        else:
            sym = tuple(_int(d, f"{where}.shape[{k}]", 1, MAX_DIM) for k, d in enumerate(shape))
        at_max = resolve_shape(sym, max_env)
        if max(at_max) > MAX_DIM:
            raise SpecError(f"{where}.shape {_short(shape)} has a size above {MAX_DIM} at the dims' max values")
        numel = math.prod(at_max)
        if numel > MAX_SAMPLE_ELEMENTS:
            raise SpecError(f"{where}.shape {_shape_str(shape_json(sym))} holds more than {MAX_SAMPLE_ELEMENTS} "
                            "elements per sample" + (" at the dims' max values" if at_max != sym else ""))
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
            if _monomial(shapes[alias]) != _monomial(sym):
                raise SpecError(
                    f"{where}.shape {_shape_str(shape_json(sym))} must have the element count of buffer {alias} "
                    f"{_shape_str(shape_json(shapes[alias]))} it is an alias of"
                    + (" for every value of the dims" if dims else "")
                )
            roots.append(roots[alias])
        name = _str(b["name"], f"{where}.name") if "name" in b else ""
        shapes.append(sym)
        names.append(name)
        # Aliases point at the buffer owning the storage: equivalent, and no alias chains.
        entry = {"shape": shape_json(sym), "alias_of": None if alias is None else roots[i]}
        if name:
            entry["name"] = name
        buffers_out.append(entry)
    n_buf = len(shapes)

    def buffer_id(v: Any, where: str) -> int:
        return _buffer_id(v, where, n_buf)

    def id_list(key: str) -> List[int]:
        v = spec[key]
        if not isinstance(v, list) or not v:
            raise SpecError(f"spec.{key} must be a non-empty list of buffer ids")
        return [buffer_id(x, f"spec.{key}[{k}]") for k, x in enumerate(v)]

    inputs, outputs = id_list("inputs"), id_list("outputs")
    input_roots = [roots[b] for b in inputs]
    if len(set(input_roots)) != len(input_roots):
        raise SpecError("spec.inputs must name distinct buffers (no two share storage)")
    if "input_dtypes" in spec:
        raw_dtypes = spec["input_dtypes"]
        if not isinstance(raw_dtypes, list) or len(raw_dtypes) != len(inputs):
            raise SpecError(
                f"spec.input_dtypes must be a list with one entry per input ({len(inputs)}), got {_short(raw_dtypes)}")
        for k, d in enumerate(raw_dtypes):
            if not isinstance(d, str) or d not in INPUT_DTYPES:
                raise SpecError(f"spec.input_dtypes[{k}] must be one of {INPUT_DTYPES}, got {_short(d)}")
        input_dtypes = tuple(raw_dtypes)
    else:
        input_dtypes = ("float32",) * len(inputs)

    if dims:  # run() reads the dims off the inputs
        in_inputs = {d if isinstance(d, str) else d[1] for b in inputs for d in shapes[b] if not isinstance(d, int)}
        for name in dims:
            if name not in in_inputs:
                raise SpecError(f"spec.dims.{name} appears in no input's shape (run() reads the dims off the inputs)")

    # Ops: every shape rule is checked on concrete shapes, at each check point (one when the spec
    # has no dims). Rules that hold at the dims' min, max and a generic point hold for the shapes
    # the lowering emits; the native plan checks every assignment it runs anyway.
    raw_ops = spec["ops"]
    if not isinstance(raw_ops, list) or not raw_ops:
        raise SpecError("spec.ops must be a non-empty list")
    if len(raw_ops) > MAX_OPS:
        raise SpecError(f"spec.ops has {len(raw_ops):,} entries, more than the {MAX_OPS:,} allowed")
    points = _check_points(dims) if dims else [{}]
    if at:
        if set(at) != set(dims) or any(not dims[n][0] <= at[n] <= dims[n][1] for n in dims):
            raise ValueError(f"at = {_short(dict(at))} must give every dim of {dims} a value in its range")
        points.append({name: int(at[name]) for name in dims})
    max_shapes = [resolve_shape(sym, max_env) for sym in shapes]
    for k, env in enumerate(points):
        store.deep = k == 0  # array contents do not depend on the dims: checked once
        try:
            ops_out, written = _check_ops(raw_ops, [resolve_shape(sym, env) for sym in shapes], shapes, max_shapes,
                                          roots, input_roots, store)
        except SpecError as exc:
            if not dims:
                raise
            raise SpecError(f"{exc} (with dims {_env_str(env)})") from None

    for k, b in enumerate(outputs):
        if roots[b] not in written:
            raise SpecError(f"spec.outputs[{k}] = {b} is a buffer that no input or op writes")
    unused = sorted(set(store.arrays) - store.used)
    if unused:
        raise SpecError(f"array {_short(unused[0])} is not used by any op (a misspelled name?)")
    _check_dense_switches(ops_out, store.arrays)

    canonical: Dict[str, Any] = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "buffers": buffers_out,
        "inputs": inputs,
        "outputs": outputs,
        "ops": ops_out,
    }
    if "input_dtypes" in spec:
        canonical["input_dtypes"] = list(input_dtypes)
    if dims:
        canonical["dims"] = {name: {"min": lo, "max": hi} for name, (lo, hi) in dims.items()}
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
        input_dtypes=input_dtypes,
        dims=tuple((name, lo, hi) for name, (lo, hi) in dims.items()),
    )


def _check_ops(raw_ops: list, shapes: Sequence[Tuple[int, ...]], sym_shapes: Sequence[Shape],
               max_shapes: Sequence[Tuple[int, ...]], roots: Sequence[int], input_roots: Sequence[int],
               store: "_Arrays") -> Tuple[List[Dict[str, Any]], set]:
    """Check every op with the concrete buffer `shapes` of one dim assignment (sym_shapes and
    max_shapes: the symbolic ones and those at the dims' max values, for a constant's value).
    Returns the canonical ops and the storage roots written."""
    n_buf = len(shapes)

    def buffer_id(v: Any, where: str) -> int:
        return _buffer_id(v, where, n_buf)

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
        # (field, buffer id) of every buffer the op reads, in order.
        reads: List[Tuple[str, int]] = []
        if kind == "cat":
            raw_ids = o["inputs"]
            if not isinstance(raw_ids, list) or not 1 <= len(raw_ids) <= MAX_LIST:
                raise SpecError(f"{where}.inputs must be a list of 1 to {MAX_LIST} buffer ids, got {_short(raw_ids)}")
            op["inputs"] = [buffer_id(x, f"{where}.inputs[{k}]") for k, x in enumerate(raw_ids)]
            reads = [(f"inputs[{k}]", b) for k, b in enumerate(op["inputs"])]
        else:
            optional_reads = {"conv2d": ("residual",), "attention": ("key_mask", "mask")}
            extra = tuple(key for key in optional_reads.get(kind, ()) if key in o)
            for key in _READS.get(kind, ("in",)) + extra:
                op[key] = buffer_id(o[key], f"{where}.{key}")
                reads.append((key, op[key]))
        out = op["out"] = buffer_id(o["out"], f"{where}.out")
        for key, b in reads:
            if roots[b] not in written:
                raise SpecError(f"{where}.{key} = {b} reads a buffer that no input or earlier op writes")
        if kind not in _ELEMENTWISE:
            for key, b in reads:
                if roots[b] == roots[out]:
                    raise SpecError(
                        f"{where}: out must not share storage with {key} (only elementwise ops run in place)")
        so = shapes[out]
        if kind == "constant":
            op["weight"] = w = _str(o["weight"], f"{where}.weight")
            value = store.get(f"{w}.value", (np.dtype(np.float32),), "float32 constant values")
            # The value is one sample of out at the dims' max values; a run writes its leading block.
            vs = so
            if "shape" in o:
                raw = o["shape"]
                if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_RANK:
                    raise SpecError(f"{where}.shape must be a list of 1 to {MAX_RANK} ints, got {_short(raw)}")
                vs = tuple(_int(d, f"{where}.shape[{k}]", 1, MAX_DIM) for k, d in enumerate(raw))
                if vs != max_shapes[out]:
                    raise SpecError(f"{where}.shape {_shape_str(vs)} must be out's shape at the dims' max values "
                                    f"{_shape_str(max_shapes[out])} (buffer {out} {_shape_str(sym_shapes[out])})")
                op["shape"] = list(vs)
            elif max_shapes[out] != sym_shapes[out]:
                raise SpecError(f"{where} writes buffer {out} {_shape_str(sym_shapes[out])}, which has dims: it needs "
                                f"a field 'shape' (the value's shape at the dims' max values)")
            if value.shape[0] != math.prod(vs):
                raise SpecError(f"array {_short(w + '.value')} must hold one sample of out {_shape_str(vs)}: "
                                f"{math.prod(vs)} values, got {value.shape[0]}")
            written.add(roots[out])
            ops_out.append(op)
            continue
        si = shapes[reads[0][1]]

        def want_out(want: Sequence[int]) -> None:
            if tuple(want) != so:
                raise SpecError(
                    f"{where}: output buffer {out} must have shape {_shape_str(want)}, got {_shape_str(so)}")

        if kind in _ACTIVATED:
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
            elif fmt == "dense":
                if (r, c) != (1, 1):
                    raise SpecError(f"{where}.block must be [1, 1] for format 'dense', got {[r, c]}")
            else:
                raise SpecError(f"{where}.format must be 'csr' or 'bsr' (sparse) or 'dense', got {_short(fmt)}")
            _dense_from(o, op, where, fmt != "dense")
            if si[-1] != cols:
                raise SpecError(f"{where}: input buffer {op['in']} {_shape_str(si)} must end in cols = {cols}")
            want_out(si[:-1] + (rows,))
            if fmt == "dense":
                for part in ("indptr", "indices", "values"):
                    if f"{w}.{part}" in store.arrays:
                        raise SpecError(f"array {_short(f'{w}.{part}')} is not used: format 'dense' reads "
                                        f"{_short(w + '.weight')} (rows, cols) only")
                dense = store.get(f"{w}.weight", (np.dtype(np.float32),), "float32 dense weight", ndim=2)
                if dense.shape != (rows, cols):
                    raise SpecError(f"array {_short(w + '.weight')} must have shape (rows, cols) = "
                                    f"{_shape_str((rows, cols))}, got {_shape_str(dense.shape)}")
            else:
                n_row_groups, n_col_groups = -(-rows // r), -(-cols // c)
                ptr = store.get(f"{w}.indptr", (np.dtype(np.int64),), "int64 row pointers")
                idx = store.get(f"{w}.indices", _INDEX_DTYPES, "column indices")
                val = store.get(f"{w}.values", (np.dtype(np.float32),), "float32 values")
                if store.deep:
                    _check_row_pointers(ptr, idx, n_row_groups, n_col_groups, f"{w}.indptr", f"{w}.indices",
                                        f"{n_col_groups} {'columns' if c == 1 else 'column blocks'}")
                if val.shape[0] != idx.shape[0] * r * c:
                    raise SpecError(
                        f"array {_short(w + '.values')} must have {idx.shape[0] * r * c} entries, got {val.shape[0]}")
            bias = store.get(f"{w}.bias", (np.dtype(np.float32),), "float32 bias", required=False)
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
            if "residual" in op and shapes[op["residual"]] != (cout, oh, ow):
                raise SpecError(f"{where}.residual: buffer {op['residual']} {_shape_str(shapes[op['residual']])} must "
                                f"have the output's shape {_shape_str((cout, oh, ow))}")
            fmt = _str(o.get("format", "sparse"), f"{where}.format")
            if fmt not in ("sparse", "pattern", "depthwise", "dense"):
                raise SpecError(
                    f"{where}.format must be 'sparse', 'pattern', 'depthwise' or 'dense', got {_short(fmt)}")
            if fmt == "depthwise" and not (g == cin == cout and kh * kw <= 64):
                raise SpecError(f"{where}: format 'depthwise' needs groups == in_channels == out_channels and kernels "
                                f"of at most 64 taps, got groups {g}, channels {cin} -> {cout}, kernel {kh}x{kw}")
            if "format" in o:
                op["format"] = fmt
            _dense_from(o, op, where, fmt != "dense")
            bias = store.get(f"{w}.bias", (np.dtype(np.float32),), "float32 bias", required=False)
            if bias is not None and bias.shape[0] != cout:
                raise SpecError(
                    f"array {_short(w + '.bias')} must have out_channels = {cout} entries, got {bias.shape[0]}")
            if fmt == "dense":
                weight = store.get(f"{w}.weight", (np.dtype(np.float32),), "float32 dense filters", ndim=4)
                if weight.shape != (cout, cin // g, kh, kw):
                    raise SpecError(f"array {_short(w + '.weight')} must have shape {(cout, cin // g, kh, kw)} "
                                    f"(out, in / groups, kh, kw), got {weight.shape}")
                for part in ("row_ptr", "taps", "values"):
                    if f"{w}.{part}" in store.arrays:
                        raise SpecError(f"array {_short(f'{w}.{part}')} belongs to a sparse conv2d, but {where} "
                                        "has format 'dense'")
            else:
                ptr = store.get(f"{w}.row_ptr", (np.dtype(np.int64),), "int64 row pointers")
                taps = store.get(f"{w}.taps", _INDEX_DTYPES, "kernel taps")
                val = store.get(f"{w}.values", (np.dtype(np.float32),), "float32 values")
                if store.deep:
                    _check_row_pointers(ptr, taps, cout, (cin // g) * kh * kw, f"{w}.row_ptr", f"{w}.taps",
                                        "taps of a filter (in_channels / groups * kh * kw)")
                if val.shape[0] != taps.shape[0]:
                    raise SpecError(
                        f"array {_short(w + '.values')} must have len(taps) = {taps.shape[0]} entries, got {val.shape[0]}")
                if fmt == "pattern":
                    if kh * kw > 64:
                        raise SpecError(f"{where}: format 'pattern' needs kernels of at most 64 taps, got {kh}x{kw}")
                    n = _count_patterns(ptr, taps, kh * kw) if store.deep else 0
                    if n > MAX_KERNEL_PATTERNS:
                        raise SpecError(f"{where}: format 'pattern' allows at most {MAX_KERNEL_PATTERNS} distinct "
                                        f"kernel patterns, the weight has {n}")
        elif kind == "activation":
            if o["kind"] not in ACTIVATIONS:
                raise SpecError(f"{where}.kind must be one of {ACTIVATIONS}, got {_short(o['kind'])}")
            op["kind"] = o["kind"]
            want_out(si)
        elif kind in _BINARY:
            _check_binary(where, op, shapes)
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
        elif kind == "affine":
            op["scale"] = _number(o["scale"], f"{where}.scale")
            op["shift"] = _number(o["shift"], f"{where}.shift")
            want_out(si)
        elif kind == "matmul":
            tb = op["transpose_b"] = _bool(o["transpose_b"], f"{where}.transpose_b")
            op["scale"] = _number(o["scale"], f"{where}.scale")
            sb = shapes[op["b"]]
            pair = f"a {_shape_str(si)} and b {_shape_str(sb)}"
            if len(si) < 2 or len(sb) != len(si):
                raise SpecError(f"{where}: {pair} must have the same rank >= 2")
            if si[:-2] != sb[:-2]:
                raise SpecError(f"{where}: {pair} must have the same leading dims (no broadcasting)")
            k, kb = si[-1], (sb[-1] if tb else sb[-2])
            if kb != k:
                side = "last dim (transpose_b)" if tb else "second-to-last dim"
                raise SpecError(f"{where}: inner dims of {pair} differ: a has K = {k}, b's {side} is {kb}")
            want_out(si[:-1] + ((sb[-2] if tb else sb[-1]),))
        elif kind == "attention":
            layout = o["layout"]
            if not isinstance(layout, str) or layout not in ATTENTION_LAYOUTS:
                raise SpecError(f"{where}.layout must be one of {ATTENTION_LAYOUTS}, got {_short(layout)}")
            op["layout"] = layout
            heads = op["heads"] = _int(o["heads"], f"{where}.heads", 1, MAX_HEADS)
            op["scale"] = _number(o["scale"], f"{where}.scale")
            op["causal"] = _bool(o["causal"], f"{where}.causal")
            sq, sk, sv = si, shapes[op["k"]], shapes[op["v"]]
            qkv = f"q {_shape_str(sq)}, k {_shape_str(sk)}, v {_shape_str(sv)}"
            if layout == "sequence_first":
                if not len(sq) == len(sk) == len(sv) == 2:
                    raise SpecError(f"{where}: layout 'sequence_first' needs q, k, v of rank 2 (rows, heads * dim), "
                                    f"got {qkv}")
                if sq[1] % heads or sv[1] % heads:
                    raise SpecError(f"{where}.heads = {heads} must divide the last dims of q ({sq[1]}) and v ({sv[1]})")
            else:
                if len(sq) < 2 or not len(sq) == len(sk) == len(sv):
                    raise SpecError(f"{where}: layout 'heads_first' needs q, k, v of the same rank >= 2, got {qkv}")
                if not sq[:-2] == sk[:-2] == sv[:-2]:
                    raise SpecError(f"{where}: q, k, v must have the same leading dims (no broadcasting), got {qkv}")
            if sq[-1] != sk[-1]:
                raise SpecError(f"{where}: q and k must have the same last dim, got {qkv}")
            if sk[-2] != sv[-2]:
                raise SpecError(f"{where}: k and v must have the same number of rows (keys), got {qkv}")
            if "key_mask" in op and shapes[op["key_mask"]] != (sk[-2],):
                raise SpecError(f"{where}.key_mask: buffer {op['key_mask']} {_shape_str(shapes[op['key_mask']])} must "
                                f"have one entry per key: ({sk[-2]},)")
            _check_attention_mask(where, o, op, shapes)
            want_out(sq[:-1] + (sv[-1],))
        elif kind == "reduce":
            _check_reduce(where, o, op, si, so)
        elif kind == "pad":
            _check_pad(where, o, op, si, so)
        elif kind == "expand":
            _check_expand(where, op, si, so)
        elif kind == "slice":
            axis = op["axis"] = _int(o["axis"], f"{where}.axis", 0, MAX_RANK)
            if axis >= len(si):
                raise SpecError(f"{where}.axis = {axis} is out of range for input {_shape_str(si)}")
            start = op["start"] = _int(o["start"], f"{where}.start", 0, MAX_DIM)
            step = op["step"] = _int(o["step"], f"{where}.step", 1, MAX_DIM)
            if len(so) != len(si) or any(a != b for d, (a, b) in enumerate(zip(si, so)) if d != axis):
                raise SpecError(f"{where}: output {_shape_str(so)} must equal input {_shape_str(si)} except along "
                                f"axis {axis}")
            if start + (so[axis] - 1) * step >= si[axis]:
                raise SpecError(f"{where}: start {start}, step {step} and {so[axis]} outputs leave the input's "
                                f"{si[axis]} entries along axis {axis}")
        elif kind == "permute":
            perm, rank = o["perm"], len(si)
            if not isinstance(perm, list) or len(perm) != rank or not all(_is_int(p) for p in perm):
                raise SpecError(f"{where}.perm must be a list of {rank} ints (the rank of input buffer {op['in']} "
                                f"{_shape_str(si)}), got {_short(perm)}")
            perm = [int(p) for p in perm]
            if sorted(perm) != list(range(rank)):
                raise SpecError(f"{where}.perm = {_short(perm)} is not a permutation of range({rank})")
            op["perm"] = perm
            want_out(tuple(si[p] for p in perm))
        elif kind == "cat":
            rank = len(si)
            axis = op["axis"] = _int(o["axis"], f"{where}.axis", 0, MAX_RANK)
            if axis >= rank:
                raise SpecError(f"{where}.axis = {axis} is out of range for inputs of rank {rank} (0..{rank - 1})")
            total = 0
            for key, b in reads:
                sb = shapes[b]
                if len(sb) != rank or sb[:axis] != si[:axis] or sb[axis + 1:] != si[axis + 1:]:
                    raise SpecError(f"{where}.{key}: buffer {b} {_shape_str(sb)} must have the shape of inputs[0] "
                                    f"{_shape_str(si)} except along axis {axis}")
                total += sb[axis]
            want_out(si[:axis] + (total,) + si[axis + 1:])
        elif kind == "embedding":
            op["weight"] = w = _str(o["weight"], f"{where}.weight")
            table = store.get(f"{w}.table", (np.dtype(np.float32),), "float32 embedding table", ndim=2)
            if table.shape[0] < 1 or table.shape[1] < 1:
                raise SpecError(f"array {_short(w + '.table')} must have at least one row and one column, "
                                f"got shape {_shape_str(table.shape)}")
            want_out(si + (table.shape[1],))
        written.add(roots[out])
        ops_out.append(op)
    return ops_out, written
