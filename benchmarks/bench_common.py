"""What the scripts in benchmarks/ share: progress logging, the comma-list option type, the
timing/output options, budget-based round-robin timing, the hypervisor's steal time, the
relative output difference, running the chosen sections at a restored thread count, and writing
the JSON and Markdown results.

Not a script. The table scripts import it from their own directory (they put it on sys.path),
so `python benchmarks/bench_linear_table.py` works from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from sparseprune.bench import run_metadata
from sparseprune.timing import time_interleaved

Times = Dict[str, Dict[str, float]]


def log(msg: str) -> None:
    """Progress and warnings go to stderr; stdout is left for the Markdown table."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- arguments
def comma_list(kind: Callable[[str], object], valid: Callable[[object], bool], what: str):
    """argparse type: "a,b,c" -> [kind(a), kind(b), kind(c)], every value passing `valid`."""

    def parse(text: str):
        try:
            values = [kind(p.strip()) for p in text.split(",") if p.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or not all(valid(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    return parse


def add_timing_args(p: argparse.ArgumentParser, sections: Sequence[str] = (), budget_s: Optional[float] = 1.0) -> None:
    """--repeats, --min-repeats, --warmup, --budget-s (default `budget_s`; None: left for the
    script's grid to fill) and, when `sections` are given, --sections (default: all of them)."""
    p.add_argument("--repeats", type=int, help="max timed rounds per case (default 20, --quick 10)")
    p.add_argument("--min-repeats", type=int, default=3, help="timed rounds even for slow cases (default 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=budget_s, help="target timed seconds per case (default "
                   + (f"{budget_s:g})" if budget_s is not None else "from the grid, see --quick)"))
    if sections:
        p.add_argument("--sections", type=comma_list(str, lambda v: v in sections, f"names from {sections}"),
                       default=list(sections))


def add_output_args(p: argparse.ArgumentParser, default_json: str) -> None:
    """--seed, --json (default `default_json`) and --markdown."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=default_json, metavar="PATH", help="JSON output (default: %(default)s)")
    p.add_argument("--markdown", metavar="PATH", help="Markdown table to PATH instead of stdout")


def fill_from_grid(args: argparse.Namespace, grid: Mapping[str, object], keys: Sequence[str]) -> None:
    """Options of `keys` that were not given take the grid's value (FULL or QUICK)."""
    for key in keys:
        if getattr(args, key) is None:
            setattr(args, key, grid[key])


def check_timing_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects impossible round counts; --min-repeats never exceeds --repeats."""
    if args.repeats < 1 or args.min_repeats < 1 or args.warmup < 0 or args.budget_s <= 0:
        p.error("--repeats and --min-repeats must be >= 1, --warmup >= 0, --budget-s > 0")
    args.min_repeats = min(args.min_repeats, args.repeats)


# ------------------------------------------------------------------------------- timing
def time_case(fns: Dict[str, Callable[[], object]], args: argparse.Namespace) -> Tuple[Times, int, int]:
    """Round-robin timing, with fewer rounds (>= --min-repeats) when one round is slow."""
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = time.perf_counter() - t0
    calls = 4  # time_interleaved: one untimed + three timed calls per candidate per round
    repeats = max(args.min_repeats, min(args.repeats, int(args.budget_s / max(round_s * calls, 1e-9))))
    warmup = args.warmup if round_s * args.warmup <= args.budget_s / 2 else 1
    times = time_interleaved(fns, warmup=warmup, repeats=repeats)
    out = {name: {"median_ms": t.median_ms, "p90_ms": t.p90_ms} for name, t in times.items()}
    return out, repeats, warmup


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests (Linux /proc/stat 'steal'), in seconds; 0 where
    unavailable. Recorded per case: a run with steal time shared its cores with a neighbour."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def max_rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|): the error relative to the output's scale."""
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def checked_candidates(fns: Mapping[str, Callable[[], object]], baseline: str, errors: Dict[str, str],
                       diff: Callable[[object, object], float], tolerance: float, reference: str = "torch"
                       ) -> Tuple[Dict[str, Callable[[], object]], Dict[str, float]]:
    """Runs the baseline and every other candidate once: one that raises, or whose output differs
    from the baseline's by more than `tolerance` (`diff(output, reference)`, NaN included), gets
    its reason in errors[name] and is left out. Returns (the candidates to time, their diffs)."""
    ref = fns[baseline]()
    diffs: Dict[str, float] = {}
    timed = {baseline: fns[baseline]}
    for name, fn in fns.items():
        if name == baseline:
            continue
        try:
            diffs[name] = diff(fn(), ref)
        except Exception as exc:  # a failing candidate is a result, not a crash
            errors[name] = (str(exc).strip().splitlines() or [""])[0][:300] or type(exc).__name__
            continue
        if not diffs[name] <= tolerance:  # also NaN
            errors[name] = f"output differs from {reference}: max rel diff {diffs[name]:.1e} > {tolerance:.0e}"
            continue
        timed[name] = fn
    return timed, diffs


def speedups(times: Times) -> Dict[str, float]:
    """Dense median / candidate median, for every candidate but dense."""
    dense_ms = times["dense"]["median_ms"]
    return {k: dense_ms / v["median_ms"] for k, v in times.items() if k != "dense"}


def gflops(times: Times, ours: str, dense_flop: float, actual_flop: float) -> Dict[str, float]:
    """The GFLOP/s fields of a row: ours dense-equivalent and actual, and torch dense."""
    ours_s = times[ours]["median_ms"] / 1e3
    return {
        "ours_gflops_dense_equiv": dense_flop / ours_s / 1e9,
        "ours_gflops_actual": actual_flop / ours_s / 1e9,
        "dense_gflops": dense_flop / (times["dense"]["median_ms"] / 1e3) / 1e9,
    }


# ------------------------------------------------------------------------------- running and output
def run_sections(args: argparse.Namespace, runners: Mapping[str, Callable[[argparse.Namespace], List[dict]]]) -> List[dict]:
    """Rows of every section in args.sections, in the order of `runners`; torch's thread count is
    restored afterwards (the sections set it per case)."""
    cpus = os.cpu_count() or 1
    if max(args.threads) > cpus:
        log(f"warning: {max(args.threads)} threads on {cpus} logical CPUs: oversubscribed, numbers are not meaningful")
    previous = torch.get_num_threads()
    rows: List[dict] = []
    try:
        for section, run in runners.items():
            if section in args.sections:
                rows += run(args)
    finally:
        torch.set_num_threads(previous)
    return rows


def write_outputs(args: argparse.Namespace, rows: List[dict], markdown: Callable[[dict], str], started: float,
                  head: Mapping[str, object], notes: Mapping[str, object]) -> None:
    """{"metadata", "rows"} as JSON to --json; markdown(result) to --markdown, or stdout without it.

    The metadata is sparseprune.bench.run_metadata(args.threads), then the script's `head` (its
    grid), the round-count options, the seed and the seconds since `started` (time.perf_counter()),
    then the script's `notes` (what was compared, tolerances).
    """
    meta = run_metadata(args.threads)
    meta.update(head)
    meta.update({
        "repeats": args.repeats, "min_repeats": args.min_repeats, "warmup": args.warmup,
        "budget_s": args.budget_s, "seed": args.seed, "elapsed_s": time.perf_counter() - started,
    })
    meta.update(notes)
    result = json.loads(json.dumps({"metadata": meta, "rows": rows}, default=str))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    log(f"wrote {args.json}")
    table = markdown(result)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
        log(f"wrote {args.markdown}")
    else:
        print(table)
