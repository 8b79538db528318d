"""The `sparseprune` command: `bench` (dense vs converted timing, or a saved executable's timing),
`compile` (a model to one native executable file), `run` (a saved executable on .npy inputs),
`info` (build facts), `demo`, `compare` (every pruning method, measured).

`run` and `bench EXECUTABLE` import only numpy and sparseprune.runtime (never torch), like
importing this module itself: torch is imported inside the commands that need it.

`main(argv)` returns the exit status instead of exiting, so it can be called from tests; bad
arguments still exit through argparse (status 2, message naming the option).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

from sparseprune.argtypes import bounded_int


def _int_list(text: str) -> List[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"values must be distinct, got {text!r}")
    return values


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# --------------------------------------------------------------------------------------- bench
_DEFAULT_BENCH_MODEL = "bert-ffn"
_DEFAULT_SPARSITY = 0.9
_DEFAULT_POLICY = "measure"


def _model_name(text: str) -> str:
    # Checked when given (not through `choices`), so building the parser never imports torch.
    from sparseprune.bench.models import available_models

    names = available_models()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown model {text!r} (choose from {', '.join(names)})")
    return text


def _model_help(prefix: str, want_help: bool) -> str:
    if not want_help:  # listing the models imports torch: only for --help
        return prefix
    from sparseprune.bench.models import available_models

    return f"{prefix}; one of: {', '.join(available_models())}"


def _add_bench(subparsers, want_help: bool = False) -> None:
    p = subparsers.add_parser(
        "bench",
        help="prune a built-in model, convert it, time dense vs sparse; or time a saved executable",
        description=(
            "With --model: magnitude-prune every Linear and Conv2d of a built-in model to --sparsity, "
            "convert it with sparseprune.convert, check the output against dense, then time torch eager "
            "dense and the converted model round-robin at each thread count and batch size. "
            "With an EXECUTABLE (a file written by `sparseprune compile`): time its run() on random "
            "inputs at each thread count and batch size, without importing torch."
        ),
    )
    p.add_argument(
        "executable", nargs="?", metavar="EXECUTABLE",
        help="a saved executable to time instead of a built-in model (no torch needed)",
    )
    p.add_argument(
        "--model", type=_model_name, metavar="NAME",
        help=_model_help(f"built-in model (default: {_DEFAULT_BENCH_MODEL})", want_help),
    )
    p.add_argument(
        "--sparsity", type=_sparsity,
        help=f"fraction of each layer's weight pruned (default: {_DEFAULT_SPARSITY}; --model only)",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 64], metavar="N,N,...", help="default: 1,8,64")
    p.add_argument("--threads", type=_int_list, default=[1, 2], metavar="N,N,...", help="default: 1,2")
    p.add_argument("--repeats", type=bounded_int(1), default=30, help="timed rounds per case (default: 30)")
    p.add_argument("--warmup", type=bounded_int(0), default=5, help="untimed rounds first (default: 5)")
    p.add_argument(
        "--policy", choices=("measure", "threshold"),
        help=f"convert() kernel choice (default: {_DEFAULT_POLICY}, at the first thread count; --model only)",
    )
    p.add_argument(
        "--engine", choices=("convert", "compile"),
        help="what is timed against torch dense: sparseprune.convert's model, or sparseprune.compile's whole-model "
             "executable (default: convert; --model only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and inputs (default: 0)")
    p.add_argument("--profile", action="store_true",
                   help="EXECUTABLE only: also time every op (median ms, share, kernel, GFLOP/s) at each batch "
                        "size and thread count")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH ('-': print JSON instead of the table)")
    _add_limit_arguments(p)
    p.set_defaults(func=_run_bench, parser=p)


def _run_bench(args: argparse.Namespace) -> int:
    if args.executable is not None:
        given = [opt for opt, value in (("--model", args.model), ("--sparsity", args.sparsity),
                                        ("--policy", args.policy), ("--engine", args.engine)) if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            args.parser.error(f"{', '.join(given)} {verb} to a built-in model, not to an EXECUTABLE")
        return _run_bench_executable(args)
    if args.profile:
        args.parser.error("--profile applies to an EXECUTABLE (a file written by `sparseprune compile`)")
    args.model = _DEFAULT_BENCH_MODEL if args.model is None else args.model
    args.sparsity = _DEFAULT_SPARSITY if args.sparsity is None else args.sparsity
    args.policy = _DEFAULT_POLICY if args.policy is None else args.policy
    args.engine = "convert" if args.engine is None else args.engine

    from sparseprune.bench import benchmark, build_model, describe_model

    model, input_shape = build_model(args.model, seed=args.seed)
    to_stdout = args.json == "-"
    if not to_stdout:
        print(
            f"sparseprune bench: {args.model} ({describe_model(args.model)}), sparsity {args.sparsity}, "
            f"input {tuple(input_shape)}, batches {args.batch_sizes}, threads {args.threads}",
            flush=True,
        )
    try:
        result = benchmark(
            model,
            input_shape,
            engine=args.engine,
            sparsity=args.sparsity,
            batch_sizes=args.batch_sizes,
            threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            convert_kwargs={"policy": args.policy},
            seed=args.seed,
            name=args.model,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"sparseprune bench: error: {exc}", file=sys.stderr)
        return 1
    if to_stdout:
        print(result.to_json())
        return 0
    print(result.table())
    print(result.summary())
    conv = result.conversion
    layers = conv.get("layers", [])
    n_sparse = sum(1 for layer in layers if layer.get("kernel") not in ("dense", "dense-conv"))
    what = "conversion" if args.engine == "convert" else "compiled executable"
    print(
        f"\n{what}: {n_sparse} of {len(layers)} layers sparse (policy {conv.get('policy')}, "
        f"measured at {conv.get('num_threads')} thread(s)):"
    )
    print(result.conversion_table())
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(result.to_json())
                f.write("\n")
        except OSError as exc:
            print(f"sparseprune bench: error: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 1
        print(f"\nwrote {args.json}")
    return 0


# --------------------------------------------------------------------------- executables (issue 5)
# compile imports torch (inside _run_compile); run and bench EXECUTABLE import numpy and
# sparseprune.runtime only, so they work where torch is not installed.
def _shape(text: str) -> tuple:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated shape such as 3,224,224, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return values


def _one_line(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(command: str, message: str) -> int:
    print(f"sparseprune {command}: error: {message}", file=sys.stderr)
    return 2


def _batch_shape(shape: Sequence) -> str:
    from sparseprune.runtime.spec import batch_shape_str

    return batch_shape_str(shape)


def _at_max(exe, shape: Sequence) -> tuple:
    """A per-sample input shape with every dynamic dim (a sequence length) at its max value."""
    from sparseprune.runtime.spec import resolve_shape

    return resolve_shape(shape, {name: hi for name, (_, hi) in getattr(exe, "dims", {}).items()})


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--max-batch, --max-work, --max-arena: sparseprune.runtime.Limits for every call."""
    from sparseprune.runtime.limits import DEFAULT_MAX_ARENA_BYTES, DEFAULT_MAX_BATCH, DEFAULT_MAX_WORK

    p.add_argument("--max-batch", type=bounded_int(1), default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"refuse calls of more samples (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-work", type=_positive_number, default=DEFAULT_MAX_WORK, metavar="FLOP",
                   help=f"refuse calls needing more FLOP, counted from the spec (default: {DEFAULT_MAX_WORK:g})")
    p.add_argument("--max-arena", type=bounded_int(1), default=DEFAULT_MAX_ARENA_BYTES, metavar="BYTES",
                   help=f"refuse calls allocating more bytes of buffers (default: {DEFAULT_MAX_ARENA_BYTES} = 4 GiB)")


