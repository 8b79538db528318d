"""Fuzz executable files at scale (issue 12): mutate compiled files, load and run each in a
watched worker process, and feed the same files straight to the native plan.

Seeds: a small pruned CNN (conv + BatchNorm + pools + CSR linear) and a token-id transformer
(embedding, encoder layer with attention, hand-written causal attention, CSR linears), compiled
with sparseprune.compile and saved. Each mutated file is one of:

- bytes: truncated, header bytes flipped, data bytes flipped, the header length rewritten,
  weight value bytes flipped (still a valid file);
- JSON: values (buffer ids, sizes, shapes, fields set to hostile values), keys (dropped, renamed,
  added), op kinds, dims (hostile maxima), the stated cost (claiming less);
- arrays: indices and taps out of range, row pointers broken, arrays cut, retyped or dropped;
- still-valid re-packs: a linear's weight re-packed CSR <-> dense <-> BSR, a sparse convolution
  as a dense one, a sparse op given a dense_from switch (the outputs must not change);
- resized inputs: the unchanged file on other batch sizes (0 to 64).

A worker process (spawned: numpy and the runtime only) loads and runs each file through
sparseprune.runtime.load (Limits sized to the watchdog's bounds) and compares every successful run
with the numpy reference (sparseprune/runtime/reference.py); then builds sparseprune._C.Plan
from the same JSON and arrays, past the Python validator, and runs it when its arena is small.
The parent watches it: a signal, more than --timeout seconds on one file or an RSS above
--rss-limit-mb counts as a failure of that file's phase, and the worker is restarted. Counts by
outcome are printed (and written with --json); every failing file is saved in --out with its
mutation. Bounded by --n files and --seconds. Under a sanitizer build, run it through
.ci/sanitized REPORT_DIR: any error report counts as a failure of the file and phase that wrote it.

    python benchmarks/fuzz_executables.py --n 10000 --seconds 1800 --json fuzz.json
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# Outcomes that are failures: the file is saved with its mutation.
FAILURES = ("crash", "hang", "rss", "mismatch", "unexpected", "sanitizer")


# --------------------------------------------------------------------------------------- seeds
def build_seeds(directory: str) -> List[Dict[str, Any]]:
    """Compile the two seed models; returns [{name, path, inputs: [array, ...]}]."""
    import torch
    from torch import nn

    import sparseprune as sp
    from sparseprune.bench.models import TinyTransformer

    torch.manual_seed(0)

    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                        nn.Linear(16, 5))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2.0)
    transformer = TinyTransformer()
    seeds = []
    for name, model, x in (("cnn", cnn, torch.randn(2, 3, 12, 12)),
                           ("transformer", transformer, torch.randint(0, 30, (2, 7)))):
        model.eval()
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                sp.prune.magnitude(m, 0.8)
        exe = sp.compile(model, (x,), policy="threshold", num_threads=1)
        path = os.path.join(directory, f"seed_{name}.safetensors")
        exe.save(path)
        seeds.append({"name": name, "path": path, "inputs": [x.numpy()]})
    return seeds


# ------------------------------------------------------------------------------------ mutation
def _read(path: str) -> Tuple[bytes, int, Dict[str, Any], Dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    blob = open(path, "rb").read()
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + header_len])
    spec = json.loads(header["__metadata__"]["sparseprune_spec"])
    return blob, header_len, spec, load_file(path)


class Mutator:
    """Makes one mutated file per call; returns (bytes or (spec_text, arrays), description)."""

    def __init__(self, seed_path: str, rng: np.random.Generator):
        self.blob, self.header_len, self.spec, self.arrays = _read(seed_path)
        self.rng = rng
        header = json.loads(self.blob[8:8 + self.header_len])
        base = 8 + self.header_len
        self.value_ranges = [(base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()
                             if k.endswith((".values", ".weight", ".table")) and v["data_offsets"][1] > v["data_offsets"][0]]

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def mutate(self, kind: str):
        rng = self.rng
        if kind == "truncate":
            n = int(rng.integers(0, len(self.blob)))
            return self.blob[:n], f"truncate to {n} bytes"
        if kind in ("header-bytes", "data-bytes", "value-bytes"):
            data = bytearray(self.blob)
            if kind == "header-bytes":
                lo, hi = 8, 8 + self.header_len
            elif kind == "data-bytes":
                lo, hi = 8 + self.header_len, len(self.blob)
            else:
                lo, hi = self.pick(self.value_ranges)
            edits = []
            for _ in range(int(rng.integers(1, 10))):
                at, v = int(rng.integers(lo, hi)), int(rng.integers(256))
                data[at] = v
                edits.append((at, v))
            return bytes(data), f"{kind}: set (offset, byte) {edits}"
        if kind == "header-len":
            v = self.pick([0, 1, self.header_len - 1, self.header_len + 1, len(self.blob), 2**63, 2**64 - 1])
            return struct.pack("<Q", v) + self.blob[8:], f"header length set to {v}"
        spec = json.loads(json.dumps(self.spec))
        arrays = {k: v.copy() for k, v in self.arrays.items()}
        what = getattr(self, "_" + kind.replace("-", "_"))(spec, arrays)
        return (spec, arrays), f"{kind}: {what}"

    # JSON values, keys and op kinds
    def _json_value(self, spec, arrays):
        op_i = int(self.rng.integers(len(spec["ops"])))
        op = spec["ops"][op_i]
        key = self.pick(sorted(op))
        value = self.pick([None, "x", -1, 0, 1, 2, 7, 2**31, 2**40, 2**70, -2**63, [1, 2, 3], [], {"a": 1}, 1.5,
                           float("1e300"), True, len(spec["buffers"]), len(spec["buffers"]) - 1])
        op[key] = value
        return f"ops[{op_i}].{key} = {value!r}"

    def _json_key(self, spec, arrays):
        op_i = int(self.rng.integers(len(spec["ops"])))
        op = spec["ops"][op_i]
        key = self.pick(sorted(op))
        how = self.pick(["drop", "rename", "add"])
        if how == "drop":
            del op[key]
        elif how == "rename":
            op[key + "_"] = op.pop(key)
        else:
            op[self.pick(["ceil_mode", "bias", "extra", "weight2", "dense_from"])] = 1
        return f"ops[{op_i}] {how} key {key!r}"

    def _op_kind(self, spec, arrays):
        op_i = int(self.rng.integers(len(spec["ops"])))
        old = spec["ops"][op_i]["op"]
        new = self.pick(["linear", "conv2d", "attention", "embedding", "softmax", "add", "matmul", "cat", "permute",
                         "constant", "slice", "reduce", "pad", "expand", "layernorm", "conv3d", "", 5])
        spec["ops"][op_i]["op"] = new
        return f"ops[{op_i}].op {old!r} -> {new!r}"

    def _shape(self, spec, arrays):
        b_i = int(self.rng.integers(len(spec["buffers"])))
        shape = spec["buffers"][b_i]["shape"]
        d = int(self.rng.integers(len(shape)))
        v = self.pick([-1, 0, 1, 2, 3, 16, 2**16, 2**31, 2**62, "seq", [2, "seq"]])
        shape[d] = v
        if self.rng.random() < 0.3:
            spec["metadata"].pop("cost", None)
        return f"buffers[{b_i}].shape[{d}] = {v!r}"

    def _dims(self, spec, arrays):
        v = self.pick([0, 1, 64, 1000, 64000, 2**20, 2**31, -1])
        if "dims" in spec:
            name = self.pick(sorted(spec["dims"]))
            spec["dims"][name]["max"] = v
        else:  # make the first input's last axis dynamic
            spec["dims"] = {"seq": {"min": 1, "max": v}}
            b = spec["inputs"][0]
            spec["buffers"][b]["shape"][-1] = "seq"
        if self.rng.random() < 0.5:
            spec["metadata"].pop("cost", None)
        return f"dims max = {v}"

    def _cost_claim(self, spec, arrays):
        key = self.pick(["work_per_sample", "memory_per_sample"])
        v = self.pick([0, 1, spec["metadata"]["cost"][key] - 1, -5, "big", None])
        spec["metadata"]["cost"][key] = v
        return f"metadata.cost.{key} = {v!r}"

    # arrays: indices, row pointers, lengths, dtypes
    def _indices(self, spec, arrays):
        names = sorted(k for k in arrays if k.endswith((".indices", ".taps")))
        name = self.pick(names)
        a = arrays[name]
        v = self.pick([-1, 10**6, 2**31 - 1, -2**31, int(a.max(initial=0)) + 1])
        if a.size:
            at = int(self.rng.integers(a.size))
            a[at] = v
            return f"{name}[{at}] = {v}"
        arrays[name] = np.array([5], a.dtype)
        return f"{name} = [5]"

    def _row_pointers(self, spec, arrays):
        name = self.pick(sorted(k for k in arrays if k.endswith((".indptr", ".row_ptr"))))
        a = arrays[name]
        at = int(self.rng.integers(a.size))
        v = self.pick([-5, int(a[-1]) + 3, 2**62, 0, -2**63])
        a[at] = v
        return f"{name}[{at}] = {v}"

    def _array_shape(self, spec, arrays):
        name = self.pick(sorted(arrays))
        how = self.pick(["cut", "retype", "drop", "grow"])
        a = arrays[name]
        if how == "cut":
            arrays[name] = a.reshape(-1)[: max(a.size - int(self.rng.integers(1, 4)), 0)].copy()
        elif how == "retype":
            arrays[name] = a.astype(self.pick([np.float64, np.int16, np.float16, np.uint8, np.int32]))
        elif how == "drop":
            del arrays[name]
        else:
            arrays[name] = np.concatenate([a.reshape(-1), a.reshape(-1)[:3]])
        return f"{how} array {name}"

    # still-valid re-packs: the outputs must equal the reference
    def _repack(self, spec, arrays):
        from sparseprune import formats

        spec["metadata"].pop("cost", None)  # the work changes with the format
        linears = [i for i, o in enumerate(spec["ops"]) if o["op"] == "linear" and o["format"] in ("csr", "dense")]
        convs = [i for i, o in enumerate(spec["ops"]) if o["op"] == "conv2d" and o.get("format", "sparse") == "sparse"]
        i = self.pick(linears + convs)
        op = spec["ops"][i]
        w = op["weight"]
        if op.get("format", "sparse") != "dense" and self.pick([False, False, True]):  # the same weight, switched
            op["dense_from"] = self.pick([2, 3, 17, 64, 2**31])
            return f"ops[{i}] {op['op']} {w!r} dense from {op['dense_from']}"
        if op["op"] == "conv2d":
            cout, g = op["out_channels"], op["groups"]
            kh, kw = op["kernel"]
            dense = np.zeros((cout, op["in_channels"] // g * kh * kw), np.float32)
            ptr = arrays.pop(f"{w}.row_ptr")
            rows = np.repeat(np.arange(cout), np.diff(ptr))
            dense[rows, arrays.pop(f"{w}.taps")] = arrays.pop(f"{w}.values")
            arrays[f"{w}.weight"] = dense.reshape(cout, op["in_channels"] // g, kh, kw)
            op["format"] = "dense"
            return f"ops[{i}] conv2d sparse -> dense"
        rows, cols = op["rows"], op["cols"]
        if op["format"] == "dense":
            dense = arrays.pop(f"{w}.weight")
        else:
            dense = np.zeros((rows, cols), np.float32)
            ptr = arrays.pop(f"{w}.indptr")
            dense[np.repeat(np.arange(rows), np.diff(ptr)), arrays.pop(f"{w}.indices")] = arrays.pop(f"{w}.values")
        target = self.pick(["dense", "csr", (4, 1), (1, 4), (2, 2), (8, 1)] if op["format"] == "csr" else
                           ["csr", (4, 1), (2, 2)])
        if target == "dense":
            arrays[f"{w}.weight"] = dense
            op["format"], op["block"] = "dense", [1, 1]
        else:
            r, c = (1, 1) if target == "csr" else target
            packed = formats.csr_arrays(dense) if target == "csr" else formats.bsr_arrays(dense, r, c)
            arrays[f"{w}.indptr"], arrays[f"{w}.indices"], arrays[f"{w}.values"] = packed
            op["format"], op["block"] = ("csr" if target == "csr" else "bsr"), [r, c]
        return f"ops[{i}] linear {w!r} -> {target}"


KINDS = ["truncate", "header-bytes", "data-bytes", "value-bytes", "header-len", "json-value", "json-key", "op-kind",
         "shape", "dims", "cost-claim", "indices", "row-pointers", "array-shape", "repack", "resize"]


# -------------------------------------------------------------------------------------- worker
def _dims_for(plan, inputs) -> Optional[List[int]]:
    """The native plan's dim values read off the inputs' shapes (None when they do not fit)."""
    values = []
    for name, lo, hi in plan.dims:
        found = None
        for shape, x in zip(plan.input_shapes, inputs):
            for axis, entry in enumerate(shape, start=1):
                if axis >= x.ndim:
                    continue
                if entry == name:
                    found = x.shape[axis]
                elif isinstance(entry, list) and entry[1] == name and x.shape[axis] % entry[0] == 0:
                    found = x.shape[axis] // entry[0]
        if found is None or not lo <= found <= hi:
            return None
        values.append(found)
    return values


def _close(got, ref) -> Optional[bool]:
    """True/False; None when the reference is not comparable (non-finite or huge values from
    damaged weights, where float32 and float64 accumulation legitimately part)."""
    got = list(got.values()) if isinstance(got, dict) else list(got) if isinstance(got, (tuple, list)) else [got]
    for g, r in zip(got, ref):
        if g.shape != r.shape:
            return False
        if r.size == 0:
            continue
        if not np.all(np.isfinite(r)) or np.max(np.abs(r)) > 1e15:
            return None
        scale = max(1.0, float(np.max(np.abs(r))))
        if not np.allclose(g, r, rtol=1e-3, atol=1e-3 * scale):
            return False
    return True


def _python_phase(rt, run_reference, path, inputs, limits) -> Tuple[str, str]:
    """(outcome, detail) of load + run + the reference comparison."""
    try:
        exe = rt.load(path, n_threads=1, limits=limits)
    except (rt.SpecError, rt.LimitExceeded) as exc:
        return f"refused:{type(exc).__name__}", ""
    except BaseException as exc:  # noqa: BLE001 - anything else escaping load is a finding
        return "unexpected", f"load: {type(exc).__name__} (not SpecError): {str(exc)[:300]}"
    try:
        got = exe.run(*inputs)
    except (ValueError, TypeError) as exc:
        return f"run-refused:{type(exc).__name__}", str(exc)[:200]
    except BaseException as exc:  # noqa: BLE001
        return "unexpected", f"run: {type(exc).__name__}: {str(exc)[:300]}"
    try:
        ref = run_reference(exe.spec, dict(exe.arrays), inputs)
    except Exception as exc:  # noqa: BLE001 - the reference refusing what the plan ran
        return "mismatch", f"the reference refused: {type(exc).__name__}: {str(exc)[:200]}"
    same = _close(got, ref)
    if same is False and _extreme_weights(exe.arrays):
        same = None  # weights near float32's range: float32 and float64 sums legitimately part
    return {True: "ran:match", False: "mismatch", None: "ran:unchecked"}[same], ""


def _extreme_weights(arrays) -> bool:
    return any(a.dtype == np.float32 and a.size and not (np.all(np.isfinite(a)) and np.max(np.abs(a)) < 1e15)
               for a in arrays.values())


def worker_main(conn, max_arena_bytes: int, max_work: float) -> None:
    """Serve (path, inputs) requests: phase "python" then phase "native"; one message per phase."""
    from safetensors import safe_open

    import sparseprune.runtime as rt
    from sparseprune import _C
    from sparseprune.runtime.reference import run_reference

    limits = rt.Limits(max_arena_bytes=max_arena_bytes, max_work=max_work)
    while True:
        request = conn.recv()
        if request is None:
            return
        path, inputs = request
        # phase 1: the API a service uses
        conn.send(("python",) + _python_phase(rt, run_reference, path, inputs, limits))
        conn.recv()
        # phase 2: the same file straight to the native plan, past the Python validator
        try:
            with safe_open(path, framework="np") as f:
                spec_text = (f.metadata() or {})["sparseprune_spec"]
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - unreadable container: nothing reaches the plan
            conn.send(("native", "native:unreadable", ""))
            conn.recv()
            continue
        try:
            plan = _C.Plan(spec_text, arrays)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError):
            outcome = "native:refused"
        except MemoryError:
            outcome = "native:refused-memory"
        except BaseException as exc:  # noqa: BLE001
            outcome = "native:unexpected"
            conn.send(("native", outcome, f"{type(exc).__name__}: {str(exc)[:300]}"))
            conn.recv()
            continue
        else:
            floats = [x.astype(np.float32) for x in inputs]  # canonical float32 (see Executable.run)
            dims = _dims_for(plan, floats)
            try:
                arena = plan.arena_floats_per_sample(dims) if dims is not None else None
            except ValueError:
                arena = None
            if arena is None:
                outcome = "native:built-inputs-do-not-fit"
            elif arena * 4 * max(1, floats[0].shape[0]) > max_arena_bytes:
                outcome = "native:built-arena-too-large-to-run"
            else:
                try:
                    plan.run(floats, 1, dims)
                    outcome = "native:ran"
                except (ValueError, TypeError):
                    outcome = "native:run-refused"
        conn.send(("native", outcome, ""))
        conn.recv()


# -------------------------------------------------------------------------------------- parent
class SanitizerReports:
    """The ASan/UBSan report files of a sanitizer build (.ci/sanitized sets log_path; the worker
    inherits the environment and writes PREFIX.PID files). new() returns the report text written
    since its last call, so each report is tied to the file and phase that produced it."""

    def __init__(self, environ=os.environ):
        self.prefixes = [value for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS")
                         for key, _, value in (item.partition("=") for item in environ.get(var, "").split(":"))
                         if key == "log_path" and value]
        if "libasan" in environ.get("LD_PRELOAD", "") and not self.prefixes:
            raise SystemExit("the sanitizer runtime is preloaded but ASAN_OPTIONS/UBSAN_OPTIONS set no log_path: "
                             "run under .ci/sanitized REPORT_DIR so that no report goes unseen")
        self.read_to: Dict[str, int] = {}
        self.new()  # reports from before the run (the parent's setup) are not any file's

    @property
    def active(self) -> bool:
        return bool(self.prefixes)

    def new(self) -> str:
        text = []
        for prefix in self.prefixes:
            directory, base = os.path.split(prefix)
            for name in sorted(os.listdir(directory or ".")) if os.path.isdir(directory or ".") else []:
                if not name.startswith(base + "."):
                    continue
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    f.seek(self.read_to.get(path, 0))
                    chunk = f.read()
                self.read_to[path] = self.read_to.get(path, 0) + len(chunk)
                if chunk:
                    text.append(f"[{name}]\n" + chunk.decode(errors="replace"))
        return "\n".join(text)


def is_sanitizer_error(report: str) -> bool:
    """An error report (a finding); the rest are warnings, e.g. ASan's "failed to allocate" when
    allocator_may_return_null turns a hostile size into a null (then std::bad_alloc, a MemoryError)."""
    return "ERROR: " in report or "runtime error:" in report


class Watched:
    """The worker process and its watchdog (signal, time, RSS)."""

    def __init__(self, ctx, max_arena_bytes: int, max_work: float, reports: SanitizerReports):
        self.ctx, self.args, self.reports = ctx, (max_arena_bytes, max_work), reports
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker_main, args=(child,) + self.args, daemon=True)
        self.proc.start()

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def restart(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.start()

    def run(self, path, inputs, timeout: float, rss_limit: int) -> List[Tuple[str, str, str, str]]:
        """[(phase, outcome, detail, sanitizer report text)] for the file's two phases."""
        self.conn.send((path, inputs))
        results = []
        for phase in ("python", "native"):
            outcome, detail = self._phase(timeout, rss_limit)
            report = self.reports.new()
            if is_sanitizer_error(report):  # it halted the worker (or will): restart it regardless
                outcome, detail = "sanitizer", f"{outcome}: {detail}"
                if self.proc.is_alive():
                    self.restart()
            results.append((phase, outcome, detail, report))
            if outcome in ("crash", "hang", "rss", "sanitizer"):
                return results  # the worker was restarted: the file's next phase did not run
        return results

    def _phase(self, timeout: float, rss_limit: int) -> Tuple[str, str]:
        """(outcome, detail) of one phase; the worker is restarted after a crash, hang or RSS breach."""
        deadline = time.monotonic() + timeout
        while True:
            if self.conn.poll(0.01):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    msg = None
                if msg is not None:
                    self.conn.send("ack")
                    return msg[1], msg[2]
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self.restart()
                return "crash", f"worker died with exit code {code}"
            if time.monotonic() > deadline:
                self.restart()
                return "hang", f"more than {timeout} s"
            if self.rss() > rss_limit:
                self.restart()
                return "rss", f"RSS above {rss_limit >> 20} MiB"

    def close(self):
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="mutated files (default: 10000)")
    p.add_argument("--seconds", type=float, default=1800, help="stop after this long (default: 1800)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per file and phase (default: 10)")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="worker RSS limit (default: 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fuzz-failures", help="directory for failing files (default: fuzz-failures)")
    p.add_argument("--json", help="write the counts as JSON here")
    args = p.parse_args(argv)

    from safetensors.numpy import save_file

    from sparseprune.config import build_info

    rss_limit = args.rss_limit_mb << 20
    # Limits inside the watchdog's bounds: a breach of the watchdog is then a breach of Limits.
    max_arena, max_work = rss_limit // 4, 2e9
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="sparseprune-fuzz-")
    seeds = build_seeds(work)
    mutators = {s["name"]: Mutator(s["path"], rng) for s in seeds}
    reports = SanitizerReports()
    ctx = mp.get_context("spawn")
    watched = Watched(ctx, max_arena, max_work, reports)
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    sanitizer_warnings = []  # reports that are not errors: counted and kept, not failures
    start = time.monotonic()
    done = 0
    try:
        for i in range(args.n):
            if time.monotonic() - start > args.seconds:
                break
            seed = seeds[i % len(seeds)]
            kind = KINDS[(i // len(seeds)) % len(KINDS)]
            mutator = mutators[seed["name"]]
            path = os.path.join(work, "case.safetensors")
            inputs = seed["inputs"]
            if kind == "resize":
                batch = int(rng.integers(0, 65))
                x = seed["inputs"][0]
                if x.dtype == np.float32:
                    inputs = [rng.standard_normal((batch,) + x.shape[1:]).astype(np.float32)]
                else:
                    inputs = [rng.integers(0, 30, (batch,) + x.shape[1:])]
                shutil.copyfile(seed["path"], path)
                what = f"resize: batch {batch}"
            else:
                try:
                    made, what = mutator.mutate(kind)
                except (ValueError, KeyError, IndexError, TypeError):  # nothing to mutate here
                    counts[kind]["skipped"] += 1
                    continue
                if isinstance(made, bytes):
                    with open(path, "wb") as f:
                        f.write(made)
                else:
                    spec, arrays = made
                    text = json.dumps(spec)
                    try:
                        save_file(arrays, path, metadata={"sparseprune_spec": text, "format": "sparseprune.executable"})
                    except Exception:  # noqa: BLE001 - safetensors would not write it: skip
                        counts[kind]["skipped"] += 1
                        continue
            for phase, outcome, detail, report in watched.run(path, inputs, args.timeout, rss_limit):
                if report and outcome != "sanitizer":
                    counts["all/sanitizer-warnings"][phase] += 1
                    sanitizer_warnings.append({"file": i, "seed": seed["name"], "kind": kind, "mutation": what,
                                               "phase": phase, "outcome": outcome, "report": report[:2000]})
                counts[f"{kind}/{phase}"][outcome] += 1
                counts[f"all/{phase}"][outcome] += 1
                failing = outcome in FAILURES and not (phase == "native" and outcome in ("hang", "rss"))
                if failing or (phase == "native" and outcome in ("crash", "native:unexpected")):
                    os.makedirs(args.out, exist_ok=True)
                    name = f"{i:05d}-{seed['name']}-{kind}-{phase}-{outcome}"
                    shutil.copyfile(path, os.path.join(args.out, name + ".safetensors"))
                    with open(os.path.join(args.out, name + ".json"), "w") as f:
                        json.dump({"seed": seed["name"], "kind": kind, "mutation": what, "phase": phase,
                                   "outcome": outcome, "detail": detail, "sanitizer_report": report,
                                   "inputs": [list(x.shape) for x in inputs]}, f, indent=1)
                    np.save(os.path.join(args.out, name + ".inputs.npy"), inputs[0])
                    failures.append(name)
            done += 1
            if done % 500 == 0:
                print(f"{done} files, {time.monotonic() - start:.0f} s, {len(failures)} failing", flush=True)
    finally:
        watched.close()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - start
    print(f"\n{done} mutated files in {elapsed:.0f} s; {len(failures)} failing (saved in {args.out!r})")
    for key in sorted(counts):
        if key.startswith("all/"):
            print(f"{key}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts[key].items())))
    for key in sorted(counts):
        if not key.startswith("all/"):
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts[key].items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": done, "seconds": round(elapsed, 1), "failing": failures,
                       "sanitizer_warnings": sanitizer_warnings[:50],
                       "counts": {k: dict(v) for k, v in counts.items()},
                       "metadata": {"argv": sys.argv, "build_info": build_info(), "seed": args.seed,
                                    "timeout": args.timeout, "rss_limit_mb": args.rss_limit_mb,
                                    "sanitizer_reports": reports.prefixes, "cpu": cpu_model(),
                                    "limits": {"max_arena_bytes": max_arena, "max_work": max_work}}}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
