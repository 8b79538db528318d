#!/usr/bin/env python
"""Convolution speed table: sparseprune's direct sparse conv (SparseConv2d) vs torch dense.

Sections (choose with --sections):
  layers      single convolutions from ResNet-18/50 and MobileNetV2, unstructured L1-magnitude
              pruning; SparseConv2d vs torch.nn.functional.conv2d
  structured  the 3x3 ResNet-18 shapes at batch 1 with structured sparsity: (a) 90% of the k x k
              kernels removed (sparseprune.prune.kernels), (b) 4-of-9 intra-kernel patterns plus
              50% connectivity (sparseprune.prune.patterns); SparseConv2d vs dense, and vs
              SparseConv2d on unstructured weights of the same sparsity
  e2e         the resnet18 model: (a) 90% magnitude on every conv and the final Linear, then
              sparseprune.convert vs torch eager dense; (b) 50% of the filters removed and the
              model physically shrunk (sparseprune.shrink), shrunk vs the original dense model

Every implementation is checked against dense on the very input it is then timed on (max abs
error over max |dense output| below 1e-4 for single layers, 1e-3 end to end, where BatchNorm
folding reorders the arithmetic; otherwise the script stops). All candidates of one case run
round-robin (sparseprune.timing.time_interleaved) after a warm-up at the same torch/OpenMP
thread count; medians and p90 are reported, speedups are dense median / candidate median. Slow
cases get fewer rounds (never fewer than --min-repeats) so the full grid finishes; `runs`
records how many.

Shapes are written [dw]KxK:CIN-COUT@H[xW][/sS]: "3x3:64-64@56" is a 3x3 conv 64->64 on a 56x56
input, "1x1:256-64@56" a pointwise one, "dw3x3:96@56" a depthwise 3x3 conv (groups = 96 channels).
Padding is k // 2 (zeros), stride 1 unless /sS is given; every conv has a bias (as after
BatchNorm folding).

    python benchmarks/bench_conv_table.py --quick --json conv.json --markdown conv.md
    python benchmarks/bench_conv_table.py --json conv.json --markdown conv.md        # full grid
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparseprune import prune
from sparseprune.bench import build_model, summary_line
from sparseprune.convert import convert
from sparseprune.nn import SparseConv2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py sits next to this script
from bench_common import (  # noqa: E402
    add_output_args, add_timing_args, check_timing_args, comma_list, fill_from_grid, gflops, log, run_sections,
    speedups, time_case, write_outputs,
)

# Where the default shapes come from (224x224 inputs).
SOURCES = {
    "3x3:64-64@56": "ResNet-18/50 layer1 3x3",
    "3x3:128-128@28": "ResNet-18/50 layer2 3x3",
    "3x3:256-256@14": "ResNet-18/50 layer3 3x3",
    "3x3:512-512@7": "ResNet-18/50 layer4 3x3",
    "1x1:256-64@56": "ResNet-50 layer1 1x1 reduce",
    "dw3x3:96@56": "MobileNetV2 depthwise",
    "dw3x3:384@14": "MobileNetV2 depthwise",
}
FULL = {
    "shapes": list(SOURCES),
    "sparsities": [0.9],
    "batches": [1, 8],
    "threads": [1, 2],
    "repeats": 20,
}
QUICK = {
    "shapes": ["3x3:128-128@28", "1x1:256-64@56", "dw3x3:96@56"],
    "sparsities": [0.9],
    "batches": [1],
    "threads": [2],
    "repeats": 10,
}
SECTIONS = ("layers", "structured", "e2e")
# Single layers: float32 summation order only (K <= 4608 terms).
LAYER_TOLERANCE = 1e-4
# Whole networks: ~20 layers, BatchNorm folded into the weights by convert.
E2E_TOLERANCE = 1e-3
E2E_SPARSITY = 0.9
FILTER_FRACTION = 0.5
KERNEL_FRACTION = 0.9
PATTERNS = {"n_patterns": 4, "pattern_size": 4, "connectivity": 0.5}


# ------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ConvShape:
    spec: str
    cin: int
    cout: int
    kh: int
    kw: int
    h: int
    w: int
    stride: int = 1
    groups: int = 1

    @property
    def padding(self) -> Tuple[int, int]:
        return (self.kh // 2, self.kw // 2)

    @property
    def out_hw(self) -> Tuple[int, int]:
        ph, pw = self.padding
        return ((self.h + 2 * ph - self.kh) // self.stride + 1, (self.w + 2 * pw - self.kw) // self.stride + 1)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin

    @property
    def weights(self) -> int:
        return self.cout * (self.cin // self.groups) * self.kh * self.kw

    def label(self) -> str:
        kind = f"dw {self.kh}x{self.kw}" if self.depthwise else f"{self.kh}x{self.kw}"
        chans = f"{self.cin}" if self.depthwise else f"{self.cin}→{self.cout}"
        stride = f" /{self.stride}" if self.stride != 1 else ""
        return f"{kind} {chans} @{self.h}x{self.w}{stride}"

    def source(self) -> str:
        return SOURCES.get(self.spec, "")


_SHAPE_RE = re.compile(r"^(dw)?(\d+)(?:x(\d+))?:(\d+)(?:-(\d+))?@(\d+)(?:x(\d+))?(?:/s(\d+))?$")


def parse_shape(text: str) -> ConvShape:
    spec = text.strip().lower()
    m = _SHAPE_RE.match(spec)
    if not m:
        raise ValueError(text)
    dw, kh, kw, cin, cout, h, w, stride = m.groups()
    kh = int(kh)
    kw = int(kw) if kw else kh
    cin = int(cin)
    cout = int(cout) if cout else cin
    h = int(h)
    w = int(w) if w else h
    stride = int(stride) if stride else 1
    if dw and cout != cin:
        raise ValueError(text)  # depthwise: one output channel per input channel
    if (not dw and not m.group(5)) or min(kh, kw, cin, cout, h, w, stride) < 1:
        raise ValueError(text)
    shape = ConvShape(spec, cin, cout, kh, kw, h, w, stride, cin if dw else 1)
    if min(shape.out_hw) < 1:
        raise ValueError(text)
    return shape


def make_conv(shape: ConvShape, seed: int) -> nn.Conv2d:
    """nn.Conv2d with torch's default init (bias included), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = nn.Conv2d(shape.cin, shape.cout, (shape.kh, shape.kw), shape.stride, shape.padding,
                         groups=shape.groups, bias=True)
    return conv.eval()