def _limits(args: argparse.Namespace):
    from sparseprune.runtime import Limits

    return Limits(max_batch=args.max_batch, max_work=args.max_work, max_arena_bytes=args.max_arena)


def _load_executable(command: str, path: str, n_threads: Optional[int] = None, limits=None):
    """(executable, None), or (None, exit status) after printing why the file cannot be used."""
    from sparseprune.runtime import load

    try:
        return load(path, n_threads=n_threads, limits=limits), None
    except (OSError, ValueError) as exc:  # missing/unreadable file; SpecError: not an executable
        return None, _fail(command, _one_line(exc))


def _add_compile(subparsers, want_help: bool = False) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile a model (built-in or your own file) to one native executable file",
        description=(
            "Compile a model with sparseprune.compile and save the executable (one safetensors file, "
            "loaded with `sparseprune run`, `sparseprune bench EXECUTABLE` or sparseprune.load, "
            "without torch). A built-in --model is first magnitude-pruned per layer (every Linear and "
            "Conv2d, as `sparseprune bench` does). --model-file imports your Python file and calls the "
            "factory in it: this runs that file's code, so only use files you trust (your own model "
            "definition). --weights are read with safetensors (no pickle)."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=_model_name, metavar="NAME", help=_model_help("a built-in model", want_help))
    source.add_argument(
        "--model-file", metavar="FILE.py:FACTORY",
        help="a Python file and the function in it that returns the nn.Module (runs that file's code)",
    )
    p.add_argument("--weights", metavar="FILE.safetensors",
                   help="state_dict of plain weights for --model-file's model (safetensors.torch.load_file, strict "
                        "keys; make pruning permanent with prune.remove before saving)")
    p.add_argument(
        "--sparsity", type=_sparsity,
        help=f"per-layer L1 magnitude pruning of every Linear and Conv2d to this fraction (default: "
             f"{_DEFAULT_SPARSITY} for --model; none for --model-file, whose weights are used as they are)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in model's weights and the example inputs "
                                                       "(default: 0)")
    p.add_argument(
        "--input-shape", type=_shape, action="append", metavar="D,D,...",
        help="shape of one sample of an input, without the batch dimension, e.g. 3,224,224; once per model "
             "input, in order (default: the built-in model's; required with --model-file)",
    )
    p.add_argument("--batch", type=bounded_int(1), default=1,
                   help="batch size of the example inputs (default: 1; the executable runs any batch)")
    p.add_argument(
        "--input-dtype", choices=("float32", "int64", "bool"), action="append", metavar="{float32,int64,bool}",
        help="dtype of an input, once per --input-shape in the same order (default: float32); int64 inputs are "
             "token ids for the model's nn.Embedding layers, drawn below the smallest table's size; bool inputs "
             "are attention padding masks (True = padding), drawn with at least the first position real",
    )
    p.add_argument("--policy", choices=("measure", "threshold"), default="measure",
                   help="measure: time the candidate kernels per layer on this machine; threshold: by sparsity "
                        "alone, faster (default: measure)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, metavar="N,N,...",
                   help="batch sizes the kernels are timed at, e.g. 1,64 (the smallest and largest a service sees): "
                        "a layer may then run a sparse kernel at small batches and dense from the batch where they "
                        "cross (default: --batch)")
    p.add_argument("--dynamic-seq", type=bounded_int(2), default=None, metavar="MAX",
                   help="make axis 1 of every input a dynamic sequence length up to MAX: the file then serves "
                        "every length from 1 to MAX (default: the example's shapes only)")
    p.add_argument("--threads", type=bounded_int(1), default=None,
                   help="threads used to time kernels and verify (default: torch's count; not stored in the file)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the executable")
    p.set_defaults(func=_run_compile, parser=p)



