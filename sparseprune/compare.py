"""`sparseprune compare`: every pruning method on a digits MLP and CNN, deployed and timed.

Trains a 64-512-512-10 MLP and a small CNN on scikit-learn's bundled digits (or your data with
`--data file.npz`), prunes each with every registered method (one-shot, iterative with
fine-tuning, gradual, at initialisation, structured + shrink, depth, ensembles, gates) at each
`--sparsities` value, converts every result with `sparseprune.convert` (after
`sparseprune.shrink` for structured results), checks the converted outputs against the pruned
model, and measures test accuracy, batch-1 latency and batch-256 throughput against torch dense
at the same thread count, nonzero parameters and bytes on disk. Every method gets its rows,
including those that lose, fail ("error: ...") or are missing here ("unavailable: ...").
Every row of a model trains for the same budget after pruning (`--budget` epochs: iterative
rounds split it, at-init rows train from scratch for it; "one-shot" rows are not trained), and
the table's "epochs" column shows what each row got.

Writes compare.json, compare.csv and three PNG plots to `--out`. The pieces live in
`sparseprune.experiments` (methods registry, deploy, measure, results, plots);
`run_compare(...)` is the Python entry point, `add_arguments`/`run` the command's.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from sparseprune.argtypes import bounded_int, non_negative_int
from sparseprune.experiments.config import DEFAULT_SPARSITIES, FULL, PRESETS, Budget, CompareConfig
from sparseprune.experiments.models import MODELS
from sparseprune.experiments.registry import MethodUnavailable, all_methods, method_names, select
from sparseprune.experiments.results import ERROR, OK, UNAVAILABLE, Row, disturbed, format_table, write_all
from sparseprune.experiments.runner import load_data, run_rows

# Above this p90/median ratio of a timed model, the run says its timings were disturbed.
NOISY_SPREAD = 1.5


def run_compare(
    *,
    config: CompareConfig = FULL,
    methods: Optional[Sequence[str]] = None,
    schedules: Optional[Sequence[str]] = None,
    seed: int = 0,
    data: Optional[Sequence[Any]] = None,
    out: Optional[str] = None,
    stem: str = "compare",
    plots: bool = True,
    strict: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> Dict[str, Any]:
    """Run the comparison and return its record (what `out`/{stem}.json holds, plus "rows" as Row objects).

    methods / schedules: method families (or "family/schedule" keys) and schedules to run;
    default all. data: (x_train, y_train, x_test, y_test), default the digits split of `seed`.
    strict: raise the first failure instead of recording an "error" row.
    """
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    check_config(config)
    selected = select(methods, schedules)
    split, data_name = load_data(seed, data)
    threads = torch.get_num_threads()
    log(f"data: {data_name}, train {tuple(split.x_train.shape)}, test {tuple(split.x_test.shape)}; seed {seed}; "
        f"{threads} thread(s) for conversion and timing, {config.train_threads} for training")
    rows = run_rows(split, selected, config, seed=seed, strict=strict, progress=progress, log=log)
    batch_sizes = config.timing_batch_sizes
    spreads = [t["ours_p90_ms"] / t["ours_ms"] for r in rows for t in r.timing.values() if t.get("ours_ms")]
    spreads += [t["dense_p90_ms"] / t["dense_ms"] for r in rows for t in r.timing.values() if t.get("dense_ms")]
    record: Dict[str, Any] = {
        "config": config_record(config, seed, threads, data_name, split, selected),
        "rows": [r.to_dict() for r in rows],
        "summary": summary(rows),
        "timing_spread": max(spreads) if spreads else None,
        "metadata": _metadata(threads),
        "wall_time_s": time.perf_counter() - start,
    }
    files: List[str] = []
    if out is not None:
        files += write_all(out, stem, rows, record, batch_sizes)
        if plots:
            from sparseprune.experiments.plots import plot_all

            files += plot_all(rows, out, batch_sizes, stem=stem)
    record["wall_time_s"] = time.perf_counter() - start
    if out is not None:  # the final wall time, including the plots
        from sparseprune.experiments.results import write_json

        write_json(files[0], record)
    record["files"] = files
    record["table"] = format_table(rows, batch_sizes)
    record["row_objects"] = rows
    return record


def check_config(config: CompareConfig) -> None:
    if not isinstance(config, CompareConfig):
        raise TypeError(f"config must be a CompareConfig, got {type(config).__name__}")
    if not config.sparsities:
        raise ValueError("sparsities must hold at least one value")
    for s in config.sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"every sparsity must be in [0, 1), got {s!r}")
    unknown = [m for m in config.models if m not in MODELS]
    if unknown or not config.models:
        raise ValueError(f"models must be a non-empty subset of {tuple(MODELS)}, got {config.models!r}")
    for m in config.models:
        if m not in config.budgets:
            raise ValueError(f"config has no training budget for model {m!r}")
        if not isinstance(config.budgets[m], Budget):
            raise TypeError(f"budgets[{m!r}] must be a Budget, got {type(config.budgets[m]).__name__}")


def budget_line(config: Dict[str, Any]) -> str:
    """What the table's rows were trained with, from a record's config."""
    parts = [f"{m}: dense {b['dense_epochs']} epochs, then {b['finetune_epochs']} epochs after pruning"
             for m, b in config["budgets"].items() if m in config["models"]]
    return ("training budget (every row of a model; iterative rounds split it, gradual ramps within it, "
            f"at-init rows train from scratch for it, one-shot rows are not trained): {'; '.join(parts)}; "
            f"{config['rounds']} iterative rounds")


def summary(rows: Sequence[Row]) -> Dict[str, int]:
    return {status: sum(1 for r in rows if r.status == status) for status in (OK, UNAVAILABLE, ERROR)}


def config_record(config: CompareConfig, seed: int, threads: int, data_name: str, split, methods) -> Dict[str, Any]:
    from dataclasses import asdict

    return {
        **asdict(config), "seed": seed, "threads": threads, "data": data_name,
        "n_train": int(split.x_train.shape[0]), "n_test": int(split.x_test.shape[0]),
        "methods": [{"name": m.name, "schedule": m.schedule, "models": list(m.models), "description": m.description}
                    for m in methods],
    }


def _metadata(threads: int) -> Dict[str, Any]:
    try:
        from sparseprune.bench.metadata import run_metadata

        return run_metadata(threads=[threads])
    except ImportError:  # pragma: no cover - depends on the checkout
        return {"torch_version": torch.__version__, "threads": [threads]}


def load_npz(path: str, seed: int):
    """(x_train, y_train, x_test, y_test) from an .npz with arrays x, y (split here, stratified by
    `seed`) or x_train, y_train, x_test, y_test (used as they are)."""
    from sparseprune.data import split_arrays

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"--data {path}: cannot read it as an .npz file ({exc})") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
    if {"x", "y"} <= set(arrays):
        return split_arrays(arrays["x"], arrays["y"], seed=seed)
    raise ValueError(f"--data {path} must hold arrays x and y (or x_train, y_train, x_test, y_test), "
                     f"got {sorted(arrays)}")


# ---------------------------------------------------------------------------------------- cli

def _sparsities(text: str) -> List[float]:
    values = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
        if not 0.0 <= v < 1.0:  # also rejects nan
            raise argparse.ArgumentTypeError(f"every sparsity must be in [0, 1), got {part.strip()}")
        values.append(v)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"sparsities must be distinct, got {text!r}")
    return sorted(values)


def _names(choices_fn: Callable[[], Sequence[str]], what: str) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        choices = list(choices_fn())
        bad = [n for n in names if n not in choices and n.split("/")[0] not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from "
                                             f"{', '.join(choices)}")
        return names

    return parse


def _schedule_names() -> List[str]:
    return list(dict.fromkeys(m.schedule for m in all_methods()))



def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The compare options, added to `parser` (the `sparseprune compare` subparser, or your own)."""
    parser.add_argument("--sparsities", type=_sparsities, default=None, metavar="S,S,...",
                        help=f"target sparsities (default: {','.join(map(str, DEFAULT_SPARSITIES))})")
    parser.add_argument("--methods", type=_names(method_names, "method(s)"), default=None, metavar="NAME,...",
                        help="method families to run (default: all; see --list)")
    parser.add_argument("--schedules", type=_names(_schedule_names, "schedule(s)"), default=None,
                        metavar="NAME,...", help="only these schedules (one-shot, iterative, ...)")
    parser.add_argument("--models", type=_names(lambda: list(MODELS), "model(s)"), default=None,
                        metavar="mlp,cnn", help="models to train (default: mlp,cnn)")
    parser.add_argument("--data", metavar="FILE.npz", default=None,
                        help="your data: arrays x, y (split 75/25 by --seed) or x_train, y_train, x_test, y_test")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split, weights, masks, shuffles (default: 0)")
    parser.add_argument("--out", metavar="DIR", default="sparseprune-compare",
                        help="directory for compare.json, compare.csv and the PNG plots (default: sparseprune-compare)")
    parser.add_argument("--quick", action="store_true", help="a few epochs, sparsity 0.9 only, short timing")
    parser.add_argument("--dense-epochs", type=bounded_int(1), default=None, help="override the dense training epochs")
    parser.add_argument("--budget", type=bounded_int(1), default=None, metavar="EPOCHS",
                        help="epochs of training every row gets after pruning (iterative rounds split it; "
                             "at-init rows train from scratch for it); default 6")
    parser.add_argument("--strict", action="store_true", help="stop at the first method that fails")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--robust", action="store_true",
                        help="instead: standard, AT, AT+VS, beta-Bernoulli, ANP, ANP-VS networks, robustness and "
                             "speed (sparseprune.experiments.robust; uses --models, --seed, --out, --quick, "
                             "--dense-epochs, --data)")
    return parser


