#!/usr/bin/env python
"""Engines side by side in one run (issue 11, Must-have 4): torch eager, ONNX Runtime, DeepSparse
(when installed) and sparseprune (convert and the compiled executable) on the same pruned models.

Models, every Linear / Conv2d (and attention's packed q/k/v projection) L1-magnitude pruned per
layer to --sparsity (default 0.9), the masks made permanent, so every engine runs the same weights:

  bert-layer    BERT-base encoder layer (nn.TransformerEncoderLayer 768, 12 heads, FFN 3072, GELU),
                sequence 128 (sparseprune.bench.build_model("bert-layer"))
  bert-ffn      the MLP 768 -> 3072 -> 768 -> 768 with ReLUs (build_model("bert-ffn"))
  resnet-stage  a ResNet stage: two basic blocks, i.e. 4 conv3x3-BN(-ReLU) with residual adds,
                64 channels on 56x56 (BatchNorm statistics calibrated after pruning)
  resnet50      transformers' ResNetModel from its default config, seeded random weights
                (sparseprune.bench.zoo), BatchNorm calibrated after pruning; 224x224 images

Engines (all at --threads, default 2):

  torch         the pruned model in torch eager (dense kernels), torch.inference_mode(),
                torch.set_num_threads
  onnxruntime   the model exported by torch.onnx.export (TorchScript exporter first, the
                torch.export-based one when that fails), CPUExecutionProvider,
                intra_op_num_threads = threads, dense
  deepsparse    DeepSparse's Engine(onnx, batch_size, num_cores = threads) on the same ONNX file
                (one engine per batch size: it compiles for a fixed batch). DeepSparse 1.8 cannot
                share the project's venv: --deepsparse-python PATH (default
                $SPARSEPRUNE_DEEPSPARSE_PYTHON) runs it with another venv's interpreter through
                deepsparse_worker.py, input and outputs as .npy files; it is then timed in that
                process right after the in-process engines (same warm-up and round count; it cannot
                take turns with them), and each row records it under "timed_apart"
  convert       sparseprune.convert(model, (x,), ...): compiled whole when capturable
  executable    sparseprune.compile(model, (x,), ...), Executable.run on numpy

Every engine's outputs are checked against torch eager on the input it is then timed on (max abs
difference over max(1, max |torch output|) below 1e-3); an engine that fails to build or to match
is reported with the reason and not timed. The timed engines of one case run round-robin
(sparseprune.timing.time_interleaved through bench_common.time_case: warm-up, medians and p90).
An engine that is not installed is a row entry "not installed (reason)".

After the table: Executable.profile at batch 1 for the BERT layer and ResNet-50 (each op's median
time, share, kernel and GFLOP/s).

    python benchmarks/bench_engines.py --json engines.json --markdown engines.md   # full size: quiet machine
    python benchmarks/bench_engines.py --models bert-ffn --batch-sizes 1           # one model
    python benchmarks/bench_engines.py --quick                                     # small models, seconds
    python benchmarks/bench_engines.py --deepsparse-python ~/venv-ds/bin/python    # DeepSparse in its own venv
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# OpenMP's wait policy is left as the environment gives it (recorded; unset: libgomp's default,
# idle threads spin a moment, then sleep), as a deployment runs. torch and sparseprune share one
# libgomp in a process (both need libgomp.so.1; the loader reuses the first one loaded), so their
# calls run on one thread pool; ONNX Runtime's own pool is told not to spin (see its builder).
# OMP_WAIT_POLICY=PASSIVE puts every idle thread to sleep at once: in a 2-core VM each wake-up
# then cost tens of microseconds, 4-5 per convolution (the ResNet stage: 2.46 ms vs 1.45 ms).

import numpy as np
import torch
from torch import nn

import sparseprune
from sparseprune.bench import build_model, prune_linear_layers, zoo
from sparseprune.bench.models import BasicBlock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py sits next to this script
from bench_common import (  # noqa: E402
    add_output_args, add_timing_args, check_timing_args, comma_list, fill_from_grid, log, max_rel_diff,
    checked_candidates, speedups, steal_seconds, time_case, write_outputs,
)

MODELS = ("bert-layer", "bert-ffn", "resnet-stage", "resnet50")
ENGINES = ("torch", "onnxruntime", "deepsparse", "convert", "executable")
PROFILED = ("bert-layer", "resnet50")  # Must-have 5: where the time goes, printed with the table
TOLERANCE = 1e-3  # whole networks in float32, BatchNorm folded / ops reordered (as bench_models.py)
# Whole models take 0.1-100 ms a call: 5 s per case gives the slow ones the minimum rounds.
FULL = {"size": "full", "batch_sizes": [1, 8], "threads": 2, "repeats": 20, "budget_s": 5.0, "policy": "measure"}
# Small shapes and kernels picked by sparsity (no timing at conversion): seconds for every model.
QUICK = {"size": "small", "batch_sizes": [1, 2], "threads": 2, "repeats": 3, "budget_s": 0.1,
         "policy": "threshold"}
EXPORT_BATCH = 2  # the ONNX example batch: torch.export specialises a batch of 1 to a constant
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepsparse_worker.py")
WORKER_MISSING = 3  # deepsparse_worker.py's exit status when deepsparse does not import
WORKER_TIMEOUT_S = 1800  # compiling ResNet-50 takes a minute or two; a hung worker must not hang the run


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ------------------------------------------------------------------------------- models
class TupleOutputs(nn.Module):
    """transformers' ResNetModel returning (last_hidden_state, pooler_output) rather than a
    ModelOutput, so every engine (ONNX export included) sees the same positional outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.last_hidden_state, out.pooler_output