def _load_model_file(spec: str):
    """Import the user's file and call its factory (their own code, run on purpose)."""
    import importlib.util
    import os

    from torch import nn

    path, sep, factory_name = spec.rpartition(":")
    if not sep or not path or not factory_name.isidentifier():
        raise ValueError(f"--model-file must be PATH.py:FACTORY, got {spec!r}")
    if not os.path.isfile(path):
        raise ValueError(f"--model-file: no such file: {path!r}")
    module_name = "_sparseprune_model_file_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--model-file: cannot import {path!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    directory = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, directory)  # so the file can import its neighbours
    sys.modules[module_name] = module
    try:
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"--model-file: importing {path!r} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise ValueError(f"--model-file: {path!r} defines no callable {factory_name!r}")
        try:
            model = factory()
        except Exception as exc:
            raise ValueError(f"--model-file: {factory_name}() failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    finally:
        try:
            sys.path.remove(directory)
        except ValueError:
            pass
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-file: {factory_name}() returned {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model, path: str) -> None:
    import os

    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"--weights: no such file: {path!r}")
    try:
        state = load_file(path)  # safetensors: arrays only, never pickle
    except Exception as exc:
        raise ValueError(f"--weights: {path!r} is not a valid safetensors file: {_one_line(exc)}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # missing/unexpected keys, shape mismatches
        raise ValueError(f"--weights: {path!r} does not fit the model: {_one_line(exc)}") from exc


def _run_compile(args: argparse.Namespace) -> int:
    import torch

    import sparseprune
    from sparseprune.bench import build_model, prune_linear_layers
    from sparseprune.compile import UnsupportedOperation, VerificationError, verify
    from sparseprune.compile.capture import input_names

    if args.weights is not None and args.model is not None:
        args.parser.error("--weights goes with --model-file (built-in models have seeded random weights)")
    if args.model_file is not None and not args.input_shape:
        args.parser.error("--input-shape is required with --model-file")
    try:
        if args.model is not None:
            model, default_shape = build_model(args.model, seed=args.seed)
            name = args.model
            sparsity = _DEFAULT_SPARSITY if args.sparsity is None else args.sparsity
            shapes = args.input_shape or [tuple(default_shape)]
        else:
            model = _load_model_file(args.model_file)
            name = args.model_file
            if args.weights is not None:
                _load_weights(model, args.weights)
            sparsity = args.sparsity
            shapes = args.input_shape
        model.eval()
        if sparsity is not None:
            prune_linear_layers(model, sparsity)
    except ValueError as exc:
        return _fail("compile", str(exc))

    dtypes = args.input_dtype or ["float32"] * len(shapes)
    if len(dtypes) != len(shapes):
        args.parser.error(f"--input-dtype was given {len(dtypes)} time(s) for {len(shapes)} input(s)")
    vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), default=None)
    if "int64" in dtypes and vocab is None:
        return _fail("compile", "--input-dtype int64 is for token ids, but the model has no nn.Embedding")
    gen = torch.Generator().manual_seed(args.seed)
    inputs = tuple(_example_input(torch, dtype, (args.batch, *shape), vocab, gen) for shape, dtype in zip(shapes, dtypes))
    shape_text = ", ".join(str(tuple(x.shape)) for x in inputs)
    try:
        with torch.no_grad():
            result = model(*inputs)
    except Exception as exc:
        return _fail("compile", f"the model does not run on example inputs of shape {shape_text} (check "
                                f"--input-shape): {type(exc).__name__}: {_one_line(exc)}")
    print(f"sparseprune compile: {name}, sparsity {'as given' if sparsity is None else sparsity}, "
          f"policy {args.policy}, example inputs {shape_text}", flush=True)
    try:
        dynamic = None
        if args.dynamic_seq is not None:  # axis 1 of every input is the sequence: one file for every length
            seq = torch.export.Dim("seq", min=1, max=args.dynamic_seq)
            names = input_names(model, len(inputs))
            dynamic = {name: {1: seq} for name, x in zip(names, inputs) if x.dim() >= 2}
        exe = sparseprune.compile(model, inputs, dynamic_shapes=dynamic, policy=args.policy,
                                  batch_sizes=args.batch_sizes, num_threads=args.threads, check=False)
        if hasattr(result, "values") and not isinstance(result, torch.Tensor):
            outputs = [v for v in result.values() if isinstance(v, torch.Tensor)]  # a dict / ModelOutput
        else:
            outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        max_diff = verify(exe, inputs, [t.detach().numpy() for t in outputs])
    except (UnsupportedOperation, VerificationError, ValueError, TypeError, RuntimeError) as exc:
        return _fail("compile", _one_line(exc, limit=1000))
    try:
        size = exe.save(args.output)
    except OSError as exc:
        return _fail("compile", f"cannot write {args.output!r}: {_one_line(exc)}")

    layers = exe.layer_table()
    ins = ", ".join(_batch_shape(s) for s in exe.input_shapes)
    outs = ", ".join(_batch_shape(s) for s in exe.output_shapes)
    print(f"{exe.n_ops} ops, {len(layers)} weighted layers; inputs {ins}, outputs {outs}")
    if layers:
        rows = [(r["name"], r["op"], r["format"] + (f", dense from {r['dense_from']}" if r.get("dense_from") else ""),
                 f"{r['sparsity']:.1%}", r["activation"] or "-") for r in layers]
        header = ("layer", "op", "kernel", "sparsity", "activation")
        widths = [max(len(h), *(len(str(row[i])) for row in rows)) for i, h in enumerate(header)]
        for row in [header, *rows]:
            print("  " + "  ".join(str(v).ljust(w) if i != 3 else str(v).rjust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))).rstrip())
    dense = exe.dense_nbytes
    print(f"wrote {args.output}: {size:,} bytes, {size / max(dense, 1):.1%} of the dense fp32 weights "
          f"({dense:,} bytes)")
    print(f"verified against torch on batch {args.batch}: max |diff| {max_diff:.3g}")
    return 0


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a saved executable on .npy inputs (no torch needed)",
        description=(
            "Load an executable written by `sparseprune compile` and run it, importing numpy and "
            "sparseprune.runtime only. Inputs come from .npy files (one --input per model input, read "
            "with allow_pickle=False; for a float32 input, integer or float arrays are converted to float32; "
            "token ids and masks (inputs the executable marks int64 or bool) keep their integer / bool dtype) "
            "or, without --input, are random values of --batch samples (normal floats, ids below the "
            "embedding's rows, masks). Every call is checked against --max-batch, --max-work and --max-arena "
            "before it runs."
        ),
    )
    p.add_argument("executable", metavar="EXECUTABLE", help="a file written by `sparseprune compile`")
    p.add_argument("--input", action="append", metavar="X.npy",
                   help="an input array [batch, ...]; once per model input, in order")
    p.add_argument("--batch", type=bounded_int(1), default=None,
                   help="batch size of the random inputs used without --input (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--output", action="append", metavar="Y.npy",
                   help="save an output with np.save; once per model output, in order")
    p.add_argument("--threads", type=bounded_int(1), default=None,
                   help="intra-op threads (default: OpenMP's default; at most 256)")
    _add_limit_arguments(p)
    p.set_defaults(func=_run_run, parser=p)


