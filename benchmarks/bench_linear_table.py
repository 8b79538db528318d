#!/usr/bin/env python
"""Linear-layer speed table: sparseprune's kernels vs torch dense, torch sparse CSR and scipy.

Sections (choose with --sections):
  linear  unstructured magnitude pruning; our CSR SparseLinear vs torch.nn.functional.linear,
          torch's sparse CSR (int32 indices, torch.sparse.addmm) and scipy.sparse.csr_matrix
  block   weights pruned in whole blocks (one run per compiled block shape); our block-sparse
          kernel vs torch dense and our CSR on the same weights; the best block shape is shown
  e2e     the bert-ffn MLP pruned to 90% through sparseprune.convert vs torch eager dense

Every implementation is checked against dense on the very input it is then timed on. All
candidates of one case run round-robin (sparseprune.timing.time_interleaved) after a warm-up at
the same torch/OpenMP thread count; the median and p90 are reported, speedups are dense median /
candidate median. scipy.sparse is single-threaded whatever the thread count. Slow cases get fewer
rounds (never fewer than --min-repeats) so the full grid finishes; `runs` records how many.

    python benchmarks/bench_linear_table.py --quick
    python benchmarks/bench_linear_table.py --json results.json --markdown results.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import nn

from sparseprune import formats
from sparseprune.bench import benchmark, build_model, prune_linear_layers, summary_line
from sparseprune.nn import SparseLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py sits next to this script
from bench_common import (  # noqa: E402
    add_output_args, add_timing_args, check_timing_args, comma_list, fill_from_grid, gflops, log, run_sections,
    speedups, time_case, write_outputs,
)

# torch's sparse CSR path says it is beta on every construction; the numbers are what we want.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

FULL = {
    "shapes": [(768, 768), (3072, 768), (768, 3072), (4096, 4096)],
    "sparsities": [0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
    "block_sparsities": [0.8, 0.9, 0.95],
    "batches": [1, 8, 64, 256],
    "repeats": 20,
}
QUICK = {
    "shapes": [(3072, 768), (768, 3072)],
    "sparsities": [0.8, 0.9, 0.95],
    "block_sparsities": [0.9],
    "batches": [1, 64],
    "repeats": 10,
}
SECTIONS = ("linear", "block", "e2e")
# Output of a candidate may differ from dense by float32 summation order only.
REL_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------- weights
def pruned_linear(out_f: int, in_f: int, sparsity: float, seed: int) -> nn.Linear:
    """nn.Linear with torch's default init, magnitude-pruned per layer (l1_unstructured)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(in_f, out_f)
    prune_linear_layers(linear, sparsity)
    return linear.eval()


def block_pruned_linear(out_f: int, in_f: int, sparsity: float, block: Tuple[int, int], seed: int) -> nn.Linear:
    """nn.Linear whose weight keeps the (1 - sparsity) fraction of r x c blocks with largest L1."""
    r, c = block
    if out_f % r or in_f % c:
        raise ValueError(f"shape {out_f}x{in_f} is not a multiple of block {r}x{c}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(in_f, out_f)
    with torch.no_grad():
        w = linear.weight
        scores = w.abs().reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))
        n_prune = int(round(sparsity * scores.numel()))
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        if n_prune:
            keep[torch.topk(scores.flatten(), n_prune, largest=False).indices] = False
        mask = keep.reshape(out_f // r, 1, in_f // c, 1).expand(-1, r, -1, c).reshape(out_f, in_f)
        w.mul_(mask)
    return linear.eval()


def torch_csr_int32(weight: torch.Tensor) -> torch.Tensor:
    csr = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32),
        csr.col_indices().to(torch.int32),
        csr.values(),
        csr.shape,
        check_invariants=True,
    )


# ------------------------------------------------------------------------------- timing
def check_all(fns: Dict[str, Callable[[], torch.Tensor]], where: str) -> Dict[str, float]:
    """Max abs error of every candidate vs fns['dense']; exits on a wrong result."""
    ref = fns["dense"]()
    scale = max(1.0, float(ref.abs().max()))
    errors = {}
    for name, fn in fns.items():
        out = torch.as_tensor(fn())
        if out.shape != ref.shape:
            raise SystemExit(f"{where}: {name} output shape {tuple(out.shape)} != dense {tuple(ref.shape)}")
        err = float((out - ref).abs().max())
        if not err <= REL_TOLERANCE * scale:
            raise SystemExit(f"{where}: {name} disagrees with dense (max abs error {err:.3g}); not timing it")
        errors[name] = err
    return errors


