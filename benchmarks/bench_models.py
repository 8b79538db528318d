#!/usr/bin/env python
"""The model zoo at full size: torch eager dense vs sparseprune.convert vs the compiled executable.

Models (sparseprune.bench.zoo, transformers' code with seeded random weights, no download): bert,
distilbert, gpt2 (sequence --seq, default 128), vit, resnet, convnext, mobilenetv2, efficientnet
(224x224 images). Every Linear, Conv2d and transformers Conv1D is magnitude-pruned per layer to
--sparsity (zoo.prune_all) and the masks are made permanent (sparseprune.prune.remove), so all
three candidates run the same pruned weights:

  dense       the pruned model in torch eager (dense kernels), under torch.inference_mode()
  convert     sparseprune.convert(model, kwargs=..., dynamic_shapes=..., policy=--policy) at the
              thread count: the model compiled whole when it captures (its largest capturable parts
              otherwise, torch running the rest), its forward running the plan
  executable  sparseprune.compile(model, kwargs=..., dynamic_shapes=..., policy=--policy,
              batch_sizes=--batch-sizes, num_threads=threads): kernels timed at every benchmarked
              batch; compiled once per model and thread count, text models with a
              dynamic sequence axis up to --max-seq, so one executable serves every batch size

Each candidate is checked against torch eager on the very inputs it is then timed on (max abs
difference over max(1, max |torch output|) below 1e-3, as for whole networks in
bench_conv_table.py); a candidate that fails to build or to match is reported with its error (first
line) and not timed, and the run goes on. The candidates of one case run round-robin
(bench_common.time_case: sparseprune.timing.time_interleaved, warm-up, medians and p90) at the same
thread count; every row records the hypervisor's steal time during its timing.

Sequence sweep (--seq-sweep, on by default when bert is benchmarked): the BERT executable (max
length --max-seq) at batch 1 and lengths --sweep-lengths (default 8,32,128,512), round-robin with
torch eager at the same lengths; the ratio t(128)/t(32) shows that the work follows the real
length (target >= 3x; an executable padded to the maximum would give 1x).

    python benchmarks/bench_models.py --json models.json --markdown models.md      # the full zoo
    python benchmarks/bench_models.py --models resnet --batch-sizes 1 --no-seq-sweep
    python benchmarks/bench_models.py --quick --models resnet,bert                 # small configs, seconds
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# OpenMP's wait policy is left as the environment gives it (recorded): see bench_engines.py.

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sparseprune  # noqa: E402
from sparseprune import prune  # noqa: E402
from sparseprune.bench import summary_line, zoo  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py sits next to this script
from bench_common import (  # noqa: E402
    add_output_args, add_timing_args, check_timing_args, comma_list, fill_from_grid, log, max_rel_diff,
    checked_candidates, speedups, steal_seconds, time_case, write_outputs,
)

# A whole model takes 10-1000 ms a call: 10 s per case gives ResNet-50 at batch 1 its 20 rounds,
# and BERT at batch 8 the minimum 3 (of 3 timed calls each).
FULL = {"size": "full", "batch_sizes": [1, 8], "threads": [2], "repeats": 20, "budget_s": 10.0,
        "policy": "measure", "sweep_lengths": [8, 32, 128, 512]}
# Small configs (zoo size "small": 2 layers, 32x32 images), one batch size, few rounds, kernels
# picked by sparsity (no timing at compile): seconds per model, for tests and smoke runs.
QUICK = {"size": "small", "batch_sizes": [1], "threads": [2], "repeats": 3, "budget_s": 0.2,
         "policy": "threshold", "sweep_lengths": [8, 32, 128]}
# Whole networks: up to 12 layers of float32 with BatchNorm folded and attention fused.
TOLERANCE = 1e-3
SWEEP_TARGET = 3.0  # t(128) / t(32): work proportional to the length would give 4x
CANDIDATES = ("convert", "executable")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ------------------------------------------------------------------------------- outputs
def _named_outputs(out) -> List[Tuple[Optional[str], np.ndarray]]:
    """(name or None, array) of every tensor/array output: a transformers ModelOutput or dict by
    name, a tuple by position, a single tensor or array."""
    if isinstance(out, dict):  # ModelOutput is a dict
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = [(None, v) for v in out]
    else:
        items = [(None, out)]
    return [(k, v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in items if isinstance(v, (torch.Tensor, np.ndarray))]


def output_diff(got, ref) -> float:
    """Largest max_rel_diff over the outputs, matched by name when `got` has names, else by position."""
    got_items, ref_items = _named_outputs(got), _named_outputs(ref)
    if got_items and all(k is not None for k, _ in got_items):
        ref_by_name = dict(ref_items)
        missing = [k for k, _ in got_items if k not in ref_by_name]
        if missing:
            raise ValueError(f"outputs {missing} are not among torch's {list(ref_by_name)}")
        pairs = [(g, ref_by_name[k]) for k, g in got_items]
    else:
        if len(got_items) != len(ref_items):
            raise ValueError(f"{len(got_items)} outputs, torch gives {len(ref_items)}")
        pairs = [(g, r) for (_, g), (_, r) in zip(got_items, ref_items)]
    for g, r in pairs:
        if g.shape != r.shape:
            raise ValueError(f"output shape {g.shape}, torch gives {r.shape}")
    return max(max_rel_diff(g.astype(np.float64), r.astype(np.float64)) for g, r in pairs)


# ------------------------------------------------------------------------------- building
def build_pruned(name: str, args: argparse.Namespace) -> Tuple[nn.Module, int]:
    """The zoo model with --sparsity of every Linear/Conv2d/Conv1D removed, masks made permanent."""
    model, _ = zoo.build(name, args.size, batch=1, seq=args.seq, seed=args.seed)
    calibration = zoo.example_inputs(name, model, args.size, batch=4, seq=args.seq, seed=args.seed + 7)
    pruned = zoo.prune_all(model, args.sparsity, calibrate=calibration)
    prune.remove(model)
    return model.eval(), pruned


def compile_model(name: str, model: nn.Module, inputs: zoo.ZooInputs, threads: int,
                  args: argparse.Namespace) -> Tuple[sparseprune.Executable, dict]:
    # Text models: a dynamic sequence up to --max-seq, at most what the model has positions for.
    max_seq = min(args.max_seq, inputs.max_seq) if inputs.seq_inputs else None
    t0 = time.perf_counter()
    exe = sparseprune.compile(model, kwargs=inputs.kwargs, dynamic_shapes=inputs.dynamic_shapes(max_seq),
                              policy=args.policy, batch_sizes=tuple(args.batch_sizes), num_threads=threads)
    exe.n_threads = threads
    info = {"compile_s": time.perf_counter() - t0, "max_seq": max_seq,
            "kernels": dict(sorted(Counter(f"{r['op']} {r['format']}" for r in exe.layer_table()).items()))}
    log(f"[{name}] compiled in {info['compile_s']:.1f} s ({threads} thread(s)): {info['kernels']}")
    return exe, info


def convert_model(name: str, model: nn.Module, inputs: zoo.ZooInputs, threads: int,
                  args: argparse.Namespace) -> Tuple[nn.Module, dict]:
    # The same example inputs and dynamic sequence as compile: convert compiles what it can capture.
    max_seq = min(args.max_seq, inputs.max_seq) if inputs.seq_inputs else None
    t0 = time.perf_counter()
    converted = sparseprune.convert(model, kwargs=inputs.kwargs, dynamic_shapes=inputs.dynamic_shapes(max_seq),
                                    policy=args.policy, batch_sizes=tuple(args.batch_sizes),
                                    conv_batch_sizes=tuple(args.batch_sizes))
    report = converted.sparseprune_report
    info = {"convert_s": time.perf_counter() - t0,
            "native": [m.path for m in report.native_modules],
            "kernels": dict(sorted(Counter(f"{c.layer_type} {c.kernel}" for c in report.layers).items()))}
    log(f"[{name}] converted in {info['convert_s']:.1f} s: {info['kernels']}")
    return converted, info


def saved_size(exe: sparseprune.Executable) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return exe.save(os.path.join(tmp, "model.safetensors"))


# ------------------------------------------------------------------------------- timing
def check_and_time(fns: Dict[str, Callable[[], object]], errors: Dict[str, str],
                   args: argparse.Namespace) -> dict:
    """Checks every candidate but "dense" against it (errors[name] on failure, then it is left
    out), then times the rest round-robin. Returns times, speedups, diffs, rounds and steal."""
    with torch.inference_mode():
        timed, diffs = checked_candidates(fns, "dense", errors, output_diff, TOLERANCE, "torch eager")
        steal0 = steal_seconds()
        times, repeats, warmup = time_case(timed, args)
        steal = steal_seconds() - steal0
    return {"times_ms": times, "speedup_vs_dense": speedups(times), "max_rel_diff": diffs,
            "runs": repeats, "warmup": warmup, "steal_s": steal}


def model_rows(name: str, args: argparse.Namespace, keep: dict) -> List[dict]:
    """The rows of one zoo model: one per (threads, batch), or one error row if it cannot be built."""
    t0 = time.perf_counter()
    try:
        model, pruned = build_pruned(name, args)
    except Exception as exc:
        log(f"[{name}] cannot build: {first_line(exc)}")
        return [{"section": "models", "model": name, "error": first_line(exc)}]
    log(f"[{name}] built and pruned {pruned} layers to {args.sparsity:.0%} in {time.perf_counter() - t0:.1f} s")
    seq = args.seq if name in zoo.TEXT else None
    inputs = {b: zoo.example_inputs(name, model, args.size, batch=b, seq=args.seq, seed=args.seed)
              for b in args.batch_sizes}
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows: List[dict] = []
    file_bytes = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        built: Dict[str, object] = {}
        info: Dict[str, dict] = {}
        errors: Dict[str, str] = {}
        for cand, make in (("convert", convert_model), ("executable", compile_model)):
            try:
                built[cand], info[cand] = make(name, model, inputs[args.batch_sizes[0]], threads, args)
            except Exception as exc:
                errors[cand] = first_line(exc)
                log(f"[{name}] {cand} failed: {errors[cand]}")
        if "executable" in built and file_bytes is None:
            file_bytes = saved_size(built["executable"])
        for batch in args.batch_sizes:
            kw = inputs[batch].kwargs
            arrays = [v.numpy() for v in kw.values()]  # the executable's inputs: the kwargs in order
            fns = {"dense": lambda: model(**kw)}
            if "convert" in built:
                fns["convert"] = lambda conv=built["convert"]: conv(**kw)
            if "executable" in built:
                fns["executable"] = lambda exe=built["executable"]: exe.run(*arrays)
            case_errors = dict(errors)
            row = {"section": "models", "model": name, "size": args.size, "batch": batch, "threads": threads,
                   "seq": seq, "image": None if seq else int(kw["pixel_values"].shape[-1]),
                   "sparsity": args.sparsity, "pruned_layers": pruned, "policy": args.policy,
                   "compile": info.get("executable"), "convert": info.get("convert"),
                   "file_bytes": file_bytes, "dense_fp32_bytes": dense_bytes,
                   "file_ratio": file_bytes / dense_bytes if file_bytes else None}
            row.update(check_and_time(fns, case_errors, args))
            row["errors"] = case_errors
            rows.append(row)
            log(f"[{name}] {row_text(row)}")
        if name == "bert" and threads == args.threads[0]:  # the sequence sweep reuses this executable
            if "executable" in built:
                keep["bert"] = (model, built["executable"], info["executable"]["max_seq"])
            else:
                keep["bert_error"] = errors["executable"]
        del built, fns
        gc.collect()
    return rows


def row_text(row: dict) -> str:
    t, s = row["times_ms"], row["speedup_vs_dense"]
    parts = [f"batch={row['batch']} threads={row['threads']}: torch {t['dense']['median_ms']:.2f} ms"]
    for cand in CANDIDATES:
        if cand in t:
            parts.append(f"{cand} {t[cand]['median_ms']:.2f} ms ({s[cand]:.2f}x, diff {row['max_rel_diff'][cand]:.1e})")
        else:
            parts.append(f"{cand} error: {row['errors'][cand]}")
    return ", ".join(parts) + f", steal {row['steal_s']:.2f} s"


def seq_sweep_rows(args: argparse.Namespace, keep: dict) -> List[dict]:
    """BERT at batch 1 and every --sweep-lengths from one executable: torch and executable round-robin."""
    threads = args.threads[0]
    torch.set_num_threads(threads)
    base = {"section": "seq_sweep", "model": "bert", "batch": 1, "threads": threads}
    if "bert_error" in keep:  # compiling it again would fail the same way
        return [dict(base, error=keep.pop("bert_error"))]
    try:
        if "bert" in keep:
            model, exe, max_seq = keep.pop("bert")
        else:
            model, _ = build_pruned("bert", args)
            first = zoo.example_inputs("bert", model, args.size, batch=1, seq=args.seq, seed=args.seed)
            exe, info = compile_model("bert", model, first, threads, args)
            max_seq = info["max_seq"]
    except Exception as exc:
        log(f"[seq sweep] bert: {first_line(exc)}")
        return [dict(base, error=first_line(exc))]
    lengths = [n for n in args.sweep_lengths if n <= max_seq]
    if len(lengths) < len(args.sweep_lengths):
        log(f"[seq sweep] lengths above the maximum {max_seq} left out")
    fns: Dict[str, Callable[[], object]] = {}
    errors: Dict[str, str] = {}
    for n in lengths:
        kw = zoo.example_inputs("bert", model, args.size, batch=1, seq=n, seed=args.seed).kwargs
        arrays = [v.numpy() for v in kw.values()]
        fns[f"dense@{n}"] = lambda kw=kw: model(**kw)
        fns[f"executable@{n}"] = lambda arrays=arrays: exe.run(*arrays)
    with torch.inference_mode():
        for n in lengths:
            try:
                diff = output_diff(fns[f"executable@{n}"](), fns[f"dense@{n}"]())
                if not diff <= TOLERANCE:
                    errors[n] = f"output differs from torch eager: max rel diff {diff:.1e} > {TOLERANCE:.0e}"
            except Exception as exc:
                errors[n] = first_line(exc)
        for n in errors:
            del fns[f"executable@{n}"]
        steal0 = steal_seconds()
        times, repeats, warmup = time_case(fns, args)
        steal = steal_seconds() - steal0
    rows = []
    for n in lengths:
        t = {k.split("@")[0]: v for k, v in times.items() if k.endswith(f"@{n}")}
        row = dict(base, seq=n, max_seq=max_seq, times_ms=t, runs=repeats, warmup=warmup, steal_s=steal,
                   error=errors.get(n))
        if "executable" in t:
            row["speedup_vs_dense"] = {"executable": t["dense"]["median_ms"] / t["executable"]["median_ms"]}
        rows.append(row)
        log(f"[seq sweep] seq={n}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in t.items())
            + (f", error: {errors[n]}" if n in errors else ""))
    ratios = {}
    for cand in ("dense", "executable"):
        if f"{cand}@128" in times and f"{cand}@32" in times:
            ratios[cand] = times[f"{cand}@128"]["median_ms"] / times[f"{cand}@32"]["median_ms"]
    summary = dict(base, section="seq_sweep_ratio", max_seq=max_seq, ratio_128_over_32=ratios,
                   target=SWEEP_TARGET, meets_target=ratios["executable"] >= SWEEP_TARGET if "executable" in ratios else None)
    log(f"[seq sweep] t(128)/t(32): {ratios} (target >= {SWEEP_TARGET:g}x)")
    return rows + [summary]


# ------------------------------------------------------------------------------- output
def _ms(times: dict, cand: str) -> str:
    return f"{times[cand]['median_ms']:.2f}" if cand in times else "error"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}" if n >= 1e6 else f"{n / 1e6:.3f}"


def _kernels(counts: Optional[dict]) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in counts.items()) if counts else ""


def markdown(result: dict) -> str:
    meta = result["metadata"]
    out = [
        "<!-- generated by benchmarks/bench_models.py -->",
        f"`{meta['command']}` on {meta['cpu']} ({meta['cpu_count']} logical CPUs), threads "
        f"{', '.join(str(t) for t in meta['threads'])}; OMP_WAIT_POLICY {meta.get('omp_wait_policy') or 'unset'}; "
        f"measured {meta['timestamp']}.",
        "",
        f"{summary_line(meta)}.",
        "",
        f"Zoo models ({meta['grid']['size']} size), every Linear/Conv2d/Conv1D {meta['grid']['sparsity']:.0%} "
        f"magnitude-pruned, kernels by policy `{meta['grid']['policy']}`. Medians in ms; `x` is the speedup over "
        "torch eager on the same pruned weights (dense kernels) at the same thread count; diff is the max abs "
        "difference over max(1, max |torch output|), convert / executable.",
        "",
        "| model | input | batch | threads | torch ms | convert ms | x | executable ms | x | diff | "
        "convert kernels | executable kernels | file / dense weights | steal s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in result["rows"]:
        if r["section"] != "models":
            continue
        if r.get("error"):
            out.append(f"| {r['model']} | | | | error: {r['error']} | | | | | | | | | |")
            continue
        t, s, d = r["times_ms"], r["speedup_vs_dense"], r["max_rel_diff"]
        what = f"seq {r['seq']}" if r["seq"] else f"{r['image']}²"
        x = {c: f"{s[c]:.2f}x" if c in s else "" for c in CANDIDATES}
        diff = " / ".join(f"{d[c]:.0e}" if c in d else "-" for c in CANDIDATES)
        size = (f"{_mb(r['file_bytes'])} / {_mb(r['dense_fp32_bytes'])} MB ({r['file_ratio']:.0%})"
                if r["file_bytes"] else "")
        kernels = {c: _kernels((r.get(k) or {}).get("kernels")) for c, k in (("convert", "convert"),
                                                                               ("executable", "compile"))}
        if r.get("convert") and not r["convert"]["kernels"]:
            kernels["convert"] = "no layer converted"
        out.append(f"| {r['model']} | {what} | {r['batch']} | {r['threads']} | {_ms(t, 'dense')} | "
                   f"{_ms(t, 'convert')} | {x['convert']} | {_ms(t, 'executable')} | {x['executable']} | {diff} | "
                   f"{kernels['convert']} | {kernels['executable']} | {size} | {r['steal_s']:.2f} |")
    errors = [(r["model"], c, e) for r in result["rows"] if r["section"] == "models"
              for c, e in (r.get("errors") or {}).items()]
    if errors:
        out += ["", "Errors (first line):", ""]
        out += sorted({f"* {m}, {c}: {e}" for m, c, e in errors})
    sweep = [r for r in result["rows"] if r["section"] == "seq_sweep"]
    if sweep:
        out += ["", f"### BERT, one executable (max length {sweep[0].get('max_seq', '?')}), batch 1, "
                f"{sweep[0].get('threads', '?')} thread(s)", ""]
        if sweep[0].get("error"):
            out.append(f"error: {sweep[0]['error']}")
        else:
            out += ["| length | torch ms | executable ms | x |", "|---:|---:|---:|---:|"]
            for r in sweep:
                t = r["times_ms"]
                x = r.get("speedup_vs_dense", {}).get("executable")
                out.append(f"| {r['seq']} | {_ms(t, 'dense')} | {_ms(t, 'executable')} | "
                           f"{f'{x:.2f}x' if x else r.get('error') or ''} |")
    for r in result["rows"]:
        if r["section"] == "seq_sweep_ratio":
            ratio = r["ratio_128_over_32"]
            text = ", ".join(f"{'torch' if k == 'dense' else k} {v:.2f}x" for k, v in ratio.items())
            out += ["", f"t(128) / t(32): {text or 'not measured'} (target for the executable ≥ {r['target']:g}x"
                    + ("" if r["meets_target"] is None else ", met" if r["meets_target"] else ", NOT met") + ")."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=comma_list(str, lambda v: v in zoo.NAMES, f"names from {zoo.NAMES}"),
                   default=list(zoo.NAMES), help="comma list (default: all %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of every layer removed (default 0.9)")
    p.add_argument("--batch-sizes", type=comma_list(int, lambda v: v >= 1, "positive ints"),
                   help="default 1,8 (--quick 1)")
    p.add_argument("--threads", type=comma_list(int, lambda v: v >= 1, "positive ints"),
                   help="thread counts, each with its own compile and convert (default 2)")
    p.add_argument("--seq", type=int, default=128, help="text models' sequence length (default 128)")
    p.add_argument("--max-seq", type=int, default=512,
                   help="largest sequence the text executables accept (dynamic length; default 512)")
    p.add_argument("--policy", choices=("measure", "threshold"),
                   help="kernel choice of compile and convert (default measure, --quick threshold)")
    p.add_argument("--seq-sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="BERT at several lengths from one executable (default: on when bert is benchmarked)")
    p.add_argument("--sweep-lengths", type=comma_list(int, lambda v: v >= 2, "ints >= 2"),
                   help="default 8,32,128,512 (--quick 8,32,128: the small BERT has 128 positions)")
    p.add_argument("--quick", action="store_true",
                   help="small configs, batch 1, 3 rounds, 0.2 s per case, policy threshold: seconds per model")
    add_timing_args(p, budget_s=None)
    add_output_args(p, "bench_models.json")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.seq < 2 or args.max_seq < args.seq:
        p.error(f"need 2 <= --seq <= --max-seq, got --seq {args.seq} --max-seq {args.max_seq}")
    grid = QUICK if args.quick else FULL
    args.size = grid["size"]
    fill_from_grid(args, grid, ("batch_sizes", "threads", "repeats", "budget_s", "policy", "sweep_lengths"))
    if args.quick:
        args.warmup = min(args.warmup, 1)
    if args.seq_sweep is None:
        args.seq_sweep = "bert" in args.models
    check_timing_args(p, args)
    args.command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/bench_models.py", *argv])])
    return args


def guarded(run: Callable[[], List[dict]], row: dict) -> List[dict]:
    """run(), or one row with the error of whatever failed outside the per-candidate checks (e.g.
    while timing): one model must not end the run."""
    try:
        return run()
    except Exception as exc:
        log(f"[{row['model']}] {row['section']} failed: {first_line(exc)}")
        return [dict(row, error=first_line(exc))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cpus = os.cpu_count() or 1
    if max(args.threads) > cpus:
        log(f"warning: {max(args.threads)} threads on {cpus} logical CPUs: oversubscribed, numbers are not meaningful")
    previous = torch.get_num_threads()
    rows: List[dict] = []
    keep: dict = {}
    try:
        for name in args.models:
            rows += guarded(lambda: model_rows(name, args, keep), {"section": "models", "model": name})
            if name != "bert":
                continue
            if args.seq_sweep:
                rows += guarded(lambda: seq_sweep_rows(args, keep), {"section": "seq_sweep", "model": "bert"})
            keep.clear()
            gc.collect()
        if args.seq_sweep and "bert" not in args.models:
            rows += guarded(lambda: seq_sweep_rows(args, keep), {"section": "seq_sweep", "model": "bert"})
    finally:
        torch.set_num_threads(previous)
    grid = {"models": args.models, "size": args.size, "sparsity": args.sparsity, "batch_sizes": args.batch_sizes,
            "seq": args.seq, "max_seq": args.max_seq, "image": 224 if args.size == "full" else "config",
            "policy": args.policy, "seq_sweep": args.seq_sweep, "sweep_lengths": args.sweep_lengths}
    write_outputs(args, rows, markdown, started, head={"command": args.command, "grid": grid,
                                                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}, notes={
        "tolerance": {"max_rel_diff": TOLERANCE, "relative_to": "max(1, max |torch output|)"},
        "dense": "the pruned model (masks made permanent) in torch eager, torch.inference_mode()",
        "convert": f"sparseprune.convert(model, policy={args.policy!r}) at each thread count",
        "executable": "sparseprune.compile(model, kwargs, dynamic_shapes: sequence up to max_seq for text models) "
                      "once per model and thread count; Executable.run on numpy inputs",
        "sweep_target": f"t(128) / t(32) >= {SWEEP_TARGET:g} for the executable",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