def _example_input(torch, dtype: str, shape, vocab, gen):
    """A random example input: float32 normal, token ids below `vocab`, or a padding mask (True =
    padding) whose first position along the last axis is always real."""
    if dtype == "int64":
        return torch.randint(0, vocab, shape, generator=gen)
    if dtype == "bool":
        mask = torch.rand(shape, generator=gen) < 0.3
        mask[..., 0] = False
        return mask
    return torch.randn(*shape, generator=gen)


def _input_dtypes(exe) -> Sequence[str]:
    return tuple(getattr(exe, "input_dtypes", None) or ("float32",) * len(exe.input_shapes))


def _random_inputs(exe, batch: int, seed: int):
    """Standard normal float32 inputs; for an "int64" (token id) input, ids below the smallest
    embedding table's row count; for a "bool" padding mask, a mask with the first position real.
    Dynamic dims (sequence lengths) take their max values."""
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs = []
    for shape, dtype in zip(exe.input_shapes, _input_dtypes(exe)):
        shape = _at_max(exe, shape)
        if dtype == "int64":
            tables = [exe.arrays[f"{op['weight']}.table"].shape[0] for op in exe.spec["ops"]
                      if op["op"] == "embedding" and f"{op['weight']}.table" in exe.arrays]
            if not tables:
                raise ValueError("the executable takes integer ids and has no embedding table to draw "
                                 "random ids for: give --input files")
            inputs.append(rng.integers(0, min(tables), size=(batch, *shape), dtype=np.int64))
        elif dtype == "bool":  # a padding mask whose first position is always real
            mask = rng.random((batch, *shape)) < 0.3
            mask[..., 0] = False
            inputs.append(mask)
        else:
            inputs.append(rng.standard_normal((batch, *shape), dtype=np.float32))
    return inputs


