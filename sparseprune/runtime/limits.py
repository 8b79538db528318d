"""What one call of an executable may cost, the figures it is checked against, and the arena trim.

A service loading files it did not write must bound every call before it starts: an edited
sequence length or a large batch can ask for minutes of compute or tens of GiB. Each executable
therefore knows, per sample and as a function of its dims (sequence lengths), its

- work: FLOP counted per op from the spec (linear 2 * nnz * rows, conv2d 2 * nnz * output pixels,
  matmul 2 * M * K * N, attention the QK^T and PV products plus the scores, pools kh * kw per
  output, every op one per output element for its bias/activation/copy), and
- memory: bytes the call allocates — the plan's arena (every buffer, as the native plan lays them
  out), the largest kernel repacking scratch, the float32 inputs and the outputs,

and states both at the dims' max values in spec.metadata["cost"] (Executable.from_spec writes it;
load() recomputes it and refuses a file claiming less). `Limits` bounds a call's batch, its work
(batch * work per sample) and its memory (batch * memory per sample); Executable.run checks them
from the spec, before any native code runs, and raises LimitExceeded naming the limit and the value.
load() applies Limits() unless told otherwise (files may come from anyone); Executable.from_spec,
and so compile and convert, apply none unless given (the caller built the spec).

Arena trim: a thread keeps its arena and scratch between calls (no page faults per request). After
a call whose need was far above usual — the thread's buffers reached more than TRIM_FACTOR times
the median need of its last TRIM_WINDOW calls and more than TRIM_FLOOR bytes — they are freed, so
one huge request does not pin gigabytes for the thread's lifetime. Executable.trim() frees them now.

numpy only: this module must not import torch.
"""
from __future__ import annotations

import collections
import math
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from sparseprune._native import _C

# Defaults fit for a service on one machine: a batch of 4096 samples, 1e12 FLOP per call (about
# a minute on one core, seconds on a server), 4 GiB of scratch per call.
DEFAULT_MAX_BATCH = 4096
DEFAULT_MAX_WORK = 1e12
DEFAULT_MAX_ARENA_BYTES = 4 << 30

TRIM_FACTOR = 4
TRIM_FLOOR = 64 << 20
TRIM_WINDOW = 32


class LimitExceeded(ValueError):
    """A call (or, at load, one sample at the dims' max values) is beyond a Limits field.

    limit: the field's name ("max_batch", "max_work" or "max_arena_bytes"); value: what was asked
    for; maximum: the limit."""

    def __init__(self, limit: str, value: float, maximum: float, what: str):
        self.limit, self.value, self.maximum, self.what = limit, value, maximum, what
        super().__init__(f"{what} is {_num(value)}, above Limits.{limit} = {_num(maximum)}")

    def __reduce__(self):  # pickled with its fields (a server may pass it between processes)
        return type(self), (self.limit, self.value, self.maximum, self.what)