# ------------------------------------------------------------------------------- sections
def run_linear(args: argparse.Namespace) -> List[dict]:
    rows = []
    for out_f, in_f in args.shapes:
        for sparsity in args.sparsities:
            linear = pruned_linear(out_f, in_f, sparsity, args.seed)
            w, b = linear.weight.detach(), linear.bias.detach()
            nnz = int(torch.count_nonzero(w))
            ours = SparseLinear.from_dense(linear, "csr")  # follows torch's thread count
            tcsr = torch_csr_int32(w)
            scsr = scipy.sparse.csr_matrix(w.numpy())
            b_np = b.numpy()
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in args.batches:
                    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(args.seed + batch))
                    x_np = x.numpy()
                    b_col = b[:, None].expand(out_f, batch)
                    fns = {
                        "dense": lambda: F.linear(x, w, b),
                        "ours_csr": lambda: ours(x),
                        "torch_csr": lambda: torch.sparse.addmm(b_col, tcsr, x.T).T,
                        "scipy_csr": lambda: torch.from_numpy(np.asarray(x_np @ scsr.T) + b_np),
                    }
                    where = f"{out_f}x{in_f} s={sparsity} batch={batch} threads={threads}"
                    with torch.inference_mode():
                        errors = check_all(fns, where)
                        times, runs, warmup = time_case(fns, args)
                    rows.append(make_row("linear", out_f, in_f, sparsity, nnz, batch, threads, times, errors, runs, warmup, "ours_csr"))
                    r = rows[-1]
                    log(f"[linear] {where}: dense {times['dense']['median_ms']:.3f} ms, "
                        + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup_vs_dense"].items()))
    return rows


def run_block(args: argparse.Namespace) -> List[dict]:
    rows = []
    for out_f, in_f in args.shapes:
        for sparsity in args.block_sparsities:
            for block in formats.BLOCK_SHAPES:
                name = f"ours_bsr{block[0]}x{block[1]}"
                try:
                    linear = block_pruned_linear(out_f, in_f, sparsity, block, args.seed)
                except ValueError as exc:
                    log(f"[block] skipped: {exc}")
                    continue
                w, b = linear.weight.detach(), linear.bias.detach()
                nnz = int(torch.count_nonzero(w))
                bsr = SparseLinear.from_dense(linear, "bsr", block)
                csr = SparseLinear.from_dense(linear, "csr")
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for batch in args.batches:
                        x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(args.seed + batch))
                        fns = {"dense": lambda: F.linear(x, w, b), name: lambda: bsr(x), "ours_csr": lambda: csr(x)}
                        where = f"{out_f}x{in_f} s={sparsity} block={block} batch={batch} threads={threads}"
                        with torch.inference_mode():
                            errors = check_all(fns, where)
                            times, runs, warmup = time_case(fns, args)
                        row = make_row("block", out_f, in_f, sparsity, nnz, batch, threads, times, errors, runs, warmup, name)
                        row["block"] = list(block)
                        rows.append(row)
                        log(f"[block] {where}: dense {times['dense']['median_ms']:.3f} ms, "
                            + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup_vs_dense"].items()))
    return rows


def run_e2e(args: argparse.Namespace) -> List[dict]:
    model, input_shape = build_model("bert-ffn", seed=args.seed)
    log("[e2e] bert-ffn at 90%: converting (policy measure) and timing ...")
    result = benchmark(
        model, input_shape, sparsity=0.9, batch_sizes=(1, 64), threads=tuple(args.threads),
        warmup=args.warmup, repeats=args.repeats, seed=args.seed, name="bert-ffn",
    )
    kernels = [layer["kernel"] for layer in result.conversion["layers"]]
    rows = []
    for r in result.rows:
        row = {"section": "e2e", "model": "bert-ffn", "sparsity": 0.9, "kernels": kernels}
        row.update(vars(r))
        rows.append(row)
        log(f"[e2e] batch={r.batch} threads={r.threads}: dense {r.dense_median_ms:.3f} ms, "
            f"converted {r.sparse_median_ms:.3f} ms, {r.speedup:.2f}x")
    return rows


def make_row(section, out_f, in_f, sparsity, nnz, batch, threads, times, errors, runs, warmup, ours) -> dict:
    return {
        "section": section,
        "shape": [out_f, in_f],
        "sparsity": sparsity,
        "nnz": nnz,
        "batch": batch,
        "threads": threads,
        "times_ms": times,
        "speedup_vs_dense": speedups(times),
        "ours": ours,
        **gflops(times, ours, dense_flop=2.0 * out_f * in_f * batch, actual_flop=2.0 * nnz * batch),
        "runs": runs,
        "warmup": warmup,
        "max_abs_error": errors,
    }


# ------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    meta = result["metadata"]
    out = [
        "<!-- generated by benchmarks/bench_linear_table.py -->",
        f"Measured {meta['timestamp']}: {summary_line(meta)}.",
        "Times are medians in ms; `x` is the speedup over torch dense (F.linear) at the same "
        "thread count. scipy is single-threaded. GFLOP/s are ours: dense-equivalent "
        "(2·out·in·batch) / actual (2·nnz·batch).",
        "",
    ]
    linear = [r for r in result["rows"] if r["section"] == "linear"]
    if linear:
        out += [
            "### Linear layers, unstructured magnitude pruning",
            "",
            "| out×in | sparsity | batch | threads | torch dense | ours CSR | x | torch CSR | x | scipy CSR | x | ours GFLOP/s eq / actual |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in linear:
            t, s = r["times_ms"], r["speedup_vs_dense"]
            out.append(
                f"| {r['shape'][0]}×{r['shape'][1]} | {r['sparsity']:.2f} | {r['batch']} | {r['threads']} "
                f"| {t['dense']['median_ms']:.3f} | {t['ours_csr']['median_ms']:.3f} | {s['ours_csr']:.2f} "
                f"| {t['torch_csr']['median_ms']:.3f} | {s['torch_csr']:.2f} "
                f"| {t['scipy_csr']['median_ms']:.3f} | {s['scipy_csr']:.2f} "
                f"| {r['ours_gflops_dense_equiv']:.1f} / {r['ours_gflops_actual']:.1f} |"
            )
        out.append("")
    block = [r for r in result["rows"] if r["section"] == "block"]
    if block:
        out += [
            "### Block-pruned weights (best compiled block shape)",
            "",
            "| out×in | sparsity | batch | threads | torch dense | best block | ms | x | ours CSR, same weights, x | ours GFLOP/s eq / actual |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        groups: Dict[tuple, List[dict]] = {}
        for r in block:
            groups.setdefault((tuple(r["shape"]), r["sparsity"], r["batch"], r["threads"]), []).append(r)
        for (shape, sparsity, batch, threads), rs in groups.items():
            best = min(rs, key=lambda r: r["times_ms"][r["ours"]]["median_ms"])
            t = best["times_ms"]
            out.append(
                f"| {shape[0]}×{shape[1]} | {sparsity:.2f} | {batch} | {threads} "
                f"| {t['dense']['median_ms']:.3f} | {best['ours'].replace('ours_', '')} "
                f"| {t[best['ours']]['median_ms']:.3f} | {best['speedup_vs_dense'][best['ours']]:.2f} "
                f"| {best['speedup_vs_dense']['ours_csr']:.2f} "
                f"| {best['ours_gflops_dense_equiv']:.1f} / {best['ours_gflops_actual']:.1f} |"
            )
        out.append("")
    e2e = [r for r in result["rows"] if r["section"] == "e2e"]
    if e2e:
        out += [
            "### End to end: bert-ffn (768→3072→768→768) at 90%, sparseprune.convert vs torch eager",
            "",
            "| batch | threads | torch dense ms | converted ms | x | kernels |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for r in e2e:
            out.append(
                f"| {r['batch']} | {r['threads']} | {r['dense_median_ms']:.3f} | {r['sparse_median_ms']:.3f} "
                f"| {r['speedup']:.2f} | {', '.join(r['kernels'])} |"
            )
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------- arguments
def _shape(text: str) -> Tuple[int, int]:
    out_f, _, in_f = text.lower().partition("x")
    shape = (int(out_f), int(in_f))
    if min(shape) < 1:
        raise ValueError(text)
    return shape


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=comma_list(_shape, lambda s: True, "OUTxIN shapes"), help="e.g. 3072x768,768x3072")
    p.add_argument("--sparsities", type=comma_list(float, lambda v: 0 <= v < 1, "fractions in [0, 1)"))
    p.add_argument("--block-sparsities", type=comma_list(float, lambda v: 0 <= v < 1, "fractions in [0, 1)"))
    p.add_argument("--batches", type=comma_list(int, lambda v: v >= 1, "positive ints"))
    p.add_argument("--threads", type=comma_list(int, lambda v: v >= 1, "positive ints"), default=[1, 2])
    add_timing_args(p, SECTIONS)
    p.add_argument("--quick", action="store_true", help="a small grid (2 shapes, 3 sparsities, batches 1,64): a few minutes at most")
    add_output_args(p, "bench_linear_table.json")
    args = p.parse_args(argv)
    fill_from_grid(args, QUICK if args.quick else FULL, ("shapes", "sparsities", "block_sparsities", "batches", "repeats"))
    check_timing_args(p, args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = run_sections(args, {"linear": run_linear, "block": run_block, "e2e": run_e2e})
    grid = {k: getattr(args, k) for k in ("shapes", "sparsities", "block_sparsities", "batches", "sections")}
    write_outputs(args, rows, markdown, started, head={"grid": grid}, notes={
        "torch_csr": "int32 indices, torch.sparse.addmm(bias, csr, x.T).T (output left transposed)",
        "scipy_csr": "x @ csr.T + b, scipy.sparse.csr_matrix, single-threaded",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
