"""Issue 5's targets for compiled executables, each against torch eager dense in the same run:

  bert      a BERT-base encoder layer (nn.TransformerEncoderLayer d=768, 12 heads, FFN 3072, GELU,
            batch_first) with 90% of every projection weight removed by per-matrix magnitude,
            sequence 128: torch eager (its fused inference path) vs sparseprune.compile.
  resnet18  the resnet18 model (224x224) with 90% L1 magnitude on every conv and the Linear.
  overhead  a single small Linear (16 -> 16, CSR): Executable.run and the native Plan.run vs the
            bare kernel call (PackedLinear.forward) on the same weights, batch 1, one thread.
  size      the saved file of each model above vs its dense float32 weights.

Timing: blocks, not call-by-call round robin. torch and the extension each bring an OpenMP runtime
whose idle threads spin for a while after every parallel region; on a 2-core machine, alternating
single calls makes each side pay for the other's spinning threads (seen here: the executable
measured up to 2x slower interleaved per call than in blocks). A service runs one of them, so each
round times a block of calls of one candidate after two warm-up calls, the candidates alternate
block by block for --rounds rounds, and the median and p90 are over all timed calls.

Run from the repository root: python benchmarks/bench_executable.py [--json F] [--markdown F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

import sparseprune
from sparseprune import formats
from sparseprune.bench import build_model, prune_linear_layers, run_metadata
from sparseprune.runtime import Executable

SECTIONS = ("bert", "resnet18", "overhead", "size")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_blocks(fns: Dict[str, Callable[[], object]], rounds: int, block_s: float) -> Dict[str, Dict[str, float]]:
    """Median and p90 (ms) of each callable, timed in alternating blocks (see the module doc)."""
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    per_call = {}
    for k, fn in fns.items():
        t = time.perf_counter()
        fn()
        per_call[k] = max(time.perf_counter() - t, 1e-7)
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            fn()
            n = max(5, min(2000, int(block_s / per_call[k])))
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t)
    return {k: {"median_ms": float(np.median(v)) * 1e3, "p90_ms": float(np.percentile(v, 90)) * 1e3,
                "calls": len(v)} for k, v in samples.items()}


def max_rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def bert_layer(sparsity: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True, activation="gelu").eval()
    with torch.no_grad():
        for p in (layer.self_attn.in_proj_weight, layer.self_attn.out_proj.weight, layer.linear1.weight,
                  layer.linear2.weight):
            k = int(p.numel() * sparsity)
            threshold = p.abs().flatten().kthvalue(k).values
            p.mul_((p.abs() > threshold).to(p.dtype))
    return layer


def resnet(sparsity: float, seed: int) -> nn.Module:
    model, _ = build_model("resnet18", seed=seed)
    prune_linear_layers(model, sparsity)
    return model.eval()


def compare_model(section: str, model: nn.Module, x: torch.Tensor, args, files: Dict[str, int]) -> List[dict]:
    rows = []
    with torch.no_grad():
        ref = model(x).numpy()
    for threads in args.threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        exe = sparseprune.compile(model, (x,), num_threads=threads)
        compile_s = time.perf_counter() - t0
        xn = x.numpy()
        diff = max_rel_diff(exe.run(xn), ref)
        with torch.no_grad():
            times = time_blocks({"torch_dense": lambda: model(x), "executable": lambda: exe.run(xn)},
                                args.rounds, args.block_s)
        speedup = times["torch_dense"]["median_ms"] / times["executable"]["median_ms"]
        kernels = sorted({row.get("format", row["op"]) for row in exe.layer_table()})
        rows.append({"section": section, "batch": int(x.shape[0]), "threads": threads, "times": times,
                     "speedup": speedup, "max_rel_diff": diff, "compile_s": compile_s, "kernels": kernels})
        log(f"{section} threads={threads}: torch {times['torch_dense']['median_ms']:.2f} ms, executable "
            f"{times['executable']['median_ms']:.2f} ms, {speedup:.2f}x, max rel diff {diff:.1e}")
        if section not in files:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.safetensors")
                size = exe.save(path)
                loaded = sparseprune.load(path)
                assert np.array_equal(loaded.run(xn), exe.run(xn)), "a loaded executable must give the same outputs"
            dense = sum(p.numel() * 4 for p in model.parameters())
            files[section] = size
            rows.append({"section": "size", "model": section, "file_bytes": size, "dense_fp32_bytes": dense,
                         "ratio": size / dense})
    return rows


def run_overhead(args) -> List[dict]:
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    weight = rng.standard_normal((16, 16)).astype(np.float32)
    weight[rng.random((16, 16)) < 0.5] = 0.0
    bias = rng.standard_normal(16).astype(np.float32)
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    x = rng.standard_normal((1, 16)).astype(np.float32)
    exe = sparseprune.compile(layer, (torch.from_numpy(x),), policy="threshold", num_threads=1)
    # The threshold policy packs this 50%-sparse layer dense; use the CSR spec for a like-for-like kernel.
    spec = exe.spec
    spec["ops"][0].update({"format": "csr"})
    arrays = {k: v for k, v in exe.arrays.items() if not k.endswith(".weight")}
    name = spec["ops"][0]["weight"]
    indptr, indices, values = formats.csr_arrays(weight)
    arrays.update({f"{name}.indptr": np.asarray(indptr, np.int64), f"{name}.indices": np.asarray(indices, np.int32),
                   f"{name}.values": np.asarray(values, np.float32)})
    exe = Executable.from_spec(spec, arrays, n_threads=1)
    packed = formats.pack(weight, bias, "csr")
    plan = exe._plan
    assert np.allclose(exe.run(x), packed.forward(x, False, 1), atol=1e-6)
    times = time_blocks({"kernel": lambda: packed.forward(x, False, 1), "plan_run": lambda: plan.run([x], 1),
                         "executable_run": lambda: exe.run(x)}, args.rounds, args.block_s / 4)
    k = times["kernel"]["median_ms"]
    row = {"section": "overhead", "times": times,
           "plan_overhead_us": (times["plan_run"]["median_ms"] - k) * 1e3,
           "executable_overhead_us": (times["executable_run"]["median_ms"] - k) * 1e3}
    log(f"overhead: kernel {k * 1e3:.2f} us, plan.run +{row['plan_overhead_us']:.2f} us, "
        f"Executable.run +{row['executable_overhead_us']:.2f} us")
    return [row]


def markdown(result: dict) -> str:
    meta = result["metadata"]
    lines = [f"# Compiled executables vs torch eager dense ({meta.get('cpu', '')})", "",
             f"Command: `{meta['command']}`", "",
             "| model | batch | threads | torch dense ms | executable ms | speedup | max rel diff | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["section"] in ("bert", "resnet18"):
            t = r["times"]
            lines.append(f"| {r['section']} | {r['batch']} | {r['threads']} | {t['torch_dense']['median_ms']:.2f} | "
                         f"{t['executable']['median_ms']:.2f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} | "
                         f"{', '.join(r['kernels'])} |")
    for r in result["rows"]:
        if r["section"] == "overhead":
            t = r["times"]
            lines += ["", "| tiny Linear 16->16, batch 1, 1 thread | median us |", "|---|---|",
                      f"| bare kernel (PackedLinear.forward) | {t['kernel']['median_ms'] * 1e3:.2f} |",
                      f"| native Plan.run | {t['plan_run']['median_ms'] * 1e3:.2f} (+{r['plan_overhead_us']:.2f}) |",
                      f"| Executable.run | {t['executable_run']['median_ms'] * 1e3:.2f} "
                      f"(+{r['executable_overhead_us']:.2f}) |"]
    sizes = [r for r in result["rows"] if r["section"] == "size"]
    if sizes:
        lines += ["", "| file | bytes | dense fp32 weights | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['file_bytes']:,} | {r['dense_fp32_bytes']:,} | {r['ratio']:.1%} |" for r in sizes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block-s", type=float, default=0.4, help="seconds per timed block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    args.sections = args.sections.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    started = time.perf_counter()
    previous = torch.get_num_threads()
    rows: List[dict] = []
    files: Dict[str, int] = {}
    try:
        if "bert" in args.sections:
            rows += compare_model("bert", bert_layer(args.sparsity, args.seed), torch.randn(1, 128, 768), args, files)
        if "resnet18" in args.sections:
            rows += compare_model("resnet18", resnet(args.sparsity, args.seed), torch.randn(1, 3, 224, 224), args,
                                  files)
        if "overhead" in args.sections:
            rows += run_overhead(args)
    finally:
        torch.set_num_threads(previous)
    if "size" not in args.sections:
        rows = [r for r in rows if r["section"] != "size"]
    meta = run_metadata(args.threads)
    meta.update({"command": "python benchmarks/bench_executable.py " + " ".join(argv if argv else sys.argv[1:]),
                 "sparsity": args.sparsity, "rounds": args.rounds, "block_s": args.block_s,
                 "elapsed_s": time.perf_counter() - started})
    result = {"metadata": meta, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    text = markdown(result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