def _read_input(path: str, k: int, shape: Sequence[int], dtype: str):
    import numpy as np

    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"--input {path}: cannot read a .npy array: {_one_line(exc)}") from exc
    if not isinstance(x, np.ndarray):  # an .npz archive
        if hasattr(x, "close"):
            x.close()
        raise ValueError(f"--input {path}: expected one .npy array, got an .npz archive")
    if dtype == "int64":
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"--input {path}: input {k} of the executable takes integer ids, got dtype {x.dtype}")
    elif dtype == "bool":
        if x.dtype != np.bool_:
            raise ValueError(f"--input {path}: input {k} of the executable takes a bool padding mask, got dtype "
                             f"{x.dtype}")
    elif not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"--input {path}: expected a numeric array, got dtype {x.dtype}")
    # static sizes here; dynamic dims (names in the shape) are checked by the executable's run()
    if x.ndim != len(shape) + 1 or any(isinstance(want, int) and got != want for got, want in zip(x.shape[1:], shape)):
        raise ValueError(f"--input {path} has shape {tuple(x.shape)}, but input {k} of the executable takes "
                         f"{_batch_shape(shape)}")
    return x if dtype in ("int64", "bool") else np.ascontiguousarray(x, dtype=np.float32)


def _run_run(args: argparse.Namespace) -> int:
    import numpy as np

    if args.input and args.batch is not None:
        args.parser.error("--batch applies to random inputs only (the batch of --input arrays is their first dimension)")
    try:
        limits = _limits(args)
        exe, status = _load_executable("run", args.executable, args.threads, limits)
    except ValueError as exc:  # --threads above the cap
        return _fail("run", _one_line(exc))
    if exe is None:
        return status
    n_in, n_out = len(exe.input_shapes), len(exe.output_shapes)
    wants = ", ".join(_batch_shape(s) for s in exe.input_shapes)
    if args.input and len(args.input) != n_in:
        return _fail("run", f"the executable takes {n_in} input(s) {wants}, got {len(args.input)} --input")
    if args.output and len(args.output) != n_out:
        return _fail("run", f"the executable has {n_out} output(s), got {len(args.output)} --output")
    try:
        if args.input:
            inputs = [_read_input(path, k, shape, dtype) for k, (path, shape, dtype)
                      in enumerate(zip(args.input, exe.input_shapes, _input_dtypes(exe)))]
            source = "from " + ", ".join(args.input)
        else:
            batch = 1 if args.batch is None else args.batch
            inputs = _random_inputs(exe, batch, args.seed)
            source = f"random (seed {args.seed})"
        result = exe.run(*inputs)
    except (ValueError, TypeError) as exc:
        return _fail("run", _one_line(exc))
    outputs = list(result) if isinstance(result, tuple) else [result]

    model = exe.metadata.get("model", "?")
    print(f"sparseprune run: {args.executable} ({model}, {exe.n_ops} ops), inputs "
          f"{', '.join(str(tuple(x.shape)) for x in inputs)} {source}")
    for k, y in enumerate(outputs):
        line = f"output {k}: shape {tuple(y.shape)} {y.dtype}"
        if y.size:
            line += f", min {float(y.min()):.4g}, max {float(y.max()):.4g}, mean {float(y.mean(dtype=np.float64)):.4g}"
        print(line)
        if y.ndim == 2 and y.size:
            top = y.argmax(axis=1)
            shown = " ".join(str(int(i)) for i in top[:16])
            more = f" ... ({len(top)} rows)" if len(top) > 16 else ""
            print(f"  argmax per row: {shown}{more}")
    for path, y in zip(args.output or (), outputs):
        try:
            with open(path, "wb") as f:  # exactly this path (np.save(str) would append .npy)
                np.save(f, y, allow_pickle=False)
        except OSError as exc:
            return _fail("run", f"cannot write --output {path!r}: {_one_line(exc)}")
        print(f"wrote {path}")
    return 0


