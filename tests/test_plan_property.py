"""Property tests of the native plan (sparseprune._C.Plan) against the float64 numpy reference.

1. Random valid specs: a graph of 1-6 ops of every kind (every linear and conv2d format,
   residuals, attention key masks), over small shapes (dims 1..9: 1 and odd sizes included),
   random weights (sparsity 0 to 1.0, int64 or int32 indices), activations, buffer reuse (ops
   writing into earlier buffers, into inputs, in place, through aliases), reshapes via alias_of
   (chains too), 1 or 2 inputs (float32, int64 token ids, bool masks) and several outputs. The
   native plan must equal the reference for batch sizes 0, 1 and 3 with 1, 2 and 3 threads; 1 and
   3 threads must agree (also at batch 48, where kernels split work); and the raw
   (non-canonical) spec must build a plan giving the same bits.
2. One random mutation of a valid spec (a field deleted or of a wrong type, ints out of range or
   beyond int64, buffer ids past the end, shapes changed, ops reordered, arrays of the wrong
   dtype, rank, layout or length, indices out of range, row pointers not monotone, ...):
   validate() and Executable.from_spec raise SpecError / TypeError and nothing else, or accept a
   spec that runs like the reference; the native plan given the mutated spec directly raises
   ValueError / TypeError, or builds it only when the one rule broken guards no memory (then it
   runs without error).

Every native run first fills the plan's thread-local arena with NaN (a "poison" plan), so an op
that reads memory no op wrote shows up as a mismatch. The native bugs these properties found (a
buffer-size overflow, pool windows read past the row end, eps/alias_of casts) are fixed; the
regression tests at the end pin them.
"""
import copy
import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparseprune import _native, formats
from sparseprune.runtime import ACTIVATIONS, Executable, SpecError, run_reference, validate
from sparseprune.runtime.spec import OP_FIELDS

_C = _native._C
F32 = np.float32

RTOL = 1e-4  # fp32 kernels against the float64 reference
THREAD_RTOL = 1e-6  # 1 thread against 3 threads
BATCHES = (0, 1, 3)
BIG_BATCH = 48  # enough work for several threads in most kernels (native only, compared to batch 3)
MAX_NUMEL = 1500  # per-sample elements of any buffer: keeps the reference fast

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- a random valid spec, op by op ------------------------------------------------------------------


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(size, k, s, p, d):
    span = d * (k - 1) + 1
    return (size + 2 * p - span) // s + 1 if size + 2 * p >= span else 0


def _pool_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1 if size + 2 * p >= k else 0


def _broadcast(a, b):
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        return None