def magnitude_conv(shape: ConvShape, sparsity: float, seed: int) -> nn.Conv2d:
    conv = make_conv(shape, seed)
    prune.magnitude(conv, float(sparsity))
    prune.remove(conv)
    return conv


def conv_input(shape: ConvShape, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, shape.cin, shape.h, shape.w, generator=torch.Generator().manual_seed(seed + batch))


def dense_fn(conv: nn.Conv2d, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    w = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()
    return lambda: F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def nnz_of(conv: nn.Conv2d) -> int:
    return int(torch.count_nonzero(conv.weight.detach()))


# ------------------------------------------------------------------------------- checking and timing
def check(ref_fn: Callable[[], torch.Tensor], fn: Callable[[], torch.Tensor], tolerance: float, where: str) -> float:
    """Max abs error of fn() vs ref_fn(); stops the run when it exceeds tolerance x max |ref|."""
    ref = ref_fn()
    out = torch.as_tensor(fn())
    if out.shape != ref.shape:
        raise SystemExit(f"{where}: output shape {tuple(out.shape)} != dense {tuple(ref.shape)}; not timing it")
    err = float((out - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    if not err <= tolerance * scale:  # also catches NaN
        raise SystemExit(
            f"{where}: disagrees with dense (max abs error {err:.3g}, {err / scale:.3g} of max |output| "
            f"{scale:.3g}, tolerance {tolerance:g}); not timing it"
        )
    return err


def layer_row(section: str, shape: ConvShape, sparsity: float, nnz: int, batch: int, threads: int,
              times, errors, runs, warmup) -> dict:
    oh, ow = shape.out_hw
    pixels = oh * ow * batch
    return {
        "section": section,
        "shape": shape.spec,
        "label": shape.label(),
        "source": shape.source(),
        "conv": {"in": shape.cin, "out": shape.cout, "kernel": [shape.kh, shape.kw], "input_hw": [shape.h, shape.w],
                 "output_hw": [oh, ow], "stride": shape.stride, "padding": list(shape.padding), "groups": shape.groups},
        "sparsity": sparsity,
        "nnz": nnz,
        "batch": batch,
        "threads": threads,
        "times_ms": times,
        "speedup_vs_dense": speedups(times),
        **gflops(times, "ours", dense_flop=2.0 * shape.weights * pixels, actual_flop=2.0 * nnz * pixels),
        "runs": runs,
        "warmup": warmup,
        "max_abs_error": errors,
    }


# ------------------------------------------------------------------------------- sections
def run_layers(args: argparse.Namespace) -> List[dict]:
    rows = []
    for shape in args.shapes:
        for sparsity in args.sparsities:
            conv = magnitude_conv(shape, sparsity, args.seed)
            nnz = nnz_of(conv)
            ours = SparseConv2d.from_dense(conv)  # follows torch's thread count
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in args.batches:
                    x = conv_input(shape, batch, args.seed)
                    fns = {"dense": dense_fn(conv, x), "ours": lambda: ours(x)}
                    where = f"{shape.spec} s={sparsity} batch={batch} threads={threads}"
                    with torch.inference_mode():
                        errors = {"ours": check(fns["dense"], fns["ours"], LAYER_TOLERANCE, where)}
                        times, runs, warmup = time_case(fns, args)
                    rows.append(layer_row("layers", shape, sparsity, nnz, batch, threads, times, errors, runs, warmup))
                    log(f"[layers] {where}: dense {times['dense']['median_ms']:.3f} ms, "
                        f"ours {times['ours']['median_ms']:.3f} ms, {rows[-1]['speedup_vs_dense']['ours']:.2f}x")
    return rows


def structured_conv(shape: ConvShape, method: str, seed: int) -> nn.Conv2d:
    conv = make_conv(shape, seed)
    if method == "kernels":
        prune.kernels(conv, KERNEL_FRACTION)
    elif method == "patterns":
        prune.patterns(conv, **PATTERNS)
    else:
        raise ValueError(method)
    prune.remove(conv)
    return conv


STRUCTURED = {
    "kernels": f"kernels: {KERNEL_FRACTION:.0%} of k×k kernels",
    "patterns": (f"patterns {PATTERNS['pattern_size']}-of-9 ({PATTERNS['n_patterns']} patterns) "
                 f"+ {PATTERNS['connectivity']:.0%} connectivity"),
}


def run_structured(args: argparse.Namespace) -> List[dict]:
    rows = []
    shapes = [s for s in args.shapes if (s.kh, s.kw) == (3, 3) and s.groups == 1]
    if not shapes:
        log("[structured] skipped: no dense 3x3 shape in --shapes")
    batch = 1
    for shape in shapes:
        for method in STRUCTURED:
            conv = structured_conv(shape, method, args.seed)
            nnz = nnz_of(conv)
            sparsity = 1.0 - nnz / shape.weights
            ours = SparseConv2d.from_dense(conv)
            # The same kernel on unstructured weights of the same sparsity: what the structure buys.
            uconv = magnitude_conv(shape, sparsity, args.seed)
            unstructured = SparseConv2d.from_dense(uconv)
            for threads in args.threads:
                torch.set_num_threads(threads)
                x = conv_input(shape, batch, args.seed)
                fns = {"dense": dense_fn(conv, x), "ours": lambda: ours(x), "ours_unstructured": lambda: unstructured(x)}
                where = f"{shape.spec} {method} (s={sparsity:.3f}) batch={batch} threads={threads}"
                with torch.inference_mode():
                    errors = {
                        "ours": check(fns["dense"], fns["ours"], LAYER_TOLERANCE, where),
                        "ours_unstructured": check(dense_fn(uconv, x), fns["ours_unstructured"], LAYER_TOLERANCE,
                                                   where + " unstructured"),
                    }
                    times, runs, warmup = time_case(fns, args)
                row = layer_row("structured", shape, sparsity, nnz, batch, threads, times, errors, runs, warmup)
                row["method"] = method
                row["method_label"] = STRUCTURED[method]
                row["unstructured_nnz"] = nnz_of(uconv)
                rows.append(row)
                s = row["speedup_vs_dense"]
                log(f"[structured] {where}: dense {times['dense']['median_ms']:.3f} ms, "
                    f"ours {s['ours']:.2f}x, unstructured same sparsity {s['ours_unstructured']:.2f}x")
    return rows


def count_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds x 2 of the model's Conv2d and Linear layers for input x, per sample."""
    total = [0.0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += 2.0 * output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total[0] += 2.0 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0] / x.shape[0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def e2e_timing(section: str, ref: nn.Module, candidate: nn.Module, checked_against: nn.Module, in_shape,
               args: argparse.Namespace, extra: dict) -> List[dict]:
    """Check candidate against `checked_against` and time it against `ref`, per (threads, batch)."""
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.e2e_batches:
            x = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(args.seed + 1000 + batch))
            fns = {"dense": lambda: ref(x), "ours": lambda: candidate(x)}
            where = f"[e2e] {args.e2e_model} {section} batch={batch} threads={threads}"
            with torch.inference_mode():
                err = check(lambda: checked_against(x), fns["ours"], E2E_TOLERANCE, where)
                times, runs, warmup = time_case(fns, args)
            row = {"section": section, "model": args.e2e_model, "batch": batch, "threads": threads,
                   "times_ms": times, "speedup_vs_dense": speedups(times), "runs": runs, "warmup": warmup,
                   "max_abs_error": err}
            row.update(extra)
            rows.append(row)
            log(f"{where}: dense {times['dense']['median_ms']:.2f} ms, ours {times['ours']['median_ms']:.2f} ms, "
                f"{row['speedup_vs_dense']['ours']:.2f}x")
    return rows


def run_e2e_convert(args: argparse.Namespace) -> List[dict]:
    model, in_shape = build_model(args.e2e_model, seed=args.seed)
    pruned = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.magnitude(m, E2E_SPARSITY)
            pruned += 1
    prune.remove(model)
    x1 = torch.randn(1, *in_shape, generator=torch.Generator().manual_seed(args.seed))
    batches = tuple(args.e2e_batches)
    convert_threads = args.threads[0]
    torch.set_num_threads(convert_threads)
    log(f"[e2e] {args.e2e_model} at {E2E_SPARSITY:.0%}: converting (policy measure, {convert_threads} thread(s), "
        f"batches {list(batches)}) ...")
    t0 = time.perf_counter()
    # num_threads=None: the converted layers follow torch's thread count at every call.
    converted = convert(model, example_inputs=(x1,), batch_sizes=batches, conv_batch_sizes=batches)
    convert_s = time.perf_counter() - t0
    layers = converted.sparseprune_report.to_dict()["layers"]
    kernels: Dict[str, Dict[str, int]] = {}
    for layer in layers:
        per_type = kernels.setdefault(layer["layer_type"], {})
        per_type[layer["kernel"]] = per_type.get(layer["kernel"], 0) + 1
    extra = {
        "sparsity": E2E_SPARSITY, "pruned_layers": pruned, "convert_s": convert_s, "convert_threads": convert_threads,
        "convert_kwargs": {"example_inputs": [list(x1.shape)], "batch_sizes": list(batches),
                           "conv_batch_sizes": list(batches), "policy": "measure", "num_threads": None},
        "kernels": kernels, "conversion": layers,
        "dense_baseline": "the same pruned model in torch eager (BatchNorm not folded), torch.inference_mode()",
    }
    log(f"[e2e] converted in {convert_s:.1f} s: {kernels}")
    return e2e_timing("e2e_convert", model, converted, model, in_shape, args, extra)


def is_basic_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample"))


def channel_groups(model: nn.Module) -> Tuple[List[List[Tuple[nn.Conv2d, nn.BatchNorm2d]]], List[Tuple[nn.Conv2d, nn.BatchNorm2d]]]:
    """(coupled groups, independent convs) of a ResNet laid out as sparseprune.bench.models builds it.

    Inside a basic block conv1's output channels are its own. The channels of the residual stream
    are summed by the adds, so the stem (or a block's downsample conv) and the conv2 of every
    block on that stream must drop the same channels, or shrink has to keep them.
    """
    pairs = prune.conv_bn_pairs(model)
    groups: List[List[Tuple[nn.Conv2d, nn.BatchNorm2d]]] = []
    independent: List[Tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    for child in model.children():
        if isinstance(child, nn.Conv2d):
            if child not in pairs:
                raise ValueError("stem conv without a BatchNorm after it")
            groups.append([(child, pairs[child])])
        elif is_basic_block(child):
            if not groups:
                raise ValueError("residual block before any stem conv")
            independent.append((child.conv1, child.bn1))
            if child.downsample is not None:
                ds_conv, ds_bn = child.downsample[0], child.downsample[1]
                groups.append([(ds_conv, ds_bn)])
            groups[-1].append((child.conv2, child.bn2))
    covered = {id(c) for g in groups for c, _ in g} | {id(c) for c, _ in independent}
    missing = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in covered]
    if missing:
        raise ValueError(f"channel groups known only for the basic-block ResNet layout; convs not covered: {missing}")
    return groups, independent


def prune_channels(model: nn.Module, fraction: float) -> Dict[str, int]:
    """Zero `fraction` of the output channels of every conv (and their BatchNorm), coupled
    channels of a residual stream alike (summed L1 filter norms, each conv's normalised by its mean)."""
    groups, independent = channel_groups(model)
    for conv, bn in independent:
        prune.filters(conv, fraction, importance="l1", bn=bn)
    for group in groups:
        score = None
        for conv, _ in group:
            l1 = conv.weight.detach().abs().sum(dim=(1, 2, 3))
            l1 = l1 / l1.mean().clamp_min(1e-12)
            score = l1 if score is None else score + l1
        n_drop = int(round(fraction * score.numel()))
        keep = torch.ones_like(score)
        keep[torch.sort(score, stable=True).indices[:n_drop]] = 0.0
        for conv, bn in group:  # the 0/1 scores make every member drop exactly the same channels
            prune.filters(conv, n_drop, importance=keep, bn=bn)
    return {"coupled_groups": len(groups), "coupled_convs": sum(len(g) for g in groups), "independent_convs": len(independent)}


def run_e2e_shrink(args: argparse.Namespace) -> List[dict]:
    try:
        from sparseprune.shrink import shrink
    except ImportError as exc:
        log(f"[e2e] skipped: sparseprune.shrink not available ({exc})")
        return [{"section": "e2e_shrink", "model": args.e2e_model, "skipped": "sparseprune.shrink not available"}]
    original, in_shape = build_model(args.e2e_model, seed=args.seed)
    masked = copy.deepcopy(original)
    # no_grad: the masked `weight` the pruning hook computes must not carry autograd history, or
    # deep-copying the model (shrink(inplace=False) does) fails on a non-leaf tensor.
    with torch.no_grad():
        groups = prune_channels(masked, FILTER_FRACTION)
    x1 = torch.randn(1, *in_shape, generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    shrunk = shrink(masked, (x1,)).eval()
    shrink_s = time.perf_counter() - t0
    report = getattr(shrunk, "sparseprune_shrink_report", None)
    params_before, params_after = n_params(original), n_params(shrunk)
    flops_before, flops_after = count_flops(original, x1), count_flops(shrunk, x1)
    kept = [] if report is None else [{"path": k.path, "channels": len(k.channels), "reason": k.reason} for k in report.kept]
    log(f"[e2e] {args.e2e_model} {FILTER_FRACTION:.0%} filters: shrunk in {shrink_s:.1f} s, parameters "
        f"{params_before} -> {params_after}, GFLOP/image {flops_before / 1e9:.3f} -> {flops_after / 1e9:.3f}"
        + (f"; {sum(k['channels'] for k in kept)} constant channels kept" if kept else ""))
    if not params_after < params_before:
        raise SystemExit(f"[e2e] shrink left {args.e2e_model} at {params_after} parameters (was {params_before}): "
                         "nothing was removed, refusing to time it")
    extra = {
        "filter_fraction": FILTER_FRACTION, "importance": "l1", "grouping": groups, "shrink_s": shrink_s,
        "params_before": params_before, "params_after": params_after,
        "gflop_per_sample_before": flops_before / 1e9, "gflop_per_sample_after": flops_after / 1e9,
        "kept_constant_channels": kept,
        "dense_baseline": "the original (unpruned) model in torch eager, torch.inference_mode()",
        "checked_against": "the masked (pruned, not shrunk) model",
    }
    # Correctness: the shrunk model must equal the masked one; speed: against the original model.
    return e2e_timing("e2e_shrink", original, shrunk, masked, in_shape, args, extra)


# ------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    meta = result["metadata"]
    threads = ", ".join(str(t) for t in meta["threads"])
    out = [
        "<!-- generated by benchmarks/bench_conv_table.py -->",
        f"`{meta['command']}` on {meta['cpu']} ({meta['cpu_count']} logical CPUs), threads {threads}; "
        f"measured {meta['timestamp']}.",
        "",
        f"{summary_line(meta)}.",
        "",
        "Times are medians in ms; `x` is the speedup over torch dense (`F.conv2d`, or the eager model) at the "
        "same thread count. GFLOP/s: dense-equivalent (2·out·in/groups·k²·pixels·batch) / actual "
        "(2·nnz·pixels·batch) for ours.",
        "",
    ]
    layers = [r for r in result["rows"] if r["section"] == "layers"]
    if layers:
        out += [
            "### Convolutions, unstructured magnitude pruning (SparseConv2d vs F.conv2d)",
            "",
            "| layer | from | sparsity | batch | threads | torch dense | ours | x | dense GFLOP/s | ours GFLOP/s eq / actual |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in layers:
            t = r["times_ms"]
            out.append(
                f"| {r['label']} | {r['source']} | {r['sparsity']:.2f} | {r['batch']} | {r['threads']} "
                f"| {t['dense']['median_ms']:.3f} | {t['ours']['median_ms']:.3f} | {r['speedup_vs_dense']['ours']:.2f} "
                f"| {r['dense_gflops']:.1f} | {r['ours_gflops_dense_equiv']:.1f} / {r['ours_gflops_actual']:.1f} |"
            )
        out.append("")
    structured = [r for r in result["rows"] if r["section"] == "structured"]
    if structured:
        out += [
            "### Structured sparsity on the ResNet-18 3x3 convolutions, batch 1",
            "",
            "| layer | pruning | sparsity | threads | torch dense | ours | x | unstructured, same sparsity: ours | x |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in structured:
            t, s = r["times_ms"], r["speedup_vs_dense"]
            out.append(
                f"| {r['label']} | {r['method_label']} | {r['sparsity']:.3f} | {r['threads']} "
                f"| {t['dense']['median_ms']:.3f} | {t['ours']['median_ms']:.3f} | {s['ours']:.2f} "
                f"| {t['ours_unstructured']['median_ms']:.3f} | {s['ours_unstructured']:.2f} |"
            )
        out.append("")
    conv_rows = [r for r in result["rows"] if r["section"] == "e2e_convert"]
    if conv_rows:
        r0 = conv_rows[0]
        kinds = "; ".join(f"{t}: " + ", ".join(f"{n} {k}" for k, n in sorted(v.items())) for t, v in r0["kernels"].items())
        out += [
            f"### End to end: {r0['model']} at {r0['sparsity']:.0%} (every conv and the Linear), "
            "sparseprune.convert vs torch eager",
            "",
            f"Kernels chosen by convert (measured at {r0['convert_threads']} thread(s)): {kinds}.",
            "",
            "| batch | threads | torch dense ms | converted ms | x |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in conv_rows:
            t = r["times_ms"]
            out.append(f"| {r['batch']} | {r['threads']} | {t['dense']['median_ms']:.2f} | {t['ours']['median_ms']:.2f} "
                       f"| {r['speedup_vs_dense']['ours']:.2f} |")
        out.append("")
    shrink_rows = [r for r in result["rows"] if r["section"] == "e2e_shrink"]
    if shrink_rows:
        r0 = shrink_rows[0]
        out += [f"### End to end: {r0['model']} with 50% of the filters removed (sparseprune.shrink) vs the original", ""]
        if "skipped" in r0:
            out += [f"skipped: {r0['skipped']}", ""]
        else:
            out += [
                f"Parameters {r0['params_before']:,} → {r0['params_after']:,} "
                f"({r0['params_after'] / r0['params_before']:.1%}); conv+linear GFLOP per image "
                f"{r0['gflop_per_sample_before']:.3f} → {r0['gflop_per_sample_after']:.3f}.",
                "",
                "| batch | threads | original dense ms | shrunk ms | x |",
                "|---:|---:|---:|---:|---:|",
            ]
            for r in shrink_rows:
                t = r["times_ms"]
                out.append(f"| {r['batch']} | {r['threads']} | {t['dense']['median_ms']:.2f} "
                           f"| {t['ours']['median_ms']:.2f} | {r['speedup_vs_dense']['ours']:.2f} |")
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=comma_list(str, lambda s: True, "conv shapes like 3x3:64-64@56, dw3x3:96@56"),
                   help="e.g. 3x3:128-128@28,1x1:256-64@56,dw3x3:96@56 (default: the 7 model shapes)")
    p.add_argument("--sparsities", type=comma_list(float, lambda v: 0 <= v < 1, "fractions in [0, 1)"),
                   help="unstructured sparsities of the layers section (default 0.9)")
    p.add_argument("--batches", type=comma_list(int, lambda v: v >= 1, "positive ints"),
                   help="layers: default 1,8 (--quick 1); e2e: 1 unless given")
    p.add_argument("--threads", type=comma_list(int, lambda v: v >= 1, "positive ints"), help="default 1,2 (--quick 2)")
    add_timing_args(p, SECTIONS)
    p.add_argument("--e2e-model", default="resnet18", help="model of the e2e section (default %(default)s; "
                   "resnet18-small for a smoke test)")
    p.add_argument("--quick", action="store_true",
                   help="3 shapes, batch 1, 2 threads, e2e at batch 1: a couple of minutes")
    add_output_args(p, "bench_conv_table.json")
    args = p.parse_args(argv)
    args.e2e_batches = list(args.batches) if args.batches is not None else [1]
    fill_from_grid(args, QUICK if args.quick else FULL, ("shapes", "sparsities", "batches", "threads", "repeats"))
    try:
        args.shapes = [parse_shape(s) for s in args.shapes]
    except ValueError as exc:
        p.error(f"--shapes: cannot parse {exc}; expected [dw]KxK:CIN-COUT@H[xW][/sS] (dw: [dw]KxK:C@H)")
    check_timing_args(p, args)
    args.command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/bench_conv_table.py", *argv])])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = run_sections(args, {
        "layers": run_layers,
        "structured": run_structured,
        "e2e": lambda a: run_e2e_convert(a) + run_e2e_shrink(a),
    })
    grid = {"shapes": [s.spec for s in args.shapes], "sparsities": args.sparsities, "batches": args.batches,
            "e2e_batches": args.e2e_batches, "sections": args.sections, "e2e_model": args.e2e_model}
    write_outputs(args, rows, markdown, started, head={"command": args.command, "grid": grid}, notes={
        "tolerance": {"layers": LAYER_TOLERANCE, "e2e": E2E_TOLERANCE, "relative_to": "max |dense output|"},
        "dense": "torch.nn.functional.conv2d on the pruned weights (layers), the eager model (e2e)",
        "ours": "sparseprune.nn.SparseConv2d.from_dense(conv), num_threads following torch.set_num_threads",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