def config_from_args(args: argparse.Namespace, base: Optional[CompareConfig] = None) -> CompareConfig:
    cfg = base or PRESETS["quick" if getattr(args, "quick", False) else "full"]
    changes: Dict[str, Any] = {}
    if getattr(args, "sparsities", None):
        changes["sparsities"] = tuple(args.sparsities)
    if getattr(args, "models", None):
        changes["models"] = tuple(dict.fromkeys(args.models))
    dense = getattr(args, "dense_epochs", None)
    if dense is not None:
        changes["budgets"] = {k: Budget(dense, b.dense_lr, b.finetune_epochs, b.finetune_lr)
                              for k, b in cfg.budgets.items()}
    cfg = cfg.with_(**changes) if changes else cfg
    budget = getattr(args, "budget", None)
    return cfg.with_budget(budget) if budget is not None else cfg


def list_methods() -> str:
    lines = []
    for m in all_methods():
        lines.append(f"{m.name:<18} {m.schedule:<14} {','.join(m.models):<8} {m.description}")
    return "\n".join(lines)


def print_report(record: Dict[str, Any]) -> None:
    cfg = record["config"]
    print()
    print(f"results ({cfg['data']}, test set of {cfg['n_test']}; latency = median of round-robin runs at "
          f"{cfg['threads']} thread(s) against the unpruned model run by torch; 'dense' rows: the unpruned "
          "model converted as it is):")
    print(budget_line(cfg))
    print(record["table"])
    s = record["summary"]
    print(f"\n{s[OK]} rows ok, {s[UNAVAILABLE]} unavailable, {s[ERROR]} errors")
    spread = record.get("timing_spread")
    if spread is not None and spread > NOISY_SPREAD:
        print(f"note: timings were noisy (p90 up to {spread:.1f}x the median): something else was using the CPU; "
              "rerun for stable speedups")
    for line in disturbed(record["row_objects"]):
        print(f"note: timing disturbed: {line}")
    for path in record.get("files", []):
        print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    """`sparseprune compare` from parsed arguments; 0 on success, 1 on failure (or errors with --strict)."""
    if getattr(args, "list", False):
        print(list_methods())
        return 0
    if getattr(args, "robust", False):
        from sparseprune.experiments import robust

        return robust.run(args)
    t0 = time.perf_counter()
    try:
        data = load_npz(args.data, args.seed) if args.data else None
        record = run_compare(config=config_from_args(args), methods=args.methods, schedules=args.schedules,
                             seed=args.seed, data=data, out=args.out, plots=args.plots, strict=args.strict,
                             progress=args.progress)
    except (RuntimeError, ValueError, TypeError, OSError, MethodUnavailable) as exc:
        print(f"sparseprune compare: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_report(record)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
