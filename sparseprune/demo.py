"""`sparseprune demo`: the quick version of `sparseprune compare` (same code path).

Trains the digits MLP (64-512-512-10) for a few epochs and runs a handful of methods at one
sparsity (default 0.9) through the compare machinery: each result is pruned, its masks made
permanent, shrunk when structured, converted with `sparseprune.convert`, checked against the
pruned model on the test set, and timed against torch dense at batch 1 and 256 at torch's
thread count. The methods:

  magnitude        one-shot (no training) and iterative (prune-train-repeat, 3 rounds);
  random           the same two schedules: the criterion matters;
  global-magnitude iterative, one threshold over all layers;
  block-magnitude  iterative, whole 4x1 blocks (the block-sparse kernel);
  units            iterative, whole neurons, then deleted by shrink (a thinner dense model).

Every deployed model is then also compiled to one native executable (sparseprune.compile),
checked on the test set, timed at batch 1 and saved, to show what a service would ship.

Last, one network per family of `sparseprune compare --robust` (standard, beta-Bernoulli
dropout, PGD adversarial training, ANP-VS) on the MLP: clean and PGD accuracy, vulnerability,
units kept and speed of the shrunk network (`--no-robust` skips it).

`run_demo(...)` is the Python entry point; `add_arguments(parser)` and `run(args)` are what the
`sparseprune demo` command calls. `sparseprune compare` runs every method, both models and a
sweep of sparsities.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

from tqdm import tqdm

from sparseprune.argtypes import non_negative_int
from sparseprune.experiments.config import DEMO, Budget, CompareConfig

# (method family, schedule) pairs the demo runs, in table order.
METHODS = (
    ("magnitude", "one-shot"),
    ("magnitude", "iterative"),
    ("random", "one-shot"),
    ("random", "iterative"),
    ("global-magnitude", "iterative"),
    ("block-magnitude", "iterative"),
    ("units", "iterative"),
)
MAIN_METHOD = ("magnitude", "iterative")

# --quick: fewer epochs (the test suite's setting); accuracy ~1-2 points lower.
QUICK = DEMO.with_(budgets={"mlp": Budget(dense_epochs=10, dense_lr=3e-3, finetune_epochs=6, finetune_lr=1e-3)},
                   timing_repeats=5, timing_min_time_s=0.05)


def demo_config(sparsity: float = 0.9, quick: bool = False) -> CompareConfig:
    return (QUICK if quick else DEMO).with_(sparsities=(float(sparsity),))


def run_demo(
    *,
    seed: int = 0,
    sparsity: float = 0.9,
    quick: bool = False,
    progress: bool = True,
    out: Optional[str] = None,
    data: Optional[Sequence[Any]] = None,
    strict: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> Dict[str, Any]:
    """Run the demo; returns the compare record (rows, config, metadata, table; files when `out`).

    data: `(x_train, y_train, x_test, y_test)` with 2-D float features and int labels (e.g. from
    `sparseprune.data.split_arrays`); default: the digits split of `seed`. Writes demo.json,
    demo.csv and the PNG plots to `out` when given. strict (default): the first failure raises
    (the demo's methods are the library's core ones, so a failure is a bug).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    from sparseprune.compare import run_compare

    keys = [f"{name}/{schedule}" for name, schedule in METHODS]
    return run_compare(config=demo_config(sparsity, quick), methods=keys, seed=seed, data=data, out=out,
                       stem="demo", strict=strict, progress=progress, log=log)


# ---------------------------------------------------------------------------------------- cli

def executable_table(rows) -> str:
    """The demo's last table: each deployed model compiled to one native executable
    (sparseprune.compile), timed at batch 1 against torch dense, and its file size."""
    lines = ["compiled to a native executable (sparseprune.compile; batch 1, same threads as above):",
             f"{'method':<17} {'schedule':<10} {'accuracy':>8} {'dense ms':>9} {'exe ms':>8} {'speedup':>8} "
             f"{'file KB':>8} {'% of dense file':>15}"]
    dense_bytes = next((r.extra["executable"]["file_bytes"] for r in rows
                        if r.method == "dense" and "executable" in r.extra), None)
    for r in rows:
        e = r.extra.get("executable")
        if not e:
            continue
        share = f"{e['file_bytes'] / dense_bytes:.0%}" if dense_bytes else "-"
        acc = "-" if e.get("accuracy") is None else f"{e['accuracy']:.1%}"
        lines.append(f"{r.method:<17} {r.schedule:<10} {acc:>8} {e['b1_dense_ms']:>9.3f} {e['b1_exe_ms']:>8.3f} "
                     f"{e['speedup_b1']:>7.2f}x {e['file_bytes'] / 1024:>8.1f} {share:>15}")
    return "\n".join(lines)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options, added to `parser` (the `sparseprune demo` subparser, or your own)."""
    parser.description = (parser.description or "") + " " + (
        "The quick version of `sparseprune compare`: train the digits MLP, prune it to --sparsity with "
        "magnitude and random (one-shot and iterative), global magnitude, 4x1 blocks and whole units, "
        "convert each result, check it against the pruned model, and time it against torch dense."
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split, weights and shuffles (default: 0)")
    parser.add_argument("--sparsity", type=_fraction, default=0.9,
                        help="target sparsity of every method (default: 0.9)")
    parser.add_argument("--out", metavar="DIR", default=None, help="write demo.json, demo.csv and PNG plots to DIR")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--no-robust", dest="robust", action="store_false",
                        help="skip the robust part (standard, beta-Bernoulli, AT, ANP-VS networks under PGD)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments, print the results; 0 on success, 1 on failure."""
    from sparseprune.compare import print_report
    from sparseprune.experiments.deploy import conversion_table
    from sparseprune.experiments.registry import MethodUnavailable

    t0 = time.perf_counter()
    try:
        record = run_demo(seed=args.seed, sparsity=args.sparsity, quick=args.quick,
                          progress=getattr(args, "progress", True), out=args.out)
    except (RuntimeError, ValueError, TypeError, OSError, MethodUnavailable) as exc:
        print(f"sparseprune demo: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_report(record)
    main = next(r for r in record["row_objects"] if (r.method, r.schedule) == MAIN_METHOD)
    print(f"\nconversion of {main.method} ({main.schedule}):")
    print(conversion_table(main.extra.get("conversion", {})))
    print("\n" + executable_table(record["row_objects"]))
    if getattr(args, "robust", True):
        from sparseprune.experiments import robust

        try:
            rob = robust.run_robust(config=robust.DEMO_QUICK if args.quick else robust.DEMO, seed=args.seed,
                                    out=args.out, stem="demo_robust", strict=True,
                                    progress=getattr(args, "progress", True))
        except (RuntimeError, ValueError, TypeError, OSError) as exc:
            print(f"sparseprune demo: robust part: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        robust.print_report(rob)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