class _Graph:
    """Builds a spec op by op: every op reads buffers already written (by an input or an earlier
    op) whose shapes fit it, and writes a new buffer, an earlier one of the right shape, an alias
    (a reshape) of some storage, or (elementwise ops) its own operand in place."""

    def __init__(self, draw, rng):
        self.draw, self.rng = draw, rng
        self.buffers, self.shapes, self.roots = [], [], []
        self.written = set()  # storage roots holding data
        self.ids = {}  # storage root -> V when it holds integer ids in [0, V) (for embedding)
        self.ops, self.arrays = [], {}
        self.inputs, self.input_dtypes, self.id_bounds = [], [], []
        self.mask_inputs = set()  # buffers of "bool" inputs (attention padding masks)

    # random choices (structure through hypothesis, so it shrinks; numbers from the numpy rng)
    def choice(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def coin(self, p=0.5):
        return self.draw(st.integers(0, 99)) < round(100 * p)

    def dim(self, lo=1, hi=9):
        return self.draw(st.integers(lo, hi))

    def shape(self, rank=None):
        rank = rank or self.choice([1, 2, 3, 3, 4])
        return tuple(self.dim() for _ in range(rank))

    def factor_shape(self, numel):
        """A random shape of `numel` elements (rank 1..4)."""
        dims, rest = [], numel
        for _ in range(self.draw(st.integers(0, 3))):
            d = self.choice(_divisors(rest))
            dims.append(d)
            rest //= d
        return tuple(dims + [rest])

    def weight_name(self):
        return f"w{len(self.ops)}_{len(self.arrays)}"

    def values(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(F32)

    def sparsity(self):
        return self.choice([0.0, 0.5, 0.9, 1.0, float(self.rng.random())])

    def masked(self, *shape, fan_in):
        w = self.values(*shape, scale=1.0 / math.sqrt(fan_in))
        w[self.rng.random(shape) < self.sparsity()] = 0
        return w

    def index_dtype(self, a):
        return a.astype(np.int32) if self.coin(0.25) else a

    def activation(self, op):
        act = self.choice([None, None, "none", "omit", *ACTIVATIONS])
        if act != "omit":
            op["activation"] = act

    # buffers
    def add_buffer(self, shape, alias_of=None):
        b = {"shape": list(shape)}
        if alias_of is not None:
            b["alias_of"] = alias_of
        if self.coin(0.1):
            b["name"] = f"buf{len(self.buffers)}"
        self.buffers.append(b)
        self.shapes.append(tuple(shape))
        self.roots.append(len(self.roots) if alias_of is None else self.roots[alias_of])
        return len(self.buffers) - 1

    def readable(self, fits=lambda s: True):
        return [b for b, s in enumerate(self.shapes) if self.roots[b] in self.written and fits(s)]

    def reshape(self):
        """A new alias of a written buffer (sometimes of an alias: a chain) with another shape."""
        src = self.choice(self.readable())
        self.add_buffer(self.factor_shape(math.prod(self.shapes[src])), alias_of=src)

    def target(self, shape, reads, in_place=()):
        """The buffer an op reading `reads` writes its output of `shape` into. in_place: the
        operands an elementwise op may overwrite (their shape is `shape`)."""
        shape = tuple(shape)
        busy = {self.roots[b] for b in reads} if not in_place else set()
        numel = math.prod(shape)
        reuse = [b for b, s in enumerate(self.shapes) if s == shape and self.roots[b] not in busy]
        alias = [b for b, s in enumerate(self.shapes) if math.prod(s) == numel and self.roots[b] not in busy]
        kinds = ["new", "new", "new_alias"] + ["reuse"] * bool(reuse) + ["alias"] * bool(alias)
        kinds += ["in_place"] * 2 * bool(in_place)
        kind = self.choice(kinds)
        if kind == "new":
            out = self.add_buffer(shape)
        elif kind == "new_alias":  # a fresh storage of another shape, written through an alias
            out = self.add_buffer(shape, alias_of=self.add_buffer(self.factor_shape(numel)))
        elif kind == "reuse":
            out = self.choice(reuse)
        elif kind == "alias":
            out = self.add_buffer(shape, alias_of=self.choice(alias))
        else:
            out = self.choice(in_place)
        self.written.add(self.roots[out])
        self.ids.pop(self.roots[out], None)
        return out

    # ops: each returns False when the current buffers do not fit it
    def op_linear(self):
        srcs = self.readable(lambda s: s[-1] <= 40)
        if not srcs:
            return False
        src = self.choice(srcs)
        si = self.shapes[src]
        cols, rows = si[-1], self.dim()
        fmt = self.choice(["csr", "bsr", "dense"])
        block = list(self.choice(formats.BLOCK_SHAPES)) if fmt == "bsr" else [1, 1]
        dense, w = self.masked(rows, cols, fan_in=cols), self.weight_name()
        if fmt == "dense":
            self.arrays[f"{w}.weight"] = dense
        else:
            sa = formats.csr_arrays(dense) if fmt == "csr" else formats.bsr_arrays(dense, *block)
            self.arrays.update({f"{w}.indptr": sa.indptr, f"{w}.indices": self.index_dtype(sa.indices),
                                f"{w}.values": sa.values})
        if self.coin():
            self.arrays[f"{w}.bias"] = self.values(rows)
        op = {"op": "linear", "in": src, "weight": w, "format": fmt, "block": block, "rows": rows, "cols": cols}
        self.activation(op)
        op["out"] = self.target(si[:-1] + (rows,), [src])
        self.ops.append(op)
        return True

    def op_conv2d(self):
        srcs = self.readable(lambda s: len(s) == 3 and s[0] <= 16)
        if not srcs:
            return False
        src = self.choice(srcs)
        cin, h, wd = self.shapes[src]
        fmt = self.choice(["sparse", "pattern", "depthwise", "dense"])
        if fmt == "depthwise":
            g = cout = cin
        else:
            g = self.choice(_divisors(cin))
            cout = g * self.dim(1, max(1, 9 // g))
        kh, kw = self.dim(1, 4), self.dim(1, 4)
        sh, sw = self.dim(1, 3), self.dim(1, 3)
        ph, pw = self.dim(0, 2), self.dim(0, 2)
        dh, dw = self.dim(1, 2), self.dim(1, 2)
        if _conv_out(h, kh, sh, ph, dh) < 1:
            kh = 1
        if _conv_out(wd, kw, sw, pw, dw) < 1:
            kw = 1
        oh, ow = _conv_out(h, kh, sh, ph, dh), _conv_out(wd, kw, sw, pw, dw)
        cin_g = cin // g
        weight = self.masked(cout, cin_g, kh, kw, fan_in=cin_g * kh * kw)
        if fmt == "pattern":  # at most 4 distinct kernel patterns (the kernel allows 64)
            patterns = self.rng.random((4, kh, kw)) < 0.6
            pick = self.rng.integers(0, 5, size=(cout, cin_g))  # 4: an empty kernel
            mask = np.concatenate([patterns, np.zeros((1, kh, kw), bool)])[pick]
            weight = np.where(mask, self.values(cout, cin_g, kh, kw, scale=1.0 / math.sqrt(cin_g * kh * kw)),
                              0).astype(F32)
        w = self.weight_name()
        if fmt == "dense":
            self.arrays[f"{w}.weight"] = weight
        else:
            ca = formats.conv_arrays(weight)
            self.arrays.update({f"{w}.row_ptr": ca.row_ptr, f"{w}.taps": self.index_dtype(ca.taps),
                                f"{w}.values": ca.values})
        if self.coin():
            self.arrays[f"{w}.bias"] = self.values(cout)
        op = {"op": "conv2d", "in": src, "weight": w, "in_channels": cin, "out_channels": cout, "kernel": [kh, kw],
              "stride": [sh, sw], "padding": [ph, pw], "dilation": [dh, dw], "groups": g}
        if fmt != "sparse" or self.coin():
            op["format"] = fmt
        self.activation(op)
        reads = [src]
        residuals = self.readable(lambda s: s == (cout, oh, ow))
        if residuals and self.coin(0.6):
            op["residual"] = self.choice(residuals)
            reads.append(op["residual"])
        op["out"] = self.target((cout, oh, ow), reads)
        self.ops.append(op)
        return True

    def op_activation(self):
        src = self.choice(self.readable())
        op = {"op": "activation", "kind": self.choice(ACTIVATIONS), "in": src}
        op["out"] = self.target(self.shapes[src], [src], in_place=[src])
        self.ops.append(op)
        return True

    def op_binary(self, kind):
        a = self.choice(self.readable())
        b = self.choice(self.readable(lambda s: _broadcast(s, self.shapes[a]) is not None))
        if self.coin(0.3):  # a fresh operand of a shape that broadcasts against a's (1s and a shorter rank)
            sa = self.shapes[a][self.dim(0, len(self.shapes[a]) - 1):]
            b = self.add_buffer(tuple(d if self.coin() else 1 for d in sa))
            self.ops.append({"op": "constant", "out": b, "weight": self.weight_name()})
            self.arrays[self.ops[-1]["weight"] + ".value"] = self.values(math.prod(self.shapes[b]))
            self.written.add(self.roots[b])
        out = _broadcast(self.shapes[a], self.shapes[b])
        op = {"op": kind, "a": a, "b": b}
        if kind == "add" or self.coin(0.3):
            self.activation(op)
        op["out"] = self.target(out, [a, b], in_place=[x for x in (a, b) if self.shapes[x] == out])
        self.ops.append(op)
        return True

    def op_add(self):
        return self.op_binary("add")

    def op_sub(self):
        return self.op_binary("sub")

    def op_mul(self):
        return self.op_binary("mul")

    def op_div(self):
        return self.op_binary("div")

    def op_affine(self):
        src = self.choice(self.readable())
        numbers = [0, 1, -1, 2, 0.5, -0.25, 3.0]
        op = {"op": "affine", "in": src, "scale": self.choice(numbers + [float(self.rng.normal())]),
              "shift": self.choice(numbers + [float(self.rng.normal())])}
        self.activation(op)
        op["out"] = self.target(self.shapes[src], [src], in_place=[src])
        self.ops.append(op)
        return True

    def op_pool(self, kind):
        srcs = self.readable(lambda s: len(s) == 3)
        if not srcs:
            return False
        src = self.choice(srcs)
        c, h, wd = self.shapes[src]
        k, s, p = [self.dim(1, 4), self.dim(1, 4)], [self.dim(1, 3), self.dim(1, 3)], [0, 0]
        for d, size in enumerate((h, wd)):
            p[d] = self.dim(0, k[d] // 2)
            if _pool_out(size, k[d], s[d], p[d]) < 1:
                k[d], p[d] = 1, 0
        op = {"op": kind, "in": src, "kernel": k, "stride": s, "padding": p}
        ids = self.ids.get(self.roots[src])
        op["out"] = self.target((c, _pool_out(h, k[0], s[0], p[0]), _pool_out(wd, k[1], s[1], p[1])), [src])
        if ids is not None and kind == "maxpool2d":
            self.ids[self.roots[op["out"]]] = ids
        self.ops.append(op)
        return True

    def op_maxpool2d(self):
        return self.op_pool("maxpool2d")

    def op_avgpool2d(self):
        return self.op_pool("avgpool2d")

    def op_global_avgpool(self):
        srcs = self.readable(lambda s: len(s) == 3)
        if not srcs:
            return False
        src = self.choice(srcs)
        op = {"op": "global_avgpool", "in": src}
        op["out"] = self.target((self.shapes[src][0], 1, 1), [src])
        self.ops.append(op)
        return True

    def op_softmax(self):
        src = self.choice(self.readable())
        op = {"op": "softmax", "in": src}
        op["out"] = self.target(self.shapes[src], [src])
        self.ops.append(op)
        return True

    def op_layernorm(self):
        src = self.choice(self.readable())
        w, n = self.weight_name(), self.shapes[src][-1]
        self.arrays[f"{w}.gamma"] = (1.0 + 0.5 * self.values(n)).astype(F32)
        self.arrays[f"{w}.beta"] = self.values(n)
        op = {"op": "layernorm", "in": src, "weight": w, "eps": self.choice([1e-5, 1e-3, 0.1, 1])}
        op["out"] = self.target(self.shapes[src], [src])
        self.ops.append(op)
        return True

    def op_matmul(self):
        srcs = self.readable(lambda s: len(s) >= 2)
        if not srcs:
            return False
        a = self.choice(srcs)
        sa = self.shapes[a]
        pairs = [(b, tb) for b in self.readable(lambda s: len(s) == len(sa) and s[:-2] == sa[:-2])
                 for tb in (False, True) if (self.shapes[b][-1] if tb else self.shapes[b][-2]) == sa[-1]]
        b, tb = self.choice(pairs)  # (a, True) always fits
        sb = self.shapes[b]
        n = sb[-2] if tb else sb[-1]
        op = {"op": "matmul", "a": a, "b": b, "transpose_b": tb,
              "scale": self.choice([1, 1.0, 0.5, -2, float(self.rng.normal())])}
        op["out"] = self.target(sa[:-1] + (n,), [a, b])
        self.ops.append(op)
        return True

    def op_attention(self):
        layout = self.choice(["sequence_first", "heads_first"])
        srcs = self.readable((lambda s: len(s) == 2) if layout == "sequence_first" else (lambda s: len(s) >= 2))
        if not srcs:
            return False
        q = self.choice(srcs)
        sq = self.shapes[q]
        same = (lambda s: len(s) == 2) if layout == "sequence_first" else (lambda s: len(s) == len(sq) and
                                                                              s[:-2] == sq[:-2])
        k = self.choice(self.readable(lambda s: same(s) and s[-1] == sq[-1]))
        sk = self.shapes[k]
        v = self.choice(self.readable(lambda s: same(s) and s[-2] == sk[-2]))
        sv = self.shapes[v]
        if layout == "sequence_first":
            heads = self.choice(_divisors(math.gcd(sq[1], sv[1])))
        else:
            heads = self.dim(1, 4)  # ignored for heads_first
        op = {"op": "attention", "q": q, "k": k, "v": v, "layout": layout, "heads": heads,
              "scale": self.choice([1, 0.5, 1.0 / math.sqrt(sq[-1] / heads), float(self.rng.normal())]),
              "causal": self.coin()}
        reads = [q, k, v]
        masks = self.readable(lambda s: s == (sk[-2],))
        if masks and self.coin(0.6):  # a padding mask of the keys (any buffer of (S,), mostly bool inputs)
            bools = [b for b in masks if b in self.mask_inputs]
            op["key_mask"] = self.choice(bools if bools and self.coin(0.8) else masks)
            reads.append(op["key_mask"])
        if self.coin(0.4):  # a mask broadcasting to (heads, L, S): any buffer of a fitting shape
            groups = (heads,) if layout == "sequence_first" else sq[:-2]
            full = groups + (sq[-2], sk[-2])

            def fits(s):
                if len(s) > len(full):
                    return False
                m = (1,) * (len(full) - len(s)) + s
                lead = m[:len(groups)]
                return all(x in (1, t) for x, t in zip(m, full)) and (set(lead) <= {1} or lead == groups)
            mask_bufs = self.readable(fits)
            if mask_bufs:
                op["mask"] = self.choice(mask_bufs)
                op["mask_kind"] = self.choice(["bool", "additive"])
                reads.append(op["mask"])
        op["out"] = self.target(sq[:-1] + (sv[-1],), reads)
        self.ops.append(op)
        return True

    def op_reduce(self):
        src = self.choice(self.readable())
        si = self.shapes[src]
        axes = sorted(self.draw(st.sets(st.integers(0, len(si) - 1), min_size=1)))
        op = {"op": "reduce", "kind": self.choice(["mean", "sum"]), "in": src, "axes": axes}
        op["out"] = self.target(tuple(1 if d in axes else n for d, n in enumerate(si)), [src])
        self.ops.append(op)
        return True

    def op_pad(self):
        src = self.choice(self.readable())
        si = self.shapes[src]
        pads = [[self.dim(0, 2), self.dim(0, 2)] for _ in si]
        op = {"op": "pad", "in": src, "pads": pads, "value": self.choice([0, 0.0, -1.5, float(self.rng.normal())])}
        op["out"] = self.target(tuple(n + b + a for n, (b, a) in zip(si, pads)), [src])
        self.ops.append(op)
        return True

    def op_expand(self):
        srcs = self.readable(lambda s: math.prod(s) <= 64 and len(s) < 8)
        if not srcs:
            return False
        src = self.choice(srcs)
        si = self.shapes[src]
        out = tuple(self.dim(1, 4) if d == 1 else d for d in si)
        out = tuple(self.dim(1, 3) for _ in range(self.dim(0, 1))) + out
        op = {"op": "expand", "in": src}
        op["out"] = self.target(out, [src])
        self.ops.append(op)
        return True

    def op_permute(self):
        src = self.choice(self.readable())
        si = self.shapes[src]
        perm = self.draw(st.permutations(range(len(si))))
        op = {"op": "permute", "in": src, "perm": list(perm)}
        ids = self.ids.get(self.roots[src])
        op["out"] = self.target(tuple(si[p] for p in perm), [src])
        if ids is not None:
            self.ids[self.roots[op["out"]]] = ids
        self.ops.append(op)
        return True

    def op_cat(self):
        first = self.choice(self.readable())
        si = self.shapes[first]
        axis = self.draw(st.integers(0, len(si) - 1))
        fits = self.readable(lambda s: len(s) == len(si) and s[:axis] == si[:axis] and s[axis + 1:] == si[axis + 1:])
        ins = [first] + [self.choice(fits) for _ in range(self.draw(st.integers(0, 2)))]
        total = sum(self.shapes[b][axis] for b in ins)
        shape = si[:axis] + (total,) + si[axis + 1:]
        if math.prod(shape) > MAX_NUMEL:
            return False
        bounds = [self.ids.get(self.roots[b]) for b in ins]
        op = {"op": "cat", "inputs": ins, "axis": axis}
        op["out"] = self.target(shape, ins)
        if None not in bounds:
            self.ids[self.roots[op["out"]]] = max(bounds)
        self.ops.append(op)
        return True

    def op_slice(self):
        src = self.choice(self.readable())
        si = self.shapes[src]
        axis = self.draw(st.integers(0, len(si) - 1))
        step = self.dim(1, 3)
        n = self.dim(1, (si[axis] - 1) // step + 1)
        start = self.dim(0, si[axis] - 1 - (n - 1) * step)
        op = {"op": "slice", "in": src, "axis": axis, "start": start, "step": step}
        ids = self.ids.get(self.roots[src])
        op["out"] = self.target(si[:axis] + (n,) + si[axis + 1:], [src])
        if ids is not None:
            self.ids[self.roots[op["out"]]] = ids
        self.ops.append(op)
        return True

    def op_embedding(self):
        srcs = [b for b in self.readable(lambda s: len(s) < 8 and math.prod(s) <= 100) if self.roots[b] in self.ids]
        if not srcs:
            return False
        src = self.choice(srcs)
        w = self.weight_name()
        table = self.values(self.ids[self.roots[src]] + self.dim(0, 3), self.dim())
        self.arrays[f"{w}.table"] = table
        op = {"op": "embedding", "in": src, "weight": w}
        op["out"] = self.target(self.shapes[src] + (table.shape[1],), [src])
        self.ops.append(op)
        return True

    def op_constant(self):
        existing = sorted(set(self.shapes))
        shape = self.choice(existing) if existing and self.coin() else self.shape()
        w = self.weight_name()
        self.arrays[f"{w}.value"] = self.values(math.prod(shape))
        op = {"op": "constant", "weight": w}
        op["out"] = self.target(shape, [])
        self.ops.append(op)
        return True


# The op kinds to draw from: the ones with the most code paths more often.
OP_KINDS = sorted(OP_FIELDS) + ["conv2d"] * 3 + ["linear", "maxpool2d", "avgpool2d", "embedding", "embedding"]


@st.composite
def graphs(draw, max_ops=6, weighted_first=False):
    """(spec, arrays, id_bounds): a valid spec, its arrays, and per input V for inputs of token
    ids in [0, V) (input dtype "int64", or "float32" holding integers), else None.
    weighted_first: the first op is a linear or conv2d (weight arrays to mutate)."""
    g = _Graph(draw, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    for _ in range(draw(st.integers(1, 2))):
        kind = g.choice(["float32"] * 6 + ["ids", "int64", "bool"])
        if kind in ("ids", "int64"):  # token ids, as int64 or as integral float32 values
            bound = g.dim()
            b = g.add_buffer(g.shape(g.choice([1, 2])))
            g.ids[g.roots[b]] = bound
            g.input_dtypes.append("float32" if kind == "ids" else "int64")
        elif kind == "bool":  # a padding mask
            bound, b = None, g.add_buffer((g.dim(),))
            g.mask_inputs.add(b)
            g.input_dtypes.append("bool")
        else:
            bound, b = None, g.add_buffer(g.shape())
            g.input_dtypes.append("float32")
        g.inputs.append(b)
        g.id_bounds.append(bound)
        g.written.add(g.roots[b])
    n_ops = draw(st.integers(1, max_ops))
    if weighted_first:  # a linear or conv2d first: weight arrays to mutate
        (g.op_conv2d() if g.coin() else False) or g.op_linear()
    tries = 0
    while len(g.ops) < n_ops and tries < 4 * max_ops:
        tries += 1
        if g.coin(0.2):
            g.reshape()
        kind = g.choice(OP_KINDS)
        if not getattr(g, "op_" + kind)():
            continue
        if g.coin(0.1):
            g.ops[-1]["name"] = f"layer{len(g.ops)}.{kind}"
    if not g.ops:
        g.op_activation()
    if g.coin(0.1):
        g.add_buffer(g.shape())  # never written nor read
    last = g.ops[-1]["out"]
    outputs = [last] + [g.choice(g.readable()) for _ in range(draw(st.integers(0, 2)))]
    spec = {"format": "sparseprune.executable", "version": 1, "buffers": g.buffers, "inputs": g.inputs,
            "outputs": draw(st.permutations(outputs)), "ops": g.ops}
    if set(g.input_dtypes) != {"float32"} or g.coin(0.1):
        spec["input_dtypes"] = g.input_dtypes
    if g.coin(0.1):
        spec["metadata"] = {"producer": "test_plan_property", "n": [1, 2.5, None, True]}
    return spec, g.arrays, g.id_bounds


# --- running ------------------------------------------------------------------------------------------


_POISON_PLAN = _C.Plan(json.dumps({
    "format": "sparseprune.executable", "version": 1, "buffers": [{"shape": [1 << 12]}, {"shape": [1 << 12]}],
    "inputs": [0], "outputs": [1], "ops": [{"op": "affine", "in": 0, "out": 1, "scale": 1.0, "shift": 0.0}]}), {})
_POISON = np.full((64, 1 << 12), np.nan, dtype=F32)  # 2 MiB of the arena


def poison_arena():
    """Fills the calling thread's plan arena (shared by all plans) with NaN."""
    _POISON_PLAN.run([_POISON], 1)


def make_inputs(layout, id_bounds, batch, seed):
    """Random inputs for a validated spec: float32, int64 ids, or bool masks (mostly False)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, dtype, bound in zip(layout.input_shapes, layout.input_dtypes, id_bounds):
        shape = (batch, *shape)
        if dtype == "bool":
            out.append(rng.random(shape) < 0.3)
        elif dtype == "int64" or bound:
            ids = rng.integers(0, bound or 1, size=shape)
            out.append(ids if dtype == "int64" else ids.astype(F32))
        else:
            out.append(rng.standard_normal(shape).astype(F32))
    return out


def reference(spec, arrays, inputs):
    with np.errstate(over="ignore", invalid="ignore"):  # extreme (valid) scales overflow to inf
        return run_reference(spec, arrays, inputs)


def _scale(a):
    """The largest finite magnitude in `a`, at least 1."""
    finite = np.abs(a[np.isfinite(a)])
    return max(float(finite.max()) if finite.size else 0.0, 1.0)


def as_list(outs):
    return list(outs) if isinstance(outs, tuple) else [outs]


def assert_close(got, ref, rtol=RTOL, what=""):
    """Elementwise within rtol of the reference, with atol rtol * (its largest magnitude, >= 1)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == F32, what
    assert got.shape == ref.shape, what
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * _scale(ref), err_msg=what)


def check_runs_like_reference(spec, arrays, id_bounds, seed=0):
    """Executable and a plan built from the raw spec both equal the reference for every batch
    size; 1 and 3 threads agree (to THREAD_RTOL); returns how many runs were bitwise equal
    across thread counts and how many were compared."""
    layout = validate(spec, arrays)
    exe = Executable.from_spec(spec, arrays)
    direct = _C.Plan(json.dumps(spec), arrays)
    equal = total = 0
    for batch in BATCHES:
        inputs = make_inputs(layout, id_bounds, batch, seed + batch)
        try:
            ref = reference(spec, arrays, inputs)
        except ValueError as exc:  # ids that are not rows of an embedding table: the plan refuses them too
            assert "embedding" in str(exc)
            with pytest.raises(ValueError, match="embedding"):
                exe.run(*inputs)
            return equal, total
        ref3, runs = ref, {}
        for k in (1, 2, 3):
            poison_arena()
            runs[k] = as_list(exe.run(*inputs, n_threads=k))
            assert len(runs[k]) == len(ref)
            for i, (g, r) in enumerate(zip(runs[k], ref)):
                assert_close(g, r, what=f"output {i}, batch {batch}, {k} threads")
        for i, (one, three) in enumerate(zip(runs[1], runs[3])):
            total += 1
            equal += bool(np.array_equal(one, three, equal_nan=True))
            np.testing.assert_allclose(three, one, rtol=THREAD_RTOL, atol=THREAD_RTOL * _scale(one),
                                       err_msg=f"output {i}, batch {batch}: 3 threads vs 1")
        poison_arena()
        raw = direct.run([np.asarray(x, dtype=F32) for x in inputs], 1)
        for i, (g, w) in enumerate(zip(raw, runs[1])):
            np.testing.assert_array_equal(g, w, err_msg=f"output {i}, batch {batch}: plan of the raw spec")
    # A batch large enough for the kernels to split work across threads: 1 and 3 threads agree,
    # and its first samples (the batch-3 inputs again) still match the reference.
    inputs = make_inputs(layout, id_bounds, BIG_BATCH, seed + BIG_BATCH)
    small = make_inputs(layout, id_bounds, 3, seed + 3)
    for x, x3 in zip(inputs, small):
        x[:3] = x3
    big = {}
    for k in (1, 3):
        poison_arena()
        big[k] = as_list(exe.run(*inputs, n_threads=k))
    for i, (one, three, r) in enumerate(zip(big[1], big[3], ref3)):
        total += 1
        equal += bool(np.array_equal(one, three, equal_nan=True))
        np.testing.assert_allclose(three, one, rtol=THREAD_RTOL, atol=THREAD_RTOL * _scale(one),
                                   err_msg=f"output {i}, batch {BIG_BATCH}: 3 threads vs 1")
        assert_close(one[:3], r, what=f"output {i}, the first 3 samples of batch {BIG_BATCH}")
    return equal, total


@settings(max_examples=500, **SETTINGS)
@given(case=graphs())
def test_random_valid_specs_run_like_the_reference(case):
    """A valid spec runs like the reference: batch sizes 0, 1, 3 (and 48), 1 to 3 threads."""
    spec, arrays, id_bounds = case
    validate(spec, arrays)  # the generator makes valid specs only
    for op in spec["ops"]:
        event(f"op {op['op']}")
    event(f"{len(spec['ops'])} ops")
    equal, total = check_runs_like_reference(spec, arrays, id_bounds)
    event(f"threads bitwise equal: {equal == total}")
    if equal != total:
        event("unequal with: " + ",".join(sorted({op['op'] for op in spec['ops']})))


# --- one mutation of a valid spec ---------------------------------------------------------------------


BAD_VALUES = [None, "x", "", 1.5, -0.5, True, False, [], [1], {}, {"a": 1}, -1, 0, 1, 3, 9, 2**31 - 1, 2**31,
              2**32, 2**63 - 1, 2**63, 2**70, -(2**70), 10**400, float("nan"), float("inf"), float("-inf"), 1e39]
BAD_INDICES = [-1, 2**31, 2**32 + 1, 2**40, -(2**40), 2**62, 2**63 - 1, -(2**63)]
BAD_DTYPES = [np.float64, np.float16, np.int32, np.int64, np.int16, np.uint8, np.uint64, np.bool_,
              np.dtype(">f4"), np.dtype(">i8"), np.complex64]
BUFFER_FIELDS = ("in", "out", "a", "b", "q", "k", "v", "residual", "key_mask")


def _op_paths(spec):
    """(path, value) of every field of every op and buffer, and of the top level."""
    paths = [((key,), spec[key]) for key in spec]
    for i, b in enumerate(spec["buffers"]):
        paths += [(("buffers", i, key), v) for key, v in b.items()]
    for i, op in enumerate(spec["ops"]):
        paths += [(("ops", i, key), v) for key, v in op.items()]
    return paths


def _get(spec, path):
    for key in path:
        spec = spec[key]
    return spec


def _set(spec, path, value):
    _get(spec, path[:-1])[path[-1]] = value


def mutate(data, spec, arrays):
    """Applies one random mutation to `spec` / `arrays` (in place); returns (kind, description)."""
    draw = data.draw
    n_buf = len(spec["buffers"])
    index_arrays = [k for k in sorted(arrays) if k.endswith((".indices", ".taps")) and arrays[k].size]
    ptr_arrays = [k for k in sorted(arrays) if k.endswith((".indptr", ".row_ptr"))]
    # (the first kind is drawn most often: hypothesis favours small numbers)
    kinds = ["index"] * 2 * bool(index_arrays) + ["pointers"] * 2 * bool(ptr_arrays)
    if arrays:
        kinds += ["array_dtype", "array_length", "array_ndim", "array_missing", "array_extra", "array_type",
                  "array_layout"]
    kinds += ["set", "set_element", "buffer_id", "shape", "eps", "drop", "unknown_field", "op_kind", "reorder",
              "set", "set_element", "eps"]
    kind = kinds[draw(st.integers(0, 10**6), label="mutation") % len(kinds)]
    paths = _op_paths(spec)
    if kind == "drop":
        path, _ = draw(st.sampled_from(paths))
        del _get(spec, path[:-1])[path[-1]]
        return kind, f"drop {path}"
    if kind == "set":
        path, _ = draw(st.sampled_from(paths))
        value = draw(st.sampled_from(BAD_VALUES))
        _set(spec, path, value)
        return kind, f"set {path} = {value!r:.40}"
    if kind == "set_element":
        lists = [(p, v) for p, v in paths if isinstance(v, list) and v and not isinstance(v[0], dict)]
        path, value = draw(st.sampled_from(lists))
        i = draw(st.integers(0, len(value) - 1))
        bad = draw(st.sampled_from(BAD_VALUES))
        value[i] = bad
        return kind, f"set {path}[{i}] = {bad!r:.40}"
    if kind == "buffer_id":
        fields = [p for p, v in paths if p[-1] in BUFFER_FIELDS or p[-1] == "alias_of"]
        fields += [("inputs",), ("outputs",)] + [p for p, v in paths if p[-1] == "inputs" and p[0] == "ops"]
        path = draw(st.sampled_from(fields))
        bad = draw(st.sampled_from([n_buf, n_buf + 1, n_buf + 7, 2**30, 2**30 + 1, 2**31 - 1, -1, -(2**31)]))
        value = _get(spec, path)
        if isinstance(value, list):
            i = draw(st.integers(0, len(value) - 1))
            value[i] = bad
            return kind, f"buffer id {path}[{i}] = {bad}"
        _set(spec, path, bad)
        return kind, f"buffer id {path} = {bad}"
    if kind == "unknown_field":
        where = draw(st.sampled_from(["top", "buffer", "op"]))
        obj = spec if where == "top" else draw(st.sampled_from(spec["buffers" if where == "buffer" else "ops"]))
        obj["zz_unknown"] = 1
        return kind, f"unknown field in {where}"
    if kind == "op_kind":
        op = draw(st.sampled_from(spec["ops"]))
        op["op"] = draw(st.sampled_from(sorted(OP_FIELDS) + ["fft", "Linear", ""]))
        return kind, f"op kind = {op['op']}"
    if kind == "reorder":
        ops = spec["ops"]
        i, j = draw(st.integers(0, len(ops) - 1)), draw(st.integers(0, len(ops) - 1))
        how = draw(st.sampled_from(["swap", "delete", "duplicate"]))
        if how == "swap":
            ops[i], ops[j] = ops[j], ops[i]
        elif how == "delete":
            del ops[i]
        else:
            ops.insert(j, copy.deepcopy(ops[i]))
        return kind, f"ops {how}"
    if kind == "shape":
        b = draw(st.sampled_from(spec["buffers"]))
        how = draw(st.sampled_from(["grow", "shrink", "append", "drop", "zero", "huge", "rank9", "transpose"]))
        shape, d = b["shape"], draw(st.integers(0, len(b["shape"]) - 1))
        if how == "grow":
            shape[d] += 1
        elif how == "shrink":
            shape[d] -= 1  # may reach 0
        elif how == "append":
            shape.append(1)
        elif how == "drop" and len(shape) > 1:
            shape.pop(d)
        elif how == "zero":
            shape[d] = 0
        elif how == "huge":
            shape[d] = draw(st.sampled_from([2**31, 2**31 + 1, 2**33, 2**62]))
        elif how == "rank9":
            b["shape"] = shape + [1] * (9 - len(shape))
        else:
            shape.reverse()
        return kind, f"buffer shape {how}"
    if kind == "eps":
        norms = [op for op in spec["ops"] if op["op"] in ("layernorm", "affine", "matmul", "attention")]
        if not norms:
            return kind, "nothing to mutate"
        op = draw(st.sampled_from(norms))
        key = "eps" if op["op"] == "layernorm" else "scale"
        op[key] = draw(st.sampled_from([0, 0.0, -1e-5, 1e-50, 1e-40, 3.4e38, 1e39, 10**400, float("nan"), True,
                                        "1e-5", 2**70]))
        return kind, f"{op['op']}.{key} = {op[key]!r:.40}"
    if kind == "array_dtype":
        name = draw(st.sampled_from(sorted(arrays)))
        dtype = draw(st.sampled_from(BAD_DTYPES))
        with np.errstate(all="ignore"):
            arrays[name] = arrays[name].astype(dtype)
        return kind, f"array {name} dtype {np.dtype(dtype)}"
    if kind == "array_length":
        name = draw(st.sampled_from(sorted(arrays)))
        a = arrays[name]
        how = draw(st.sampled_from(["drop_last", "empty", "append"]))
        if how == "drop_last":
            arrays[name] = a[:-1].copy()
        elif how == "empty":
            arrays[name] = a[:0].copy()
        else:
            arrays[name] = np.concatenate([a, a[-1:] if a.size else np.zeros((1,) + a.shape[1:], a.dtype)])
        return kind, f"array {name} {how}"
    if kind == "array_ndim":
        name = draw(st.sampled_from(sorted(arrays)))
        a = arrays[name]
        how = draw(st.sampled_from(["column", "row", "scalar", "flat"]))
        arrays[name] = {"column": a.reshape(-1, 1), "row": a.reshape(1, -1), "flat": a.reshape(-1),
                        "scalar": a.reshape(-1)[:1].reshape(())}[how].copy() if a.size else a.reshape(0, 1)
        return kind, f"array {name} {how}"
    if kind == "array_missing":
        name = draw(st.sampled_from(sorted(arrays)))
        del arrays[name]
        return kind, f"array {name} missing"
    if kind == "array_extra":
        arrays[draw(st.sampled_from(["zz.extra", "w0_0.bias", "w1_0.bias", "w0_0.weight"]))] = np.zeros(3, F32)
        return kind, "array extra"
    if kind == "array_type":
        name = draw(st.sampled_from(sorted(arrays)))
        arrays[name] = draw(st.sampled_from([arrays[name].tolist(), None, 1.0, "array"]))
        return kind, f"array {name} not an ndarray"
    if kind == "array_layout":  # the same values, not C-contiguous: valid
        name = draw(st.sampled_from(sorted(arrays)))
        a = arrays[name]
        twice = np.repeat(a, 2, axis=0)
        arrays[name] = twice[::2] if a.ndim == 1 else np.asfortranarray(a)
        return kind, f"array {name} strided"
    if kind == "index":
        name = draw(st.sampled_from(index_arrays))
        a = arrays[name].astype(np.int64)
        i = draw(st.integers(0, a.size - 1))
        w = name.rsplit(".", 1)[0]
        op = next(op for op in spec["ops"] if op.get("weight") == w)
        if op["op"] == "linear":
            bound = -(-op["cols"] // op["block"][1])
        else:
            bound = op["in_channels"] // op["groups"] * op["kernel"][0] * op["kernel"][1]
        a[i] = draw(st.sampled_from([bound, bound + 1, *BAD_INDICES, "duplicate"] if a.size > 1 else
                                    [bound, bound + 1, *BAD_INDICES]).map(lambda v: a[i - 1] if v == "duplicate" else v))
        arrays[name] = a
        return kind, f"array {name}[{i}] = {a[i]}"
    if kind == "pointers":
        name = draw(st.sampled_from(ptr_arrays))
        a = arrays[name].copy()
        how = draw(st.sampled_from(["swap", "first", "last+1", "last-1", "huge", "negative", "min", "dip"]))
        i = draw(st.integers(0, a.size - 1))
        if how == "swap" and a.size > 2:
            j = min(i + 1, a.size - 1)
            a[i], a[j] = a[j], a[i]
        elif how == "first":
            a[0] = 1
        elif how == "last+1":
            a[-1] += 1
        elif how == "last-1":
            a[-1] -= 1
        elif how == "huge":
            a[i] = 2**62
        elif how == "negative":
            a[i] = -1
        elif how == "min":
            a[i] = -(2**63)
        elif how == "dip" and a[i] > 0:
            a[i] -= 1  # may be non-monotone or leave a row empty (valid)
        arrays[name] = a
        return kind, f"array {name} pointers {how}"
    raise AssertionError(kind)


def native_run(plan, seed=0):
    """Runs a plan on random float inputs of its shapes; returns the outputs per batch size."""
    rng = np.random.default_rng(seed)
    outs = {}
    for batch in BATCHES:
        inputs = [rng.standard_normal((batch, *s)).astype(F32) for s in plan.input_shapes]
        poison_arena()
        outs[batch] = plan.run(inputs, 1)
    return outs


# Rules validate() checks and the native plan deliberately leaves to Python, none of which guards
# memory: a spec refused only for one of these may still build natively (and must run safely).
# (regex on validate()'s message, why the native plan may accept it[, for which ops: the regex's
# group is the op index])
_ELEMENTWISE = {"activation", "add", "mul", "affine"}
NATIVE_LENIENT = [
    (r"has unknown field", "the native plan reads only the fields it knows"),
    (r"is not used by any op", "the native plan reads only the arrays its ops name"),
    (r"spec\.input_dtypes", "input dtypes are Executable.run's business"),
    (r"spec\.metadata", "metadata is not executed"),
    (r"\.name must be a string", "names are for messages only"),
    (r"\.(?:activation|kind) must be .*, got ''$", "the native plan reads an empty activation as none"),
    (r"\.eps must be a finite number", "eps is cast to float32 and checked > 0 (True is 1, 1e39 is inf)"),
    (r"taps' holds \d+ twice in row", "a conv tap stored twice is summed (the sparse rows stay in bounds)"),
    (r"\.(?:indptr|row_ptr)' must be int64, got int32", "row pointers are read as int32 or int64, like indices"),
    (r"^spec\.ops\[(\d+)\][^:]*: (?:output buffer \d+ must have shape|a \(.*\) and b \(.*\) must have the same shape)",
     "elementwise ops: the native plan checks element counts only", lambda op: op["op"] in _ELEMENTWISE),
    (r"^spec\.ops\[(\d+)\][^:]*\.block", "a dense linear has no block (the native plan ignores it)",
     lambda op: op["op"] == "linear" and op.get("format") == "dense"),
]


def native_leniency(spec, message):
    """Why the native plan may build `spec`, which validate() refused with `message`; or None."""
    for pattern, why, *applies in NATIVE_LENIENT:
        m = re.search(pattern, message)
        if m and (not applies or applies[0](spec["ops"][int(m.group(1))])):
            return why
    return None


def has_extreme_scalar(spec, limit=1e30):
    """Whether some op's scale / shift / eps is so large that float32 math overflows."""
    return any(isinstance(op.get(key), (int, float)) and not isinstance(op.get(key), bool) and abs(op[key]) > limit
               for op in spec["ops"] for key in ("scale", "shift", "eps"))


def small_enough_to_run(spec, limit=1 << 20):
    """Whether all buffers of a (natively accepted) spec hold at most `limit` elements per sample."""
    return sum(math.prod(b["shape"]) for b in spec["buffers"]) <= limit


@settings(max_examples=800, **SETTINGS)
@given(case=graphs(max_ops=3, weighted_first=True), data=st.data())
def test_one_mutation_is_refused_cleanly_or_still_valid(case, data):
    """After one mutation: validate() and Executable.from_spec raise ValueError / TypeError only;
    a spec they still accept runs like the reference; the native plan given the spec directly
    refuses it with ValueError / TypeError, or builds it only for a rule that guards no memory
    (NATIVE_LENIENT) and then runs in bounds."""
    spec, arrays, id_bounds = case
    spec, arrays = copy.deepcopy(spec), dict(arrays)
    inputs = list(spec["inputs"])
    kind, what = mutate(data, spec, arrays)
    if spec.get("inputs") != inputs:
        id_bounds = [None] * len(id_bounds)
    event(f"mutation: {kind}")
    try:
        validate(copy.deepcopy(spec), arrays)
        refused = None
    except (ValueError, TypeError) as exc:  # SpecError is a ValueError; nothing else may escape
        refused = str(exc)
    if refused is None:
        event("still valid")
        if has_extreme_scalar(spec):
            # e.g. an attention scale of 3.4e38: float32 overflows to inf/NaN where the float64
            # reference does not. Valid, and it must run; the values are not comparable.
            event("still valid: extreme scalar, run only")
            try:
                native_run(_C.Plan(json.dumps(spec), arrays))
            except ValueError as exc:  # random float inputs are no valid token ids
                assert "embedding" in str(exc)
            return
        try:
            check_runs_like_reference(spec, arrays, id_bounds)  # also builds the plan of the raw spec
        except ValueError as exc:  # a mutated embedding table can make the drawn ids invalid: a data error
            if "embedding" not in str(exc):
                raise
            event("still valid: ids out of the mutated table, a clean ValueError")
        return
    with pytest.raises((ValueError, TypeError)):
        Executable.from_spec(copy.deepcopy(spec), arrays)
    try:
        plan = _C.Plan(json.dumps(spec), arrays)
    except (ValueError, TypeError):
        return
    why = native_leniency(spec, refused)
    assert why is not None, f"{what}: the native plan builds a spec validate() refuses: {refused}"
    event(f"native accepts: {why}")
    if not small_enough_to_run(spec):  # up to the 2**28 elements per sample both sides allow: GiBs
        return
    try:
        native_run(plan)  # in bounds: must neither crash nor raise anything but a data error
    except ValueError as exc:
        assert "embedding" in str(exc)


# --- regressions: native bugs these properties found (fixed) ---------------------------------------


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
def test_pool_window_past_the_right_edge(kind):
    # W = 1, kernel 3, padding 1, stride 2: the window's last column lies past the row; the native
    # plan used to read the next row's first element (and past the buffer for the last row).
    spec = {"format": "sparseprune.executable", "version": 1, "buffers": [{"shape": [1, 2, 1]}, {"shape": [1, 2, 1]}],
            "inputs": [0], "outputs": [1],
            "ops": [{"op": kind, "in": 0, "out": 1, "kernel": [1, 3], "stride": [1, 2], "padding": [0, 1]}]}
    x = np.array([[[[1.0], [2.0]]]], F32)
    ref = run_reference(spec, {}, [x])[0]  # max: [1, 2]; avg (count_include_pad): [1/3, 2/3]
    np.testing.assert_allclose(Executable.from_spec(spec, {}).run(x), ref, rtol=1e-6)


def test_native_layernorm_eps_beyond_double_is_a_value_error():
    spec = {"format": "sparseprune.executable", "version": 1, "buffers": [{"shape": [3]}, {"shape": [3]}],
            "inputs": [0], "outputs": [1], "ops": [{"op": "layernorm", "in": 0, "out": 1, "weight": "n", "eps": 10**400}]}
    arrays = {"n.gamma": np.ones(3, F32), "n.beta": np.zeros(3, F32)}
    with pytest.raises(ValueError, match="eps"):
        _C.Plan(json.dumps(spec), arrays)


def test_native_alias_of_beyond_int32_is_refused():
    spec = {"format": "sparseprune.executable", "version": 1,
            "buffers": [{"shape": [2, 3]}, {"shape": [2, 3]}, {"shape": [6], "alias_of": 2**32 + 1}],
            "inputs": [0], "outputs": [2], "ops": [{"op": "affine", "in": 0, "out": 1, "scale": 2.0, "shift": 0.0}]}
    with pytest.raises(SpecError, match="alias_of"):
        validate(spec, {})
    with pytest.raises(ValueError, match="alias_of"):
        _C.Plan(json.dumps(spec), {})


def test_native_buffer_sizes_cannot_overflow():
    # 5 * 2147418113 * 1718039348 == 2**64 + 4: the element count used to wrap to 4 (then a crash).
    spec = {"format": "sparseprune.executable", "version": 1,
            "buffers": [{"shape": [4]}, {"shape": [5, 2147418113, 1718039348], "alias_of": 0},
                        {"shape": [1718039348, 5, 2147418113]}, {"shape": [4], "alias_of": 2}],
            "inputs": [0], "outputs": [3], "ops": [{"op": "permute", "in": 1, "out": 2, "perm": [2, 0, 1]}]}
    with pytest.raises(ValueError, match="too large"):
        _C.Plan(json.dumps(spec), {})


def test_native_refuses_more_storage_per_sample_than_the_validator():
    # the same limit on both sides: 2**28 float32 elements per sample over all storage-owning buffers
    spec = {"format": "sparseprune.executable", "version": 1,
            "buffers": [{"shape": [1 << 27]}, {"shape": [1 << 27]}, {"shape": [8]}],
            "inputs": [0], "outputs": [1], "ops": [{"op": "affine", "in": 0, "out": 1, "scale": 1.0, "shift": 1.0}]}
    with pytest.raises(SpecError, match="elements per sample"):
        validate(spec, {})
    with pytest.raises(ValueError, match="elements per sample"):
        _C.Plan(json.dumps(spec), {})