def resnet_stage(channels: int) -> nn.Sequential:
    """ResNet-18/34's first stage: two basic blocks, 4 conv3x3-BN(-ReLU), two residual adds."""
    return nn.Sequential(BasicBlock(channels, channels, 1), BasicBlock(channels, channels, 1))


def build_pruned(name: str, size: str, sparsity: float, seed: int) -> Tuple[nn.Module, Tuple[int, ...]]:
    """(eval-mode model with `sparsity` of each weighted layer removed for good, per-sample input shape)."""
    small = size == "small"
    torch.manual_seed(seed)
    if name == "bert-layer":
        if small:
            model, shape = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, activation="gelu",
                                                      batch_first=True), (16, 64)
        else:
            model, shape = build_model("bert-layer", seed=seed)
    elif name == "bert-ffn":
        model, shape = (nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                                      nn.Linear(64, 64)), (64,)) if small else build_model("bert-ffn", seed=seed)
    elif name == "resnet-stage":
        channels, image = (16, 16) if small else (64, 56)
        model, shape = resnet_stage(channels), (channels, image, image)
    elif name == "resnet50":
        model, inputs = zoo.build("resnet", size, batch=1, seed=seed)
        model, shape = TupleOutputs(model), tuple(inputs.kwargs["pixel_values"].shape[1:])
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    model.eval()
    prune_linear_layers(model, sparsity)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        # Random BatchNorms after 90% pruning shrink the activations towards 0 (see
        # zoo.calibrate_batchnorm): the checks would check nothing. Statistics from one batch.
        calibration = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed + 7))
        zoo.calibrate_batchnorm(model, zoo.ZooInputs({"input": calibration} if isinstance(model, nn.Sequential)
                                                     else {"pixel_values": calibration}))
    return model.eval(), shape


