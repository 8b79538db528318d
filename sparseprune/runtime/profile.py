"""Where an executable's time goes: each op's median wall time, its share of the call, its kernel
and format, and for weighted layers the achieved GFLOP/s (useful: nonzero weights only; dense
equivalent: as if every weight were there), as DeepSparse's per-layer analysis reported it.

The native plan adds each op's wall time to a float64 array when asked (Plan.run's op_seconds);
the clock reads cost ~50 ns per op, so the profiled call is as fast as a plain one.

numpy only: this module must not import torch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from sparseprune.config import resolve_threads
from sparseprune.runtime.limits import weighted_op_flops
from sparseprune.runtime.spec import kernel_at


@dataclass
class OpProfile:
    index: int
    op: str
    name: str
    kernel: str  # the kernel it ran at this batch ("csr", "bsr4x1", "dense", "sparse-conv", ...; spec.kernel_at) or "-"
    median_ms: float
    share: float  # of the sum of the ops' medians
    useful_gflop: Optional[float] = None  # per call, nonzero weights only (weighted layers)
    dense_gflop: Optional[float] = None  # per call, every weight counted

    @property
    def useful_gflops(self) -> Optional[float]:
        return None if self.useful_gflop is None or self.median_ms <= 0 else self.useful_gflop / (self.median_ms / 1e3)

    @property
    def dense_gflops(self) -> Optional[float]:
        return None if self.dense_gflop is None or self.median_ms <= 0 else self.dense_gflop / (self.median_ms / 1e3)


@dataclass
class Profile:
    batch: int
    threads: int
    repeats: int
    call_median_ms: float  # whole calls (ops plus input/output copies and checks)
    rows: List[OpProfile] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"batch": self.batch, "threads": self.threads, "repeats": self.repeats,
                "call_median_ms": self.call_median_ms,
                "ops": [{**vars(r), "useful_gflops": r.useful_gflops, "dense_gflops": r.dense_gflops}
                        for r in self.rows]}

    def table(self, top: Optional[int] = None) -> str:
        """The ops by time, slowest first (the first `top` only, when given)."""
        rows = sorted(self.rows, key=lambda r: -r.median_ms)[:top]
        header = f"{'#':>4} {'op':<14} {'name':<36} {'kernel':<14} {'ms':>9} {'share':>6} {'GFLOP/s':>8} {'dense-eq':>8}"
        lines = [f"batch {self.batch}, {self.threads} thread(s), median of {self.repeats} calls: "
                 f"{self.call_median_ms:.3f} ms per call, ops {sum(r.median_ms for r in self.rows):.3f} ms",
                 header, "-" * len(header)]
        for r in rows:
            useful = "-" if r.useful_gflops is None else f"{r.useful_gflops:8.1f}"
            dense = "-" if r.dense_gflops is None else f"{r.dense_gflops:8.1f}"
            lines.append(f"{r.index:>4} {r.op:<14} {r.name[:36]:<36} {r.kernel:<14} {r.median_ms:9.4f} "
                         f"{100 * r.share:5.1f}% {useful:>8} {dense:>8}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shape(entry: Sequence[Any], dims: Mapping[str, int]) -> List[int]:
    """A buffer's per-sample shape at the dims' values (entries: int, dim name, [k, dim name])."""
    out = []
    for d in entry:
        if isinstance(d, str):
            out.append(int(dims[d]))
        elif isinstance(d, (list, tuple)):
            out.append(int(d[0]) * int(dims[d[1]]))
        else:
            out.append(int(d))
    return out


def _rows(op: Mapping[str, Any], buffers: Sequence[Mapping[str, Any]], dims: Mapping[str, int], batch: int) -> int:
    """The input rows a linear / conv2d op's kernel choice goes by (spec.kernel_at)."""
    if op["op"] == "linear":
        return batch * math.prod(_shape(buffers[op["in"]]["shape"], dims)[:-1])
    return batch


def _flops(op: Mapping[str, Any], layer: Mapping[str, Any], buffers: Sequence[Mapping[str, Any]],
           dims: Mapping[str, int], batch: int):
    """(useful, dense-equivalent) GFLOP of one call of a weighted op; (None, None) for others."""
    if op["op"] not in ("linear", "conv2d"):
        return None, None
    useful, dense = weighted_op_flops(op, _shape(buffers[op["in"]]["shape"], dims),
                                      _shape(buffers[op["out"]]["shape"], dims), layer["nnz"])
    return 1e-9 * useful * batch, 1e-9 * dense * batch


def _kernel(op: Mapping[str, Any], layer: Optional[Mapping[str, Any]], buffers: Sequence[Mapping[str, Any]],
            dims: Mapping[str, int], batch: int) -> str:
    """The kernel the op ran at this batch ("-" for ops without weights)."""
    if layer is None:
        return "-"
    return kernel_at(op, _rows(op, buffers, dims, batch)) if op["op"] in ("linear", "conv2d") else layer["format"]


def profile_executable(exe, inputs: Sequence[np.ndarray], named: Mapping[str, np.ndarray], *, repeats: int,
                       warmup: int, n_threads: Optional[int]) -> Profile:
    """Executable.profile: run the plan `warmup` + `repeats` times on the inputs, timing every op."""
    for what, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    arrays, dim_values = exe._prepare(inputs, named)
    threads = resolve_threads(n_threads if n_threads is not None else exe.n_threads)
    n_ops = exe.n_ops
    for _ in range(warmup):
        exe._plan.run(arrays, threads, dim_values)
    samples = np.zeros((repeats, n_ops))
    calls = []
    for k in range(repeats):
        t0 = time.perf_counter()
        exe._plan.run(arrays, threads, dim_values, samples[k])
        calls.append(time.perf_counter() - t0)
    medians_ms = np.median(samples, axis=0) * 1e3
    total = float(medians_ms.sum()) or 1.0
    spec = exe.spec
    dims = {name: value for (name, _, _), value in zip(exe._layout.dims, dim_values)}
    layers = {row["index"]: row for row in exe.layer_table()}
    batch = int(arrays[0].shape[0]) if arrays else 0
    rows = []
    for i, op in enumerate(spec["ops"]):
        layer = layers.get(i)
        useful, dense = _flops(op, layer, spec["buffers"], dims, batch) if layer else (None, None)
        rows.append(OpProfile(i, op["op"], str(op.get("name", op.get("weight", ""))),
                              _kernel(op, layer, spec["buffers"], dims, batch), float(medians_ms[i]), float(medians_ms[i]) / total,
                              useful, dense))
    return Profile(batch, threads, repeats, float(np.median(calls) * 1e3), rows)