def _run_bench_executable(args: argparse.Namespace) -> int:
    import datetime
    import json
    import platform

    import numpy as np

    import sparseprune
    from sparseprune.config import build_info
    from sparseprune.runtime import file_size
    from sparseprune.timing import time_interleaved

    exe, status = _load_executable("bench", args.executable, limits=_limits(args))
    if exe is None:
        return status
    to_stdout = args.json == "-"
    ins = ", ".join(_batch_shape(s) for s in exe.input_shapes)
    if not to_stdout:
        print(f"sparseprune bench: {args.executable} ({exe.metadata.get('model', '?')}, {exe.n_ops} ops), "
              f"inputs {ins}, batches {args.batch_sizes}, threads {args.threads}", flush=True)
    rows = []
    try:
        inputs = {batch: _random_inputs(exe, batch, args.seed) for batch in args.batch_sizes}
        for threads in args.threads:
            # round-robin over the batch sizes at one thread count (sparseprune.timing)
            candidates = {batch: (lambda xs=inputs[batch], t=threads: exe.run(*xs, n_threads=t))
                          for batch in args.batch_sizes}
            timings = time_interleaved(candidates, warmup=args.warmup, repeats=args.repeats)
            for batch in args.batch_sizes:
                t = timings[batch]
                rows.append({"batch": batch, "threads": threads, "median_ms": t.median_ms, "p90_ms": t.p90_ms,
                             "min_ms": t.min_s * 1e3, "runs": t.runs, "samples_per_s": batch / t.median_s})
        profiles = [exe.profile(*inputs[batch], n_threads=threads, repeats=args.repeats, warmup=args.warmup)
                    for threads in args.threads for batch in args.batch_sizes] if args.profile else []
    except (ValueError, RuntimeError) as exc:
        return _fail("bench", _one_line(exc))
    rows.sort(key=lambda r: (r["threads"], r["batch"]))
    result = {
        "executable": args.executable,
        "file_bytes": file_size(args.executable),
        "input_shapes": [list(s) for s in exe.input_shapes],
        "output_shapes": [list(s) for s in exe.output_shapes],
        "executable_metadata": exe.metadata,
        "metadata": {
            "sparseprune_version": sparseprune.__version__,
            "build_info": build_info(),
            "numpy_version": np.__version__,
            "python": platform.python_version(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "batch_sizes": list(args.batch_sizes),
            "threads": list(args.threads),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
            "inputs": "standard normal float32 (random ids for token-id inputs)",
        },
        "rows": rows,
        **({"profiles": [p.to_dict() for p in profiles]} if args.profile else {}),
    }
    text = json.dumps(result, indent=2)
    if to_stdout:
        print(text)
        return 0
    header = ("batch", "threads", "median ms", "p90 ms", "samples/s")
    table = [(str(r["batch"]), str(r["threads"]), f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
              f"{r['samples_per_s']:,.0f}") for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in [header, *table]:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    for p in profiles:
        print("\n" + p.table(top=20))
    if profiles and exe.n_ops > 20:
        print(f"(the 20 slowest of {exe.n_ops} ops; --json has them all)")
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text)
                f.write("\n")
        except OSError as exc:
            return _fail("bench", f"cannot write --json {args.json}: {_one_line(exc)}")
        print(f"\nwrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------- serve
def _add_serve(subparsers) -> None:
    from sparseprune.serve import cli as serve_cli  # the arguments only: no server stack imported

    p = subparsers.add_parser(
        "serve",
        help="serve executables over HTTP (Open Inference Protocol v2, dynamic batching, /metrics)",
        description=(
            "Serve executable files over HTTP with the Open Inference Protocol (KServe v2 REST: "
            "/v2/health/live, /v2/health/ready, /v2/models/NAME, /v2/models/NAME/infer with JSON or binary "
            "tensors) and Prometheus metrics at /metrics. Concurrent requests for a model run as one "
            "executable call (up to --max-batch rows, waiting at most --max-wait-ms). Needs the serve extra: "
            'pip install "sparseprune[serve]". Torch is never imported.'
        ),
    )
    serve_cli.add_arguments(p, bounded_int(1), _positive_number)
    p.set_defaults(func=_run_serve, parser=p)


def _run_serve(args: argparse.Namespace) -> int:
    from sparseprune.serve import cli as serve_cli

    return serve_cli.run(args)


# ---------------------------------------------------------------------------------------- info
def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="print the native build's configuration")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import sparseprune
    from sparseprune.config import show_config

    print(f"sparseprune {sparseprune.__version__}")
    show_config()
    return 0


# ---------------------------------------------------------------------------------------- demo
# sparseprune.demo (written separately) provides `add_arguments(parser)` and `run(args) -> int`.
# It is imported only when the demo subcommand is asked for, so a missing or broken demo (or its
# heavier imports) never affects `bench` or `info`.
def _add_demo(subparsers, selected: bool) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo: prune, convert, measure, plot",
        description="End-to-end demo (see sparseprune/demo.py).",
    )
    if not selected:
        return
    try:
        demo = importlib.import_module("sparseprune.demo")
    except ImportError as exc:
        _add_default_demo_arguments(p)
        p.set_defaults(func=lambda args, exc=exc: _demo_unavailable(exc))
        return
    if hasattr(demo, "add_arguments"):
        demo.add_arguments(p)
    else:
        _add_default_demo_arguments(p)
    entry = getattr(demo, "run", None) or getattr(demo, "main", None)
    if entry is None:
        p.set_defaults(func=lambda args: _demo_unavailable("sparseprune.demo defines no run(args)"))
    else:
        p.set_defaults(func=lambda args: int(entry(args) or 0))


