#!/usr/bin/env python
"""Runs and times one ONNX file in DeepSparse, for bench_engines.py --deepsparse-python.

DeepSparse 1.8 pins old onnx/numpy releases that conflict with the project's environment, so it
lives in its own venv and bench_engines.py runs this script with that venv's interpreter. Needs
only numpy and deepsparse (not torch, not sparseprune).

    python deepsparse_worker.py MODEL.onnx DIR --threads T --warmup W --repeats R

DIR holds the inputs input0.npy, input1.npy, ... (batch = their first dimension). The script
compiles deepsparse.Engine(model=MODEL.onnx, batch_size=batch, num_cores=T), runs the inputs once
and writes the outputs as DIR/output0.npy, ... for the parent's check against torch, then times
it as bench_common.time_case / sparseprune.timing.time_interleaved time one candidate: W warm-up
calls, then R rounds of one untimed call and CALLS_PER_TURN timed calls; median and p90 go to
DIR/result.json (with the NM_* settings DeepSparse read, e.g. NM_BIND_THREADS_TO_CORES). Arrays
are .npy without pickle both ways. NM_DISABLE_ANALYTICS defaults to 1.

Exit status 0 on success; MISSING (3) with "not installed (...)" on stderr when deepsparse does
not import; 1 with the error's last line on stderr otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

MISSING = 3  # exit status: deepsparse does not import in this interpreter
CALLS_PER_TURN = 3  # as sparseprune.timing.time_interleaved


def read_inputs(directory: str) -> list:
    inputs = []
    while os.path.exists(os.path.join(directory, f"input{len(inputs)}.npy")):
        inputs.append(np.load(os.path.join(directory, f"input{len(inputs)}.npy"), allow_pickle=False))
    if not inputs:
        raise FileNotFoundError(f"no input0.npy in {directory}")
    return inputs


def time_calls(fn, warmup: int, repeats: int) -> dict:
    """Median and p90 over `repeats` rounds of (one untimed call, CALLS_PER_TURN timed calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        fn()
        for _ in range(CALLS_PER_TURN):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return {"median_ms": float(np.median(samples)) * 1e3, "p90_ms": float(np.percentile(samples, 90)) * 1e3,
            "samples": len(samples)}


# The newest ONNX IR version DeepSparse 1.8's embedded runtime loads.
MAX_IR_VERSION = 9


def readable_model(path: str, directory: str) -> str:
    """`path`, or a copy in `directory` stamped with IR version 9 when the file says 10 or more:
    torch's torch.export-based exporter writes IR 10 even for opset 17 graphs, which use nothing
    IR 10 added (the outputs are checked against torch either way)."""
    import onnx

    model = onnx.load(path)
    if model.ir_version <= MAX_IR_VERSION:
        return path
    model.ir_version = MAX_IR_VERSION
    copy = os.path.join(directory, "model_ir9.onnx")
    onnx.save(model, copy)
    return copy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx")
    p.add_argument("directory")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    args = p.parse_args(argv)
    if args.threads < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1, --warmup >= 0")
    # DeepSparse reports usage to Google Analytics unless told not to: a benchmark phones no one.
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    try:
        import deepsparse
    except Exception as exc:  # ImportError, or a broken install failing at import
        print(f"not installed (deepsparse in {sys.executable}: {type(exc).__name__}: {exc})", file=sys.stderr)
        return MISSING
    inputs = [np.ascontiguousarray(a) for a in read_inputs(args.directory)]
    t0 = time.perf_counter()
    engine = deepsparse.Engine(model=readable_model(args.onnx, args.directory), batch_size=int(inputs[0].shape[0]),
                               num_cores=args.threads)
    compile_s = time.perf_counter() - t0
    outputs = engine.run(inputs)
    for i, out in enumerate(outputs):
        np.save(os.path.join(args.directory, f"output{i}.npy"), np.asarray(out), allow_pickle=False)
    result = time_calls(lambda: engine.run(inputs), args.warmup, args.repeats)
    result.update(warmup=args.warmup, rounds=args.repeats, compile_s=compile_s, python=sys.executable,
                  deepsparse_version=getattr(deepsparse, "__version__", "unknown"),
                  cpu_avx_type=getattr(engine, "cpu_avx_type", None), cpu_vnni=getattr(engine, "cpu_vnni", None),
                  nm_environment={k: v for k, v in os.environ.items() if k.startswith("NM_")})  # its knobs
    with open(os.path.join(args.directory, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one line for the parent's table; the traceback is of no use there
        print(f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