def flat_outputs(out) -> List[np.ndarray]:
    """Every array of an engine's result, in order (tensor, numpy, tuple/list, dict by insertion)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [a for v in out for a in flat_outputs(v)]
    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    return [np.asarray(out)]


def output_diff(got, ref) -> float:
    """Largest max_rel_diff over the outputs, matched by position."""
    g, r = flat_outputs(got), flat_outputs(ref)
    if len(g) != len(r):
        raise ValueError(f"{len(g)} outputs, torch gives {len(r)}")
    for a, b in zip(g, r):
        if a.shape != b.shape:
            raise ValueError(f"output shape {a.shape}, torch gives {b.shape}")
    return max(max_rel_diff(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(g, r))


# ------------------------------------------------------------------------------- engines
# Each engine builder takes (model, example input tensor, context) and returns bind(x) -> a
# zero-argument callable running the engine on the tensor x (inputs converted once, outside the
# timing). Builders raise on failure; EngineMissing means the engine is not installed.
class EngineMissing(RuntimeError):
    pass


class Context:
    """What builders share for one model: threads, options, a scratch directory, the ONNX file."""

    def __init__(self, args: argparse.Namespace, tmpdir: str, name: str):
        self.args, self.tmpdir, self.name = args, tmpdir, name
        self.threads = args.threads
        self._onnx: Optional[Tuple[Optional[str], Optional[str]]] = None  # (path, error)
        self.export_info: Dict[str, object] = {}

    def onnx_path(self, model: nn.Module, example: torch.Tensor) -> str:
        """The model exported to ONNX once (shared by ONNX Runtime and DeepSparse)."""
        if self._onnx is None:
            try:
                self._onnx = (export_onnx(model, example, os.path.join(self.tmpdir, f"{self.name}.onnx"),
                                          self.export_info), None)
            except Exception as exc:
                self._onnx = (None, f"ONNX export failed: {first_line(exc)}")
        path, error = self._onnx
        if error:
            raise RuntimeError(error)
        return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, info: Dict[str, object]) -> str:
    """torch.onnx.export with a dynamic batch: the TorchScript exporter (no onnxscript needed)
    first, the torch.export-based one when it fails (torch 2.13's TorchScript exporter cannot trace
    nn.TransformerEncoderLayer: "is_causal must be bool, not Tensor")."""
    x = example[:1].expand(EXPORT_BATCH, *example.shape[1:]).contiguous()
    n_out = len(flat_outputs(model(x)))
    outputs = [f"output{i}" for i in range(n_out)]
    batch = {0: "batch"}
    t0 = time.perf_counter()
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        try:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["input"], output_names=outputs,
                              dynamic_axes={"input": batch, **{o: batch for o in outputs}}, opset_version=17)
            info.update(exporter="torchscript", export_s=time.perf_counter() - t0)
            return path
        except Exception as exc:
            errors.append(f"TorchScript exporter: {first_line(exc)}")
        try:
            dim = torch.export.Dim("batch", min=1, max=1024)
            # opset 17 as above: its default (20) is newer than DeepSparse 1.8's runtime reads
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=outputs,
                              dynamic_shapes=({0: dim},), verbose=False, opset_version=17)
            info.update(exporter="torch.export (dynamo)", export_s=time.perf_counter() - t0,
                        torchscript_error=errors[0])
            return path
        except Exception as exc:
            errors.append(f"torch.export exporter: {first_line(exc)}")
    raise RuntimeError("; ".join(errors))


def import_engine(module: str, package: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install failing at import
        raise EngineMissing(f"not installed ({package}: {first_line(exc)})") from None


def build_torch(model, example, ctx):
    def bind(x):
        return lambda: model(x)
    return bind


def build_onnxruntime(model, example, ctx):
    ort = import_engine("onnxruntime", "pip install onnxruntime")
    path = ctx.onnx_path(model, example)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's idle workers spin by default: in a round-robin with torch's and sparseprune's OpenMP
    # threads on the same cores they took the CPU from the next engine (torch medians 10-100x
    # slower in the runs after ORT on 2 cores). Idle workers sleep, as OpenMP's do after a spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def bind(x):
        feed = {name: x.numpy()}
        return lambda: session.run(None, feed)
    return bind


class TimedApart:
    """An engine run by another interpreter: it cannot take turns with the in-process engines, so
    check_and_time runs it right after timing them. run(warmup, repeats) -> (outputs, info with
    median_ms and p90_ms), with the warm-up and round count the in-process engines had."""

    def __init__(self, run: Callable[[int, int], Tuple[List[np.ndarray], dict]]):
        self.run = run


def run_worker(python: str, onnx_path: str, x: np.ndarray, threads: int, warmup: int, repeats: int
               ) -> Tuple[List[np.ndarray], dict]:
    """deepsparse_worker.py under `python` on the input x (.npy files in a temporary directory):
    (its outputs, its result.json plus the wall time and DeepSparse's banner line)."""
    with tempfile.TemporaryDirectory(prefix="deepsparse-") as tmp:
        np.save(os.path.join(tmp, "input0.npy"), np.ascontiguousarray(x), allow_pickle=False)
        command = [python, WORKER, onnx_path, tmp, "--threads", str(threads), "--warmup", str(warmup),
                   "--repeats", str(repeats)]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        wall_s = time.perf_counter() - t0
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit status {done.returncode}"]
            if done.returncode == WORKER_MISSING:
                raise EngineMissing(lines[-1])
            raise RuntimeError(f"deepsparse worker: {lines[-1]}")
        outputs = []
        while os.path.exists(os.path.join(tmp, f"output{len(outputs)}.npy")):
            outputs.append(np.load(os.path.join(tmp, f"output{len(outputs)}.npy"), allow_pickle=False))
        with open(os.path.join(tmp, "result.json"), encoding="utf-8") as f:
            info = json.load(f)
    banner = [line for line in (done.stdout + done.stderr).splitlines() if "DeepSparse" in line and "system=" in line]
    info.update(wall_s=wall_s, banner=banner[0].strip() if banner else None)
    return outputs, info


def build_deepsparse(model, example, ctx):
    python = ctx.args.deepsparse_python
    if python:  # DeepSparse in its own venv, run by deepsparse_worker.py
        path = ctx.onnx_path(model, example)

        def bind_apart(x):
            return TimedApart(lambda warmup, repeats: run_worker(python, path, x.numpy(), ctx.threads, warmup,
                                                                 repeats))
        return bind_apart
    deepsparse = import_engine("deepsparse", "pip install deepsparse==1.8.0")
    path = ctx.onnx_path(model, example)
    engines: Dict[int, object] = {}

    def bind(x):
        b = int(x.shape[0])
        if b not in engines:  # DeepSparse compiles for one batch size
            engines[b] = deepsparse.Engine(path, batch_size=b, num_cores=ctx.threads)
        engine, feed = engines[b], [np.ascontiguousarray(x.numpy())]
        return lambda: engine.run(feed)
    return bind


def build_convert(model, example, ctx):
    args = ctx.args
    converted = sparseprune.convert(model, (example,), policy=args.policy, batch_sizes=tuple(args.batch_sizes),
                                    conv_batch_sizes=tuple(args.batch_sizes), num_threads=ctx.threads)

    def bind(x):
        return lambda: converted(x)
    return bind


def build_executable(model, example, ctx):
    args = ctx.args
    exe = sparseprune.compile(model, (example,), policy=args.policy, batch_sizes=tuple(args.batch_sizes),
                              num_threads=ctx.threads)
    exe.n_threads = ctx.threads
    ctx.executable = exe  # for the profile

    def bind(x):
        arr = x.numpy()
        return lambda: exe.run(arr)
    return bind


BUILDERS: Dict[str, Callable] = {
    "torch": build_torch, "onnxruntime": build_onnxruntime, "deepsparse": build_deepsparse,
    "convert": build_convert, "executable": build_executable,
}


# ------------------------------------------------------------------------------- running
def model_rows(name: str, args: argparse.Namespace) -> Tuple[List[dict], Optional[dict]]:
    """One row per batch size for model `name` (or one error row), and its executable's profile."""
    t0 = time.perf_counter()
    try:
        model, shape = build_pruned(name, args.size, args.sparsity, args.seed)
    except Exception as exc:
        log(f"[{name}] cannot build: {first_line(exc)}")
        return [{"model": name, "error": first_line(exc)}], None
    log(f"[{name}] built and pruned to {args.sparsity:.0%} in {time.perf_counter() - t0:.1f} s, input {shape}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    inputs = {b: torch.randn(b, *shape, generator=gen) for b in args.batch_sizes}
    torch.set_num_threads(args.threads)
    rows: List[dict] = []
    profile = None
    with tempfile.TemporaryDirectory() as tmpdir:
        ctx = Context(args, tmpdir, name)
        binders: Dict[str, Callable] = {}
        errors: Dict[str, str] = {}
        build_s: Dict[str, float] = {}
        for engine in args.engines:
            t1 = time.perf_counter()
            try:
                with torch.no_grad():
                    binders[engine] = BUILDERS[engine](model, inputs[args.batch_sizes[0]], ctx)
                build_s[engine] = time.perf_counter() - t1
            except EngineMissing as exc:
                errors[engine] = str(exc)
            except Exception as exc:
                errors[engine] = first_line(exc)
            if engine in errors:
                log(f"[{name}] {engine}: {errors[engine]}")
        for batch in args.batch_sizes:
            case_errors = dict(errors)
            fns = {}
            for engine, bind in binders.items():
                try:
                    fns[engine] = bind(inputs[batch])
                except Exception as exc:
                    case_errors[engine] = first_line(exc)
            row = {"model": name, "batch": batch, "threads": args.threads, "input_shape": [batch, *shape],
                   "sparsity": args.sparsity, "build_s": build_s, "onnx_export": dict(ctx.export_info)}
            row.update(check_and_time(fns, case_errors, args))
            row["errors"] = case_errors
            rows.append(row)
            log(f"[{name}] {row_text(row)}")
        exe = getattr(ctx, "executable", None)
        batch1 = [r for r in rows if r["batch"] == 1]
        if name in PROFILED and exe is not None and batch1 and "executable" in batch1[0]["times_ms"]:
            profile = exe.profile(inputs[1].numpy(), repeats=args.profile_repeats, warmup=2)
            profile = {"model": name, "batch": 1, "table": profile.table(top=15), **profile.to_dict()}
            log(profile["table"])
        del binders, fns, ctx
    gc.collect()
    return rows, profile


def check_and_time(fns: Dict[str, object], errors: Dict[str, str], args: argparse.Namespace) -> dict:
    """Checks every engine but torch against it (errors[engine] on failure, then it is not timed),
    then times torch and the engines that matched round-robin; then each TimedApart engine in its
    own process with the same warm-up and round count, its outputs checked the same way."""
    apart = {k: v for k, v in fns.items() if isinstance(v, TimedApart)}
    fns = {k: v for k, v in fns.items() if k not in apart}
    with torch.inference_mode():
        if "torch" not in fns:
            raise RuntimeError(f"torch eager failed: {errors.get('torch')}")
        timed, diffs = checked_candidates(fns, "torch", errors, output_diff, TOLERANCE, "torch")
        # time_case expects the baseline under the name "dense" (bench_common.speedups)
        steal0 = steal_seconds()
        times, repeats, warmup = time_case({"dense" if k == "torch" else k: v for k, v in timed.items()}, args)
        steal = steal_seconds() - steal0
        times = {"torch" if k == "dense" else k: v for k, v in times.items()}
        timed_apart = {}
        for engine, job in apart.items():
            steal0 = steal_seconds()
            try:
                outputs, info = job.run(warmup, repeats)
            except EngineMissing as exc:
                errors[engine] = str(exc)
                continue
            except Exception as exc:
                errors[engine] = first_line(exc)
                continue
            info["steal_s"] = steal_seconds() - steal0
            timed_apart[engine] = info
            _, diff = checked_candidates({"torch": fns["torch"], engine: lambda: outputs}, "torch", errors,
                                         output_diff, TOLERANCE, "torch")
            diffs.update(diff)
            if engine not in errors:
                times[engine] = {"median_ms": info["median_ms"], "p90_ms": info["p90_ms"]}
    return {"times_ms": times, "speedup_vs_torch": speedups({"dense": times["torch"], **times}),
            "max_rel_diff": diffs, "runs": repeats, "warmup": warmup, "steal_s": steal, "timed_apart": timed_apart}


def row_text(row: dict) -> str:
    t = row["times_ms"]
    parts = [f"batch={row['batch']}"]
    for engine in ENGINES:
        if engine in t:
            parts.append(f"{engine} {t[engine]['median_ms']:.3f} ms ({row['speedup_vs_torch'][engine]:.2f}x)")
        elif engine in row["errors"]:
            parts.append(f"{engine}: {row['errors'][engine]}")
    return ", ".join(parts) + f", steal {row['steal_s']:.2f} s"


# ------------------------------------------------------------------------------- output
def versions(rows: List[dict], deepsparse_python: Optional[str]) -> Dict[str, Optional[str]]:
    """Version of each optional engine package, or None when it does not import; DeepSparse's as
    its worker reported it when it runs in another interpreter."""
    out: Dict[str, Optional[str]] = {}
    for module in ("onnxruntime", "onnx", "onnxscript", "deepsparse"):
        try:
            out[module] = getattr(importlib.import_module(module), "__version__", "unknown")
        except Exception:
            out[module] = None
    if deepsparse_python:
        reported = [r["timed_apart"]["deepsparse"]["deepsparse_version"] for r in rows
                    if "deepsparse" in r.get("timed_apart", {})]
        out["deepsparse"] = reported[0] if reported else None
    return out


def markdown(result: dict) -> str:
    meta = result["metadata"]
    info = meta["build_info"]
    vers = meta["engine_versions"]
    engines = meta["grid"]["engines"]
    out = [f"`{meta['command']}`", "",
           f"CPU: {meta['cpu']} ({meta['cpu_count']} logical CPUs), sparseprune SIMD path "
           f"`{info.get('simd_path_active')}`, {meta['grid']['threads']} threads for every engine; "
           f"torch {meta['torch_version']}, onnxruntime {vers.get('onnxruntime') or 'not installed'}, "
           f"deepsparse {vers.get('deepsparse') or 'not installed'}; OMP_WAIT_POLICY {meta.get('omp_wait_policy') or 'unset'}; "
           f"{meta['grid']['size']} size, {meta['grid']['sparsity']:.0%} unstructured, policy {meta['grid']['policy']}; "
           f"git {str(meta.get('git_revision'))[:12]}{'+dirty' if meta.get('git_dirty') else ''}; "
           f"median ms (x = torch median / engine median, same run)", "",
           "| model | batch | " + " | ".join(engines) + " |",
           "|---|---:|" + "---:|" * len(engines)]
    notes = []
    for row in result["rows"]:
        if row.get("error"):
            out.append(f"| {row['model']} | | error: {row['error']} |" + " |" * (len(engines) - 1))
            continue
        cells = []
        for engine in engines:
            t = row["times_ms"].get(engine)
            if t is not None:
                x = row["speedup_vs_torch"][engine]
                cells.append(f"{t['median_ms']:.3f}" + ("" if engine == "torch" else f" ({x:.2f}x)"))
            else:
                err = row["errors"].get(engine, "")
                short = err if err.startswith("not installed") else "error"
                cells.append(short.split(" (")[0] if short.startswith("not installed") else short)
                note = f"{engine}: {err}"
                if note not in notes:
                    notes.append(note)
        out.append(f"| {row['model']} | {row['batch']} | " + " | ".join(cells) + " |")
    apart = [r["timed_apart"]["deepsparse"] for r in result["rows"] if "deepsparse" in r.get("timed_apart", {})]
    if apart:
        out += ["", f"deepsparse ran in its own process ({apart[0]['python']}, "
                    f"{apart[0].get('banner') or 'ISA ' + str(apart[0].get('cpu_avx_type'))}), timed right after "
                    f"the in-process engines with their warm-up and round count, not interleaved with them."]
    if notes:
        out += ["", "Not timed:", ""] + [f"* {n}" for n in notes]
    for prof in result.get("profiles", []):
        out += ["", f"### Where the time goes: {prof['model']} executable, batch {prof['batch']}", "",
                "```", prof["table"], "```"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=comma_list(str, lambda v: v in MODELS, f"names from {MODELS}"),
                   default=list(MODELS), help="comma list (default: all %(default)s)")
    p.add_argument("--engines", type=comma_list(str, lambda v: v in ENGINES, f"names from {ENGINES}"),
                   default=list(ENGINES), help="comma list (default: all; torch is always run)")
    p.add_argument("--batch-sizes", type=comma_list(int, lambda v: v >= 1, "positive ints"),
                   help="default 1,8 (--quick 1,2)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine (default 2)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of every layer removed (default 0.9)")
    p.add_argument("--policy", choices=("measure", "threshold"),
                   help="kernel choice of convert and compile (default measure, --quick threshold)")
    p.add_argument("--profile-repeats", type=int, default=20, help="calls of Executable.profile (default 20)")
    p.add_argument("--quick", action="store_true",
                   help="small models (width 64, 16 channels, 32x32 ResNet-50 config), batches 1,2, 3 rounds")
    p.add_argument("--deepsparse-python", metavar="PATH", default=os.environ.get("SPARSEPRUNE_DEEPSPARSE_PYTHON"),
                   help="Python interpreter of a venv with deepsparse: DeepSparse runs there through "
                        "deepsparse_worker.py (default: $SPARSEPRUNE_DEEPSPARSE_PYTHON, else deepsparse "
                        "imported in this process)")
    add_timing_args(p, budget_s=None)
    add_output_args(p, "bench_engines.json")
    args = p.parse_args(argv)
    if args.deepsparse_python is not None and not (os.path.isfile(args.deepsparse_python)
                                                   and os.access(args.deepsparse_python, os.X_OK)):
        p.error(f"--deepsparse-python (or SPARSEPRUNE_DEEPSPARSE_PYTHON) must be an executable file, "
                f"got {args.deepsparse_python!r}")
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.threads < 1 or args.profile_repeats < 1:
        p.error("--threads and --profile-repeats must be >= 1")
    grid = QUICK if args.quick else FULL
    args.size = grid["size"]
    fill_from_grid(args, grid, ("batch_sizes", "repeats", "budget_s", "policy"))
    if args.quick:
        args.warmup = min(args.warmup, 1)
    args.engines = ["torch"] + [e for e in ENGINES if e in args.engines and e != "torch"]
    check_timing_args(p, args)
    args.command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/bench_engines.py", *argv])])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads > (os.cpu_count() or 1):
        log(f"warning: {args.threads} threads on {os.cpu_count()} logical CPUs: oversubscribed")
    previous = torch.get_num_threads()
    rows: List[dict] = []
    profiles: List[dict] = []
    try:
        for name in args.models:
            try:
                model_result, profile = model_rows(name, args)
            except Exception as exc:  # e.g. torch itself failing: one model must not end the run
                log(f"[{name}] failed: {first_line(exc)}")
                model_result, profile = [{"model": name, "error": first_line(exc)}], None
            rows += model_result
            if profile:
                profiles.append(profile)
    finally:
        torch.set_num_threads(previous)
    grid = {"models": args.models, "engines": args.engines, "size": args.size, "sparsity": args.sparsity,
            "batch_sizes": args.batch_sizes, "threads": args.threads, "policy": args.policy}
    threads, args.threads = args.threads, [args.threads]  # write_outputs records a list of counts
    write_outputs(args, rows, lambda result: markdown(dict(result, profiles=profiles)), started,
                  head={"command": args.command, "grid": grid,
                        "engine_versions": versions(rows, args.deepsparse_python),
                        "deepsparse_python": args.deepsparse_python,
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}, notes={
        "tolerance": {"max_rel_diff": TOLERANCE, "relative_to": "max(1, max |torch output|)"},
        "engines": {
            "torch": "the pruned model in torch eager (dense), torch.inference_mode(), torch.set_num_threads",
            "onnxruntime": "torch.onnx.export (dynamic batch), CPUExecutionProvider, intra_op_num_threads, "
                           "inter_op 1, ORT_ENABLE_ALL",
            "deepsparse": "deepsparse.Engine(onnx, batch_size, num_cores=threads), one per batch size"
                          + (f"; in its own process ({args.deepsparse_python}, benchmarks/deepsparse_worker.py), "
                             "timed right after the in-process engines with their warm-up and round count "
                             "(rows' timed_apart)" if args.deepsparse_python else ""),
            "convert": f"sparseprune.convert(model, (x,), policy={args.policy!r})",
            "executable": f"sparseprune.compile(model, (x,), policy={args.policy!r}); Executable.run",
        },
        "profiles": profiles,
    })
    args.threads = threads
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