def _add_default_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small and fast configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", default="sparseprune-demo")


def _demo_unavailable(reason: object) -> int:
    print(f"sparseprune demo: error: the demo is not available ({reason})", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------- compare
# Same pattern as demo: sparseprune.compare (and torch training, matplotlib) is imported only
# when the compare subcommand is asked for.
def _add_compare(subparsers, selected: bool) -> None:
    p = subparsers.add_parser(
        "compare",
        help="every pruning method on a digits MLP and CNN: accuracy, measured speedup, size",
        description="Prune a digits MLP and CNN with every method, convert, check and time each result "
                    "(see sparseprune/compare.py).",
    )
    if not selected:
        return
    try:
        compare = importlib.import_module("sparseprune.compare")
    except ImportError as exc:
        p.set_defaults(func=lambda args, exc=exc: _unavailable("compare", exc))
        return
    compare.add_arguments(p)
    p.set_defaults(func=lambda args: int(compare.run(args) or 0))


def _unavailable(command: str, reason: object) -> int:
    print(f"sparseprune {command}: error: not available ({reason})", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------- main
def _selected_command(argv: Sequence[str]) -> Optional[str]:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    import sparseprune

    parser = argparse.ArgumentParser(
        prog="sparseprune",
        description="Prune PyTorch models, convert them to native sparse kernels, measure CPU speedups.",
    )
    parser.add_argument("--version", action="version", version=f"sparseprune {sparseprune.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = _selected_command(argv)
    want_help = any(token in ("-h", "--help") for token in argv)
    _add_bench(subparsers, want_help=want_help and command == "bench")
    _add_compile(subparsers, want_help=want_help and command == "compile")
    _add_run(subparsers)
    _add_serve(subparsers)
    _add_info(subparsers)
    _add_demo(subparsers, selected=_selected_command(argv) == "demo")
    _add_compare(subparsers, selected=_selected_command(argv) == "compare")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (argument errors raise SystemExit(2))."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
