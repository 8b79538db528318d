#!/usr/bin/env python
"""Dense products: sparseprune's own GEMM against the tuned libraries it could link instead
(issue 11, must-have 3), per shape, in one run.

Candidates, each computing y = x @ W^T for x [M, K] and W [N, K] (float32, row-major):

  torch      torch.nn.functional.linear (MKL or oneDNN inside the CPU wheel)
  ours       sparseprune's dense kernel exactly as the executor runs it (a one-op native plan,
             sparseprune.compile.kernel_choice: the packed-panel GEMM of csrc/kernels/gemm*)
  openblas   cblas_sgemm from OpenBLAS (`pip install scipy-openblas32`), when installed
  onednn     dnnl_sgemm from oneDNN 3.2 (`pip install onednn-cpu-gomp`: GNU OpenMP, like ours),
             when installed

Shapes: the BERT-base projections at 1-512 rows (768x3072 and 3072x768), attention's two
products per head (128x64 @ 64x128, 128x128 @ 128x64) and the im2col products of ResNet-18's
first two 3x3 stages (3136x576 @ 576x64, 784x1152 @ 1152x128). Every candidate is checked
against float64 numpy before it is timed; timing is round-robin in one process
(sparseprune.timing.time_interleaved), medians, at each thread count.

    python benchmarks/bench_gemm_libraries.py --json gemm.json --markdown gemm.md
    python benchmarks/bench_gemm_libraries.py --threads 1 --quick
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_engines.py: two OpenMP pools
# OpenBLAS's own worker threads spin after each call (read when the library loads): timed round
# robin, they held the second core while the next candidate ran, and every other candidate's
# 2-thread time came out slower than its 1-thread time. 2^4 cycles of spinning, then sleep.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np
import torch

from sparseprune.compile.kernel_choice import _linear_format_arrays, _one_linear_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    add_output_args, add_timing_args, check_timing_args, comma_list, log, max_rel_diff, checked_candidates, time_case, write_outputs,
)

# (label, M, N, K)
SHAPES: List[Tuple[str, int, int, int]] = (
    [(f"bert 768->3072, {m} rows", m, 3072, 768) for m in (1, 8, 64, 128, 256, 512)]
    + [(f"bert 3072->768, {m} rows", m, 768, 3072) for m in (1, 8, 64, 128, 256, 512)]
    + [("attention q@k^T (one head)", 128, 128, 64), ("attention p@v (one head)", 128, 64, 128),
       ("conv 3x3 64->64 @56^2 (im2col)", 3136, 64, 576), ("conv 3x3 128->128 @28^2 (im2col)", 784, 128, 1152)]
)
QUICK = {"bert 768->3072, 128 rows", "bert 3072->768, 128 rows", "conv 3x3 64->64 @56^2 (im2col)"}
TOLERANCE = 1e-4  # relative to max |y|: float32 sums of <= 3072 products in any order


def _site_lib(pattern: str) -> Optional[str]:
    """The first file matching `pattern` under this interpreter's prefix (wheels put shared
    libraries in <prefix>/lib or inside their package)."""
    for base in {sys.prefix, os.path.dirname(os.path.dirname(np.__file__))}:
        hits = sorted(glob.glob(os.path.join(base, "**", pattern), recursive=True))
        if hits:
            return hits[0]
    return None


def load_openblas() -> Tuple[Optional[ctypes.CDLL], str]:
    try:
        import scipy_openblas32  # noqa: F401
    except ImportError:
        return None, "not installed (pip install scipy-openblas32)"
    # the package loads its library when imported (scipy_openblas32.dll); its config names the kernel
    return scipy_openblas32.dll, f"{scipy_openblas32.__version__} ({scipy_openblas32.get_openblas_config().strip()})"


def load_onednn() -> Tuple[Optional[ctypes.CDLL], str]:
    path = _site_lib("libdnnl.so.3")
    if path is None:
        return None, "not installed (pip install onednn-cpu-gomp)"
    return ctypes.CDLL(path), os.path.basename(os.path.realpath(path))


def candidates(x: np.ndarray, w: np.ndarray, threads: int, openblas, onednn) -> Dict[str, Callable[[], np.ndarray]]:
    (m, k), n = x.shape, w.shape[0]
    plan = _one_linear_plan(_linear_format_arrays("w", w, None, "dense", (1, 1)), "w", "dense", (1, 1), n, k, False)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    ptr = ctypes.c_void_p
    fns: Dict[str, Callable[[], np.ndarray]] = {
        "torch": lambda: torch.nn.functional.linear(xt, wt).numpy(),
        "ours": lambda: plan.run([x], threads)[0].reshape(m, n),
    }
    if openblas is not None:
        y_ob = np.empty((m, n), np.float32)

        def run_openblas():  # CblasRowMajor=101, CblasNoTrans=111, CblasTrans=112
            openblas.scipy_cblas_sgemm(101, 111, 112, m, n, k, ctypes.c_float(1.0), x.ctypes.data_as(ptr), k,
                                       w.ctypes.data_as(ptr), k, ctypes.c_float(0.0), y_ob.ctypes.data_as(ptr), n)
            return y_ob
        fns["openblas"] = run_openblas
    if onednn is not None:
        y_dn = np.empty((m, n), np.float32)
        i64 = ctypes.c_int64

        def run_onednn():  # row-major C = A B^T
            status = onednn.dnnl_sgemm(ctypes.c_char(b"N"), ctypes.c_char(b"T"), i64(m), i64(n), i64(k),
                                       ctypes.c_float(1.0), x.ctypes.data_as(ptr), i64(k), w.ctypes.data_as(ptr),
                                       i64(k), ctypes.c_float(0.0), y_dn.ctypes.data_as(ptr), i64(n))
            if status != 0:
                raise RuntimeError(f"dnnl_sgemm returned status {status}")
            return y_dn
        fns["onednn"] = run_onednn
    return fns


def run(args: argparse.Namespace) -> List[dict]:
    openblas, openblas_info = load_openblas()
    onednn, onednn_info = load_onednn()
    log(f"openblas: {openblas_info}; onednn: {onednn_info}")
    rows = []
    rng = np.random.default_rng(args.seed)
    for threads in args.threads:
        torch.set_num_threads(threads)
        if openblas is not None:
            openblas.scipy_openblas_set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if onednn is not None:  # oneDNN's GNU OpenMP build takes the OpenMP default thread count
            ctypes.CDLL("libgomp.so.1").omp_set_num_threads(threads)
        for label, m, n, k in SHAPES:
            if args.quick and label not in QUICK:
                continue
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            errors: Dict[str, str] = {}
            fns, _ = checked_candidates(candidates(x, w, threads, openblas, onednn), "torch", errors,
                                        lambda got, _ref: max_rel_diff(np.asarray(got, np.float64), ref), TOLERANCE)
            with torch.inference_mode():
                times, repeats, _ = time_case(fns, args)
            gflop = 2.0 * m * n * k / 1e9
            row = {"shape": label, "M": m, "N": n, "K": k, "threads": threads, "repeats": repeats,
                   "times": times, "errors": errors,
                   "gflops": {name: gflop / (t["median_ms"] / 1e3) for name, t in times.items()}}
            rows.append(row)
            log(f"[{threads}t] {label}: " + "  ".join(f"{name} {t['median_ms']:.3f} ms ({row['gflops'][name]:.0f} GF/s)"
                                                   for name, t in times.items()))
    return rows


def markdown(result: dict) -> str:
    meta = result["metadata"]
    names = ["torch", "ours", "openblas", "onednn"]
    lines = [f"Dense GEMM, y = x @ W^T, float32; {meta.get('cpu', '?')}, our path {meta.get('build_info', {}).get('simd_path_active', '?')}; "
             "median ms (GFLOP/s); the fastest in bold", "",
             "| shape | M×N×K | threads | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for row in result["rows"]:
        best = min(row["times"], key=lambda k: row["times"][k]["median_ms"])
        cells = []
        for name in names:
            if name in row["times"]:
                text = f"{row['times'][name]['median_ms']:.3f} ({row['gflops'][name]:.0f})"
                cells.append(f"**{text}**" if name == best else text)
            else:
                cells.append(row["errors"].get(name, "not installed"))
        lines.append(f"| {row['shape']} | {row['M']}×{row['N']}×{row['K']} | {row['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=comma_list(int, lambda v: v > 0, "positive ints"), default=[1, 2])
    p.add_argument("--quick", action="store_true", help="three shapes only")
    add_timing_args(p, budget_s=1.0)
    add_output_args(p, "gemm_libraries.json")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 20
    check_timing_args(p, args)
    started = time.perf_counter()
    rows = run(args)
    write_outputs(args, rows, markdown, started, {"shapes": [s[0] for s in SHAPES]},
                  {"tolerance": TOLERANCE, "openblas": load_openblas()[1], "onednn": load_onednn()[1]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
