"""The `sparseprune` command: `bench` (dense vs converted timing), `info` (build facts), `demo`,
`compare` (every pruning method, measured).

`main(argv)` returns the exit status instead of exiting, so it can be called from tests; bad
arguments still exit through argparse (status 2, message naming the option).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Optional, Sequence

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


def _bounded_int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# --------------------------------------------------------------------------------------- bench
def _add_bench(subparsers) -> None:
    from sparseprune.bench.models import available_models

    p = subparsers.add_parser(
        "bench",
        help="prune a built-in model, convert it, time dense vs sparse",
        description=(
            "Magnitude-prune every Linear of a built-in model to --sparsity, convert it with "
            "sparseprune.convert, check the output against dense, then time torch eager dense "
            "and the converted model round-robin at each thread count and batch size."
        ),
    )
    p.add_argument("--model", default="bert-ffn", choices=available_models(), help="built-in model (default: bert-ffn)")
    p.add_argument("--sparsity", type=_sparsity, default=0.9, help="fraction of each Linear weight pruned (default: 0.9)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 64], metavar="N,N,...", help="default: 1,8,64")
    p.add_argument("--threads", type=_int_list, default=[1, 2], metavar="N,N,...", help="default: 1,2")
    p.add_argument("--repeats", type=_bounded_int(1), default=30, help="timed rounds per case (default: 30)")
    p.add_argument("--warmup", type=_bounded_int(0), default=5, help="untimed rounds first (default: 5)")
    p.add_argument(
        "--policy", choices=("measure", "threshold"), default="measure",
        help="convert() kernel choice (default: measure, at the first thread count)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and inputs (default: 0)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH ('-': print JSON instead of the table)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
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
    n_sparse = sum(1 for layer in layers if layer.get("kernel") != "dense")
    print(
        f"\nconversion: {n_sparse} of {len(layers)} layers sparse (policy {conv.get('policy')}, "
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
    _add_bench(subparsers)
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