def _num(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def _positive(v: Any, name: str, integral: bool) -> Any:
    ok = isinstance(v, (int, np.integer)) if integral else isinstance(v, (int, float, np.integer, np.floating))
    if not ok or isinstance(v, (bool, np.bool_)) or not math.isfinite(float(v)) or v <= 0:
        kind = "a positive int" if integral else "a positive finite number"
        raise ValueError(f"Limits.{name} must be {kind}, got {v!r}")
    return int(v) if integral else v


@dataclass(frozen=True)
class Limits:
    """Bounds of one Executable.run call (and of one sample at the dims' max values at load).

    max_batch: samples per call; max_work: FLOP per call (batch * work per sample);
    max_arena_bytes: bytes the call allocates (batch * memory per sample). One object can be
    shared by every executable of a server."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_work: float = DEFAULT_MAX_WORK
    max_arena_bytes: int = DEFAULT_MAX_ARENA_BYTES

    def __post_init__(self):
        _positive(self.max_batch, "max_batch", True)
        _positive(self.max_work, "max_work", False)
        _positive(self.max_arena_bytes, "max_arena_bytes", True)

    def check(self, cost: "Cost", batch: int, where: str = "this call") -> None:
        """Raise LimitExceeded if `batch` samples of `cost` break a limit."""
        if batch > self.max_batch:
            raise LimitExceeded("max_batch", batch, self.max_batch, f"the batch of {where}")
        if batch * cost.work > self.max_work:
            raise LimitExceeded("max_work", batch * cost.work, self.max_work,
                                f"the work of {where} ({batch} x {cost.work:,} FLOP{cost.at_str()})")
        if batch * cost.memory > self.max_arena_bytes:
            raise LimitExceeded("max_arena_bytes", batch * cost.memory, self.max_arena_bytes,
                                f"the memory of {where} ({batch} x {cost.memory:,} bytes{cost.at_str()})")


def check_limits(limits: Any) -> Optional[Limits]:
    """A Limits, or None (no limits: an executable built in-process from a spec its caller trusts)."""
    if limits is None:
        return None
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a sparseprune.runtime.Limits, got {type(limits).__name__}")
    return limits


@dataclass(frozen=True)
class Cost:
    """Per-sample cost of a run at one assignment of the dims (`at`)."""

    work: int  # FLOP per sample
    arena: int  # bytes of the plan's arena per sample
    scratch: int  # bytes of the largest kernel repacking scratch per sample
    io: int  # bytes of the float32 inputs and the outputs per sample
    at: Tuple[Tuple[str, int], ...] = ()

    @property
    def memory(self) -> int:
        return self.arena + self.scratch + self.io

    @property
    def held(self) -> int:
        """Bytes per sample the calling thread keeps after the call (arena and scratch)."""
        return self.arena + self.scratch

    def at_str(self) -> str:
        return " at " + ", ".join(f"{n}={v}" for n, v in self.at) if self.at else ""


def weighted_op_flops(op: Mapping[str, Any], in_shape: Sequence[int], out_shape: Sequence[int],
                      nnz: int) -> Tuple[int, int]:
    """(useful, dense-equivalent) FLOPs per sample of a linear or conv2d op: 2 per weight the
    kernel visits (`nnz`) and 2 per weight of the dense layer, per input vector / output pixel.
    The one FLOP count: the limits' work and the profile's GFLOP/s."""
    if op["op"] == "linear":
        vectors = math.prod(in_shape) // op["cols"]
        return 2 * nnz * vectors, 2 * op["rows"] * op["cols"] * vectors
    pixels = math.prod(out_shape[1:])
    kh, kw = op["kernel"]
    return 2 * nnz * pixels, 2 * op["out_channels"] * (op["in_channels"] // op["groups"]) * kh * kw * pixels


def sample_cost(spec: Mapping[str, Any], shapes: Sequence[Tuple[int, ...]], arrays: Mapping[str, np.ndarray],
                arena_floats: int, at: Tuple[Tuple[str, int], ...] = ()) -> Cost:
    """The per-sample cost of a validated (canonical) spec with concrete buffer `shapes`."""
    numel = [math.prod(s) for s in shapes]
    work = scratch = 0
    for op in spec["ops"]:
        kind = op["op"]
        out = numel[op["out"]]
        work += out  # one per output element: its bias / activation / residual / copy
        if kind == "linear":
            nnz = op["rows"] * op["cols"] if op["format"] == "dense" else int(arrays[f"{op['weight']}.values"].shape[0])
            vectors = numel[op["in"]] // op["cols"]
            work += weighted_op_flops(op, shapes[op["in"]], shapes[op["out"]], nnz)[0]
            r, c = op["block"]
            # CSR/BSR kernels repack x and y channel-major (rows and cols padded to the block)
            scratch = max(scratch, (op["cols"] + c + op["rows"] + r) * vectors)
        elif kind == "conv2d":
            w = op["weight"]
            nnz = int(arrays[f"{w}.weight"].size if op.get("format") == "dense" else arrays[f"{w}.values"].shape[0])
            work += weighted_op_flops(op, shapes[op["in"]], shapes[op["out"]], nnz)[0]
            c, h, wd = shapes[op["in"]]
            ph, pw = op["padding"]
            scratch = max(scratch, c * (h + 2 * ph) * (wd + 2 * pw) + out + 64)  # padded image + output tile
        elif kind == "matmul":
            work += 2 * out * shapes[op["a"]][-1]
        elif kind == "attention":
            sq, sk = shapes[op["q"]], shapes[op["k"]][-2]
            rows = numel[op["q"]] // sq[-1] * (op["heads"] if op["layout"] == "sequence_first" else 1)
            work += 2 * numel[op["q"]] * sk + 2 * out * sk + 3 * rows * sk  # QK^T, PV, scale/mask/softmax
        elif kind in ("maxpool2d", "avgpool2d"):
            work += out * op["kernel"][0] * op["kernel"][1]
        elif kind in ("global_avgpool", "reduce", "softmax", "layernorm"):
            work += numel[op["in"]]
    io = sum(numel[b] for b in spec["inputs"]) + sum(numel[b] for b in spec["outputs"])
    return Cost(work=work, arena=4 * arena_floats, scratch=4 * scratch, io=4 * io, at=at)


COST_KEY = "cost"  # spec.metadata[COST_KEY]: the figures at the dims' max values
_COST_FIELDS = ("work_per_sample", "memory_per_sample")


def cost_metadata(cost: Cost, fixed_bytes: int) -> Dict[str, Any]:
    """What spec.metadata states: per sample at the dims' max values, plus the weights' bytes."""
    return {"work_per_sample": cost.work, "memory_per_sample": cost.memory, "fixed_bytes": int(fixed_bytes),
            "at": dict(cost.at)}


def check_claims(claimed: Any, cost: Cost) -> None:
    """A file's stated cost must not be below the cost recomputed from its spec and arrays."""
    from sparseprune.runtime.spec import SpecError

    if not isinstance(claimed, Mapping):
        raise SpecError(f"spec.metadata.{COST_KEY} must be an object, got {type(claimed).__name__}")
    actual = {"work_per_sample": cost.work, "memory_per_sample": cost.memory}
    for key in _COST_FIELDS:
        v = claimed.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise SpecError(f"spec.metadata.{COST_KEY}.{key} must be an int, got {type(v).__name__}")
        if v < actual[key]:
            raise SpecError(f"spec.metadata.{COST_KEY}.{key} = {v:,} is less than the spec needs: "
                            f"{actual[key]:,}{cost.at_str()}")


# --- arena trim ----------------------------------------------------------------------------------
class _ThreadNeeds(threading.local):
    def __init__(self):
        self.needs = collections.deque(maxlen=TRIM_WINDOW)  # bytes of the thread's recent calls
        self.high = 0  # the largest need since the buffers were last freed


_needs = _ThreadNeeds()


def after_call(held_bytes: int) -> bool:
    """Record a call's arena + scratch need on this thread; free the thread's buffers when they
    grew far beyond the usual need (see the module doc). Returns True when it freed them."""
    state = _needs
    state.needs.append(held_bytes)
    state.high = max(state.high, held_bytes)
    if state.high > TRIM_FLOOR and state.high > TRIM_FACTOR * statistics.median(state.needs):
        release_thread_scratch()
        return True
    return False


def release_thread_scratch() -> None:
    """Free the calling thread's arena and kernel scratch now (the next call allocates again)."""
    _C.release_thread_scratch()
    _needs.high = 0


def thread_scratch_bytes() -> int:
    """Bytes of arena and kernel scratch the calling thread holds now."""
    return int(_C.thread_scratch_bytes())
