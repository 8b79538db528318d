"""Issue 5's targets for compiled executables, each against torch eager dense in the same run:

  bert      a BERT-base encoder layer (nn.TransformerEncoderLayer d=768, 12 heads, FFN 3072, GELU,
            batch_first) with 90% of every projection weight removed by per-matrix magnitude,
            sequence 128: torch eager (its fused inference path) vs sparseprune.compile.
  resnet18  the resnet18 model (224x224) with 90% L1 magnitude on every conv and the Linear.
  depthwise MobileNetV2's depthwise 3x3 layers (96 channels @56x56, stride 1 and 2; 384 @14),
            dense and 90% pruned, each compiled alone (compile times its kernels) vs F.conv2d.
  overhead  a single small Linear (16 -> 16, CSR): Executable.run and the native Plan.run vs the
            bare kernel call (PackedLinear.forward) on the same weights, batch 1, one thread.
  size      the saved file of each model above vs its dense float32 weights.

Timing: sparseprune.timing.time_interleaved, round robin (each round: one untimed then three timed
calls per candidate), after warm-up, medians and p90 over all timed calls, at the same thread
count for torch and the executable. (Timing the two in alternating blocks of calls instead gave
the same medians within 5% on a quiet machine.)

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
from sparseprune.timing import time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py sits next to this script
from bench_common import log, max_rel_diff, steal_seconds  # noqa: E402

SECTIONS = ("bert", "resnet18", "depthwise", "overhead", "size")


def time_candidates(fns: Dict[str, Callable[[], object]], repeats: int, min_time_s: float) -> Dict[str, Dict[str, float]]:
    """Median and p90 (ms) of each callable, timed round robin (see the module doc)."""
    times = time_interleaved(fns, warmup=3, repeats=repeats, min_time_s=min_time_s)
    return {k: {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "calls": t.runs} for k, t in times.items()}


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


def compare_model(section: str, model: nn.Module, sample_shape, args, files: Dict[str, int]) -> List[dict]:
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {b: torch.randn(b, *sample_shape, generator=gen) for b in args.batch_sizes}
    for threads in args.threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        exe = sparseprune.compile(model, (inputs[args.batch_sizes[0]],), num_threads=threads)
        compile_s = time.perf_counter() - t0
        kernels = sorted({row.get("format", row["op"]) for row in exe.layer_table()})
        for batch, x in inputs.items():
            xn = x.numpy()
            with torch.no_grad():
                diff = max_rel_diff(exe.run(xn), model(x).numpy())
                steal0 = steal_seconds()
                times = time_candidates({"torch_dense": lambda: model(x), "executable": lambda: exe.run(xn)},
                                        args.repeats, args.min_time_s)
                steal = steal_seconds() - steal0
            speedup = times["torch_dense"]["median_ms"] / times["executable"]["median_ms"]
            rows.append({"section": section, "batch": batch, "threads": threads, "times": times,
                         "speedup": speedup, "max_rel_diff": diff, "compile_s": compile_s, "kernels": kernels,
                         "steal_s": steal})
            log(f"{section} batch={batch} threads={threads}: torch {times['torch_dense']['median_ms']:.2f} ms, "
                f"executable {times['executable']['median_ms']:.2f} ms, {speedup:.2f}x, max rel diff {diff:.1e}, "
                f"steal {steal:.2f} s")
        if section not in files:
            xn = inputs[args.batch_sizes[0]].numpy()
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


DEPTHWISE_LAYERS = [(96, 56, 1), (96, 56, 2), (384, 14, 1)]  # (channels, H = W, stride)


def run_depthwise(args) -> List[dict]:
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for channels, hw, stride in DEPTHWISE_LAYERS:
            for sparsity in (0.0, args.sparsity):
                conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels).eval()
                with torch.no_grad():
                    conv.weight[torch.rand(conv.weight.shape, generator=gen) < sparsity] = 0
                model = nn.Sequential(conv)
                x = torch.randn(1, channels, hw, hw, generator=gen)
                exe = sparseprune.compile(model, (x,), num_threads=threads)
                xn = x.numpy()
                with torch.no_grad():
                    diff = max_rel_diff(exe.run(xn), model(x).numpy())
                    times = time_candidates({"torch_dense": lambda: model(x), "executable": lambda: exe.run(xn)},
                                            args.repeats, args.min_time_s / 2)
                speedup = times["torch_dense"]["median_ms"] / times["executable"]["median_ms"]
                kernel = exe.layer_table()[0]["format"]
                label = f"dw3x3 {channels}@{hw} s{stride} {sparsity:.0%}"
                rows.append({"section": "depthwise", "layer": label, "batch": 1, "threads": threads, "times": times,
                             "speedup": speedup, "max_rel_diff": diff, "kernels": [kernel], "steal_s": 0.0})
                log(f"{label} threads={threads}: torch {times['torch_dense']['median_ms']:.3f} ms, executable "
                    f"{times['executable']['median_ms']:.3f} ms ({kernel}), {speedup:.2f}x")
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
    times = time_candidates({"kernel": lambda: packed.forward(x, False, 1), "plan_run": lambda: plan.run([x], 1),
                         "executable_run": lambda: exe.run(x)}, args.repeats * 10, args.min_time_s / 2)
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
             "| model | batch | threads | torch dense ms | executable ms | speedup | max rel diff | kernels | steal s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["section"] in ("bert", "resnet18", "depthwise"):
            t = r["times"]
            lines.append(f"| {r.get('layer', r['section'])} | {r['batch']} | {r['threads']} | {t['torch_dense']['median_ms']:.3f} | "
                         f"{t['executable']['median_ms']:.3f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} | "
                         f"{', '.join(r['kernels'])} | {r['steal_s']:.2f} |")
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
    p.add_argument("--batch-sizes", default="1", help="comma list; BERT's batch is of 128-token sequences")
    p.add_argument("--repeats", type=int, default=30, help="round-robin rounds (at least)")
    p.add_argument("--min-time-s", type=float, default=2.0, help="keep adding rounds (up to 10x) until this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    args.sections = args.sections.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started = time.perf_counter()
    previous = torch.get_num_threads()
    rows: List[dict] = []
    files: Dict[str, int] = {}
    try:
        if "bert" in args.sections:
            rows += compare_model("bert", bert_layer(args.sparsity, args.seed), (128, 768), args, files)
        if "resnet18" in args.sections:
            rows += compare_model("resnet18", resnet(args.sparsity, args.seed), (3, 224, 224), args, files)
        if "depthwise" in args.sections:
            rows += run_depthwise(args)
        if "overhead" in args.sections:
            rows += run_overhead(args)
    finally:
        torch.set_num_threads(previous)
    if "size" not in args.sections:
        rows = [r for r in rows if r["section"] != "size"]
    meta = run_metadata(args.threads)
    meta.update({"command": "python benchmarks/bench_executable.py " + " ".join(argv if argv else sys.argv[1:]),
                 "sparsity": args.sparsity, "repeats": args.repeats, "min_time_s": args.min_time_s,
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
