"""A slow, obviously correct numpy executor for executable specs: the reference the native plan is
tested against. It densifies every weight and runs each op with plain numpy; use it for tests and
for debugging a spec, never for speed. numpy only (no torch).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sparseprune.runtime.spec import PlanLayout, kernel_at, validate

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(x: np.ndarray, kind) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # inf and NaN as torch gives them
        return _activate(x, kind).astype(np.float32)


def _activate(x: np.ndarray, kind) -> np.ndarray:
    if kind is None:
        y = x
    elif kind == "relu":
        y = np.maximum(x, 0.0)
    elif kind == "relu6":
        y = np.clip(x, 0.0, 6.0)
    elif kind == "gelu":
        y = 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    elif kind == "silu":
        y = x / (1.0 + np.exp(-x))
    elif kind == "sigmoid":
        y = 1.0 / (1.0 + np.exp(-x))
    elif kind == "tanh":
        y = np.tanh(x)
    elif kind == "hardswish":
        y = x * np.clip(x + 3.0, 0.0, 6.0) / 6.0
    elif kind == "gelu_tanh":  # torch's gelu(approximate="tanh")
        y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    elif kind == "hardsigmoid":
        y = np.clip(x + 3.0, 0.0, 6.0) / 6.0
    elif kind == "sqrt":
        y = np.sqrt(x)
    elif kind == "rsqrt":
        y = 1.0 / np.sqrt(x)
    elif kind == "exp":
        y = np.exp(x)
    else:
        raise ValueError(f"unknown activation {kind!r}")
    return y


def dense_linear_weight(op: Mapping, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The dense [rows, cols] matrix a linear op's arrays hold (csr, bsr or dense format)."""
    w, (r, c), rows, cols = op["weight"], op["block"], op["rows"], op["cols"]
    if op["format"] == "dense":
        return np.asarray(arrays[f"{w}.weight"], dtype=np.float32).reshape(rows, cols)
    indptr, indices, values = arrays[f"{w}.indptr"], arrays[f"{w}.indices"], arrays[f"{w}.values"]
    nbr, nbc = -(-rows // r), -(-cols // c)
    blocks = np.zeros((nbr, nbc, c, r), dtype=np.float32)  # column-major inside a block
    block_row = np.repeat(np.arange(nbr), np.diff(indptr))
    blocks[block_row, indices] = values.reshape(-1, c, r)
    return blocks.transpose(0, 3, 1, 2).reshape(nbr * r, nbc * c)[:rows, :cols]


def dense_conv_weight(op: Mapping, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The dense [out, in/groups, kh, kw] filter bank a conv2d op's arrays hold."""
    w, (kh, kw) = op["weight"], op["kernel"]
    if op.get("format", "sparse") == "dense":
        return arrays[f"{w}.weight"]
    cout, cin_g = op["out_channels"], op["in_channels"] // op["groups"]
    row_ptr, taps, values = arrays[f"{w}.row_ptr"], arrays[f"{w}.taps"], arrays[f"{w}.values"]
    flat = np.zeros((cout, cin_g * kh * kw), dtype=np.float32)
    flat[np.repeat(np.arange(cout), np.diff(row_ptr)), taps] = values
    return flat.reshape(cout, cin_g, kh, kw)


def _conv2d(x: np.ndarray, weight: np.ndarray, op: Mapping) -> np.ndarray:
    (sh, sw), (ph, pw), (dh, dw), g = op["stride"], op["padding"], op["dilation"], op["groups"]
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = weight.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, cout, oh, ow))
    cout_g = cout // g
    for gi in range(g):
        xs = xp[:, gi * cin_g:(gi + 1) * cin_g]
        ws = weight[gi * cout_g:(gi + 1) * cout_g].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                out[:, gi * cout_g:(gi + 1) * cout_g] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def _pool(x: np.ndarray, op: Mapping, is_max: bool) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = op["kernel"], op["stride"], op["padding"]
    n, c, h, w = x.shape
    fill = -np.inf if is_max else 0.0
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    windows = [xp[:, :, i: i + sh * (oh - 1) + 1: sh, j: j + sw * (ow - 1) + 1: sw]
               for i in range(kh) for j in range(kw)]
    stacked = np.stack(windows)
    return stacked.max(axis=0) if is_max else stacked.sum(axis=0) / (kh * kw)  # count_include_pad


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, op: Mapping, key_mask=None, mask=None) -> np.ndarray:
    """q [batch, ..., L, D], k [batch, ..., S, D], v [batch, ..., S, Dv] (leading dims equal) ->
    [batch, ..., L, Dv], in float64. key_mask [batch, S]: nonzero keys get no weight. mask
    [batch, ...] broadcasting to the scores [batch, ..., L, S]: op["mask_kind"] "bool" (nonzero =
    may attend) or "additive"; with it, a row with no key left gives zeros (as torch's SDPA)."""
    scores = op["scale"] * (q @ np.swapaxes(k, -1, -2))
    if mask is not None:
        mask = mask.astype(np.float64).reshape((mask.shape[0],) + (1,) * (scores.ndim - mask.ndim) + mask.shape[1:])
        scores = np.where(mask != 0, scores, -np.inf) if op["mask_kind"] == "bool" else scores + mask
    if op["causal"]:
        n_q, n_k = scores.shape[-2:]
        scores = np.where(np.arange(n_k)[None, :] > np.arange(n_q)[:, None], -np.inf, scores)
    if key_mask is not None:
        masked = (key_mask != 0).reshape((key_mask.shape[0],) + (1,) * (scores.ndim - 2) + (key_mask.shape[1],))
        scores = np.where(masked, -np.inf, scores)
    with np.errstate(invalid="ignore"):  # a row with every key masked is NaN, as in torch
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
    if mask is not None:
        p = np.where((scores == -np.inf).all(axis=-1, keepdims=True), 0.0, p)
    return p @ v


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(batch, rows, heads * d) -> (batch, heads, rows, d)."""
    n, rows, e = x.shape
    return x.reshape(n, rows, heads, e // heads).transpose(0, 2, 1, 3)


def _batch_broadcastable(x: np.ndarray, rank: int) -> np.ndarray:
    """(batch, *shape) as float64 with 1s inserted after the batch up to `rank` per-sample dims, so
    numpy broadcasts the per-sample shapes right-aligned (not against the batch)."""
    return x.astype(np.float64).reshape((x.shape[0],) + (1,) * (rank + 1 - x.ndim) + x.shape[1:])


def _embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.float64)
    ok = np.isfinite(ids) & (ids >= 0) & (ids < table.shape[0])
    ok &= np.floor(np.where(ok, ids, 0)) == ids
    if not ok.all():
        flat = ids.reshape(ids.shape[0], -1)  # the native plan's message: sample, index within it
        sample, index = (int(i) for i in np.argwhere(~ok.reshape(flat.shape))[0])
        v = flat[sample, index]
        shown = str(int(v)) if np.isfinite(v) and v == np.floor(v) else str(v)
        raise ValueError(f"(embedding): sample {sample} holds {shown} at index {index}, not a row of the table "
                         f"[0, {table.shape[0]})")
    return table.astype(np.float64)[ids.astype(np.int64)]


def run_reference(spec: Mapping, arrays: Mapping[str, np.ndarray], inputs: Sequence[np.ndarray],
                  kernels: Optional[List[Tuple[int, str]]] = None) -> List[np.ndarray]:
    """Run `spec` on `inputs` (each [batch, *per-sample shape]) with plain numpy.

    Every buffer holds float32 between ops, as in the native plan; each op computes in float64.
    Inputs are converted to float32 (for "int64" inputs: integer token ids). An embedding id that
    is not an integer in [0, rows) raises ValueError. A spec with dims runs at the dim values the
    inputs' shapes give (checked like every other shape rule). kernels: when given, (op index,
    kernel) is appended for every linear / conv2d op, the kernel the native plan runs at this batch
    (spec.kernel_at; the reference computes the same math whatever the kernel)."""
    layout: PlanLayout = validate(spec, arrays)
    if len(inputs) != len(layout.input_shapes):
        raise ValueError(f"expected {len(layout.input_shapes)} inputs, got {len(inputs)}")
    env = layout.infer_dims([np.shape(x) for x in inputs])
    if env:
        validate(spec, arrays, at=env)
    shapes = layout.concrete_shapes(env)
    batch = np.shape(inputs[0])[0]
    storage: Dict[int, np.ndarray] = {}

    def read(b: int) -> np.ndarray:
        return storage[layout.roots[b]].reshape((batch,) + shapes[b])

    def write(b: int, value: np.ndarray) -> None:
        numel = math.prod(shapes[b])  # not -1: that cannot reshape a batch of 0
        storage[layout.roots[b]] = np.asarray(value, dtype=np.float32).reshape(batch, numel).copy()

    for b, x in zip(layout.spec["inputs"], inputs):
        write(b, x)
    for index, op in enumerate(layout.spec["ops"]):
        kind = op["op"]
        if kernels is not None and kind in ("linear", "conv2d"):
            rows = batch * math.prod(shapes[op["in"]][:-1]) if kind == "linear" else batch
            kernels.append((index, kernel_at(op, rows)))
        if kind == "linear":
            x = read(op["in"]).astype(np.float64)
            y = x @ dense_linear_weight(op, arrays).T.astype(np.float64)
            bias = arrays.get(f"{op['weight']}.bias")
            if bias is not None:
                y = y + bias
            write(op["out"], activate(y, op["activation"]))
        elif kind == "conv2d":
            y = _conv2d(read(op["in"]), dense_conv_weight(op, arrays), op)
            bias = arrays.get(f"{op['weight']}.bias")
            if bias is not None:
                y = y + bias.reshape(1, -1, 1, 1)
            if "residual" in op:
                y = y + read(op["residual"]).astype(np.float64)
            write(op["out"], activate(y, op["activation"]))
        elif kind == "activation":
            write(op["out"], activate(read(op["in"]), op["kind"]))
        elif kind == "affine":
            y = read(op["in"]).astype(np.float64) * op["scale"] + op["shift"]
            write(op["out"], activate(y, op["activation"]))
        elif kind == "matmul":
            a, b = read(op["a"]).astype(np.float64), read(op["b"]).astype(np.float64)
            write(op["out"], op["scale"] * (a @ (np.swapaxes(b, -1, -2) if op["transpose_b"] else b)))
        elif kind == "attention":
            q, k, v = (read(op[key]).astype(np.float64) for key in ("q", "k", "v"))
            masks = [read(op[key]) if key in op else None for key in ("key_mask", "mask")]
            if op["layout"] == "sequence_first":  # (batch, rows, heads * dim), head h at columns h * dim
                y = _attention(_heads(q, op["heads"]), _heads(k, op["heads"]), _heads(v, op["heads"]), op, *masks)
                y = y.transpose(0, 2, 1, 3).reshape(batch, q.shape[1], v.shape[2])
            else:
                y = _attention(q, k, v, op, *masks)
            write(op["out"], y)
        elif kind == "permute":
            write(op["out"], np.transpose(read(op["in"]), (0,) + tuple(p + 1 for p in op["perm"])))
        elif kind == "slice":
            x, axis = read(op["in"]), op["axis"] + 1
            n = shapes[op["out"]][op["axis"]]
            index = [slice(None)] * x.ndim
            index[axis] = slice(op["start"], op["start"] + (n - 1) * op["step"] + 1, op["step"])
            write(op["out"], x[tuple(index)])
        elif kind == "cat":
            write(op["out"], np.concatenate([read(b) for b in op["inputs"]], axis=op["axis"] + 1))
        elif kind == "embedding":
            write(op["out"], _embedding(read(op["in"]), arrays[f"{op['weight']}.table"]))
        elif kind == "constant":  # the leading block of the value (stored at the dims' max values)
            so = shapes[op["out"]]
            value = arrays[f"{op['weight']}.value"].reshape(op.get("shape", so))[tuple(slice(0, d) for d in so)]
            write(op["out"], np.broadcast_to(value, (batch,) + value.shape))
        elif kind in ("add", "sub", "mul", "div"):
            rank = len(shapes[op["out"]])
            a, b = (_batch_broadcastable(read(op[key]), rank) for key in ("a", "b"))
            with np.errstate(divide="ignore", invalid="ignore"):  # x / 0 and 0 / 0 as in torch
                y = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[kind](a, b)
            write(op["out"], activate(y, op["activation"]))
        elif kind in ("maxpool2d", "avgpool2d"):
            write(op["out"], _pool(read(op["in"]), op, kind == "maxpool2d"))
        elif kind == "global_avgpool":
            write(op["out"], read(op["in"]).astype(np.float64).mean(axis=(2, 3)))
        elif kind == "reduce":
            x = read(op["in"]).astype(np.float64)
            axes = tuple(a + 1 for a in op["axes"])
            with np.errstate(invalid="ignore"):  # inf - inf is NaN, as in torch
                write(op["out"], x.mean(axis=axes) if op["kind"] == "mean" else x.sum(axis=axes))
        elif kind == "pad":
            x = read(op["in"])
            write(op["out"], np.pad(x, [(0, 0)] + [tuple(p) for p in op["pads"]], constant_values=op["value"]))
        elif kind == "expand":
            x = read(op["in"])
            out_shape = shapes[op["out"]]
            write(op["out"], np.broadcast_to(_batch_broadcastable(x, len(out_shape)), (batch,) + out_shape))
        elif kind == "softmax":
            x = read(op["in"]).astype(np.float64)
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            write(op["out"], e / e.sum(axis=-1, keepdims=True))
        elif kind == "layernorm":
            x = read(op["in"]).astype(np.float64)
            mean, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
            gamma, beta = arrays[f"{op['weight']}.gamma"], arrays[f"{op['weight']}.beta"]
            write(op["out"], (x - mean) / np.sqrt(var + op["eps"]) * gamma + beta)
        else:  # pragma: no cover - validate() refuses unknown ops
            raise ValueError(f"unknown op {kind!r}")
    return [read(b).copy() for b in layout.spec["outputs"]]
