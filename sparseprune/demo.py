"""`sparseprune demo`: train an MLP on digits, prune it four ways, convert, check, time.

The story in one run:
  1. train a dense 64-512-512-10 MLP on scikit-learn's digits (bundled, no download);
  2. prune every Linear to the target sparsity four ways, each from a copy of the dense model:
       magnitude+finetune  L1 magnitude in rounds (equal share of the survivors removed each
                           round), fine-tuning after each round, masks in force while training;
       magnitude-oneshot   L1 magnitude straight to the target, no training;
       random+finetune     random entries, same rounds and fine-tuning as magnitude+finetune;
       random-oneshot      random entries straight to the target, no training;
  3. make the masks permanent, `sparseprune.convert` each model (kernels chosen by measuring
     at batch 1 and 64) and check the converted outputs against the masked model on the test set;
  4. time the dense model and every converted model round-robin at batch 1 and 256, at torch's
     thread count for both, and print accuracy, exactness and speedup side by side.

`run_demo(...)` is the Python entry point (it takes your own data, `train_fn` and `eval_fn`);
`add_arguments(parser)` and `run(args)` are what the `sparseprune demo` command calls.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sparseprune.convert import convert
from sparseprune.data import DataSplit, as_tensors, load_digits_split
from sparseprune.timing import time_interleaved
from sparseprune.train import evaluate_accuracy, train

try:  # the pruning package; torch.nn.utils.prune does the same job when it is missing
    import sparseprune.prune as _sp_prune
except ImportError:  # pragma: no cover - depends on the checkout
    _sp_prune = None

TrainFn = Callable[..., Any]  # train_fn(model, x, y, epochs=int, lr=float) -> anything
EvalFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]  # -> accuracy in [0, 1]

HIDDEN = 512  # wide enough that the 512x512 layer is worth a sparse kernel, small enough to train in seconds
CONVERT_BATCH_SIZES = (1, 64)  # convert() picks each layer's kernel by timing these batch sizes
TIMING_BATCH_SIZES = (1, 256)  # latency reported: one request, and a large batch
# Converted and masked outputs differ by float32 summation order only (~1e-6 on these logits);
# a wrong index or a dropped bias shows up as O(0.1). Scaled by max(1, max |logit|).
OUTPUT_TOLERANCE = 1e-4

# Above this p90/median ratio the run prints that its timings were disturbed.
NOISY_SPREAD = 1.5

METHODS = ("magnitude+finetune", "magnitude-oneshot", "random+finetune", "random-oneshot")
MAIN_METHOD = "magnitude+finetune"


@dataclass(frozen=True)
class DemoConfig:
    """How hard the demo works. `quick` trades a little accuracy and timing stability for speed."""

    dense_epochs: int = 40  # test accuracy levels off at ~97% from about 25 epochs
    dense_lr: float = 2e-3
    rounds: int = 3  # pruning rounds of the +finetune methods
    finetune_epochs: int = 10  # per round
    finetune_lr: float = 1e-3
    batch_size: int = 64
    # Training runs on one thread: batch-64 steps of this MLP gain little from a second thread,
    # and on a shared 2-core machine a 2-thread OpenMP team whose second core is busy ran the
    # same epochs 10-30x slower (measured: 3 epochs 0.3 s on 1 thread, 3.4-10 s on 2). It also
    # makes the accuracies independent of the thread setting. Conversion and timing use torch's
    # thread count, the same for dense and sparse.
    train_threads: int = 1
    timing_warmup: int = 5
    timing_repeats: int = 50
    timing_min_time_s: float = 1.0  # per batch size: batch 1 calls take ~0.05 ms, so many rounds


FULL = DemoConfig()
QUICK = DemoConfig(dense_epochs=15, rounds=3, finetune_epochs=4, timing_warmup=2, timing_repeats=10,
                   timing_min_time_s=0.1)


# ------------------------------------------------------------------------------------- model
def build_mlp(in_features: int = 64, n_classes: int = 10, hidden: int = HIDDEN) -> nn.Sequential:
    """in -> hidden -> ReLU -> hidden -> ReLU -> n_classes (a Sequential, so convert() fuses ReLUs)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def linear_layers(model: nn.Module) -> List[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def schedule(target: float, rounds: int) -> List[float]:
    """Sparsity after each round, removing the same share of the surviving weights every round:
    density_i = (1 - target) ** (i / rounds). For 0.9 in 3 rounds: 0.536, 0.785, 0.9."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    density = 1.0 - target
    steps = [1.0 - density ** (i / rounds) for i in range(1, rounds + 1)]
    steps[-1] = target  # exact, whatever the rounding above
    return steps


def measured_sparsity(model: nn.Module) -> float:
    """Share of exact zeros over all Linear weights (the effective, masked ones)."""
    zeros = total = 0
    with torch.no_grad():
        for layer in linear_layers(model):
            w = layer.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def prune_to(model: nn.Module, sparsity: float, criterion: str, generator: torch.Generator) -> None:
    """Prune every Linear weight to a TOTAL of `sparsity` (previous masks kept), by |w| or at random.

    Uses sparseprune.prune when present; otherwise torch.nn.utils.prune, whose amount counts the
    entries still alive, so the total target is turned into that count.
    """
    for layer in linear_layers(model):
        if _sp_prune is not None:
            if criterion == "magnitude":
                _sp_prune.magnitude(layer, sparsity)
            else:
                _sp_prune.random_unstructured(layer, sparsity, generator=generator)
            continue
        from torch.nn.utils import prune as torch_prune  # pragma: no cover - fallback path

        mask = getattr(layer, "weight_mask", None)
        n_pruned = 0 if mask is None else int((mask == 0).sum())
        count = max(int(round(sparsity * layer.weight.numel())) - n_pruned, 0)
        if criterion == "magnitude":
            torch_prune.l1_unstructured(layer, "weight", amount=count)
        else:
            # torch's random pruning draws from the global RNG: seed it from our generator
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            torch_prune.random_unstructured(layer, "weight", amount=count)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into plain weights (weight_orig * weight_mask), dropping the hooks."""
    if _sp_prune is not None:
        return _sp_prune.remove(model)
    from torch.nn.utils import prune as torch_prune  # pragma: no cover - fallback path

    for layer in linear_layers(model):
        if torch_prune.is_pruned(layer):
            torch_prune.remove(layer, "weight")
    return model


# ------------------------------------------------------------------------------------ result
@dataclass
class MethodRow:
    method: str
    target_sparsity: float
    sparsity: float  # measured over all Linear weights
    accuracy: float  # the masked model run densely by torch (the reference)
    accuracy_converted: Optional[float] = None
    max_abs_diff: Optional[float] = None  # converted vs masked logits on the test set
    finetune_epochs: int = 0
    kernels: str = ""  # per Linear, in order, e.g. "dense,csr,dense"
    latency_ms: Optional[Dict[str, Dict[str, float]]] = None  # {"1": {"dense": .., "sparse": ..}, ..}
    speedup: Optional[Dict[str, float]] = None  # {"1": dense median / sparse median, "256": ..}
    rounds: Optional[List[Dict[str, float]]] = None  # per pruning round (the +finetune methods)


def _format_row(row: MethodRow) -> List[str]:
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lat = row.latency_ms or {}
    b1 = lat.get("1")
    if not b1:
        b1_text = "-"
    elif b1.get("sparse") is None:
        b1_text = f"{b1['dense']:.3f} / -"
    else:
        b1_text = f"{b1['dense']:.3f} / {b1['sparse']:.3f}"
    speed = row.speedup or {}

    def sx(key: str) -> str:
        return f"{speed[key]:.2f}x" if key in speed else "-"

    diff = "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.1e}"
    return [row.method, f"{100 * row.sparsity:.1f}%", pct(row.accuracy), pct(row.accuracy_converted),
            diff, b1_text, sx("1"), sx(str(TIMING_BATCH_SIZES[-1])), row.kernels or "-"]


def results_table(rows: Sequence[MethodRow]) -> str:
    big = TIMING_BATCH_SIZES[-1]
    header = ["method", "sparsity", "acc masked (torch)", "acc converted", "max|diff|",
              "b1 dense/sparse ms", "speedup b1", f"speedup b{big}", "kernels"]
    body = [_format_row(r) for r in rows]
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(len(header))]
    left = {0, len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out.extend(line(b) for b in body)
    return "\n".join(out)


CSV_FIELDS = ["method", "target_sparsity", "sparsity", "accuracy", "accuracy_converted", "max_abs_diff",
              "finetune_epochs", "kernels"]


def write_outputs(out_dir: str, result: Dict[str, Any]) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "demo.json")
    csv_path = os.path.join(out_dir, "demo.csv")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    timing_fields = []
    for b in TIMING_BATCH_SIZES:
        timing_fields += [f"b{b}_dense_ms", f"b{b}_sparse_ms", f"speedup_b{b}"]
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + timing_fields)
        writer.writeheader()
        for row in result["methods"]:
            flat = {k: row[k] for k in CSV_FIELDS}
            for b in TIMING_BATCH_SIZES:
                lat = (row.get("latency_ms") or {}).get(str(b)) or {}
                flat[f"b{b}_dense_ms"] = lat.get("dense")
                flat[f"b{b}_sparse_ms"] = lat.get("sparse")
                flat[f"speedup_b{b}"] = (row.get("speedup") or {}).get(str(b))
            writer.writerow(flat)
    return json_path, csv_path


def _metadata(threads: int) -> Dict[str, Any]:
    try:
        from sparseprune.bench.metadata import run_metadata

        return run_metadata(threads=[threads])
    except ImportError:  # pragma: no cover - depends on the checkout
        return {"torch_version": torch.__version__, "threads": [threads]}


def _timing_input(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` test rows (cycled when the test set is smaller), contiguous."""
    idx = torch.arange(batch) % x.shape[0]
    return x[idx].contiguous()


# --------------------------------------------------------------------------------------- demo
def run_demo(
    *,
    seed: int = 0,
    sparsity: float = 0.9,
    quick: bool = False,
    progress: bool = True,
    out: Optional[str] = None,
    data: Optional[Sequence[torch.Tensor]] = None,
    train_fn: Optional[TrainFn] = None,
    eval_fn: Optional[EvalFn] = None,
    config: Optional[DemoConfig] = None,
    log: Callable[[str], None] = tqdm.write,
) -> Dict[str, Any]:
    """Run the demo and return its record (what --out writes to demo.json).

    data: `(x_train, y_train, x_test, y_test)` (e.g. from `sparseprune.data.split_arrays`) with
        2-D float features and int labels; default: `load_digits_split(seed)`.
    train_fn: called as `train_fn(model, x, y, epochs=int, lr=float)` to train in place, for the
        dense model and after each pruning round (masks are installed, keep them: do not assign
        `.weight`); default: `sparseprune.train.train` (Adam, cosine schedule, batch 64).
    eval_fn: `eval_fn(model, x, y) -> float` accuracy in [0, 1]; it also gets the converted
        (inference-only) models. Default: `sparseprune.train.evaluate_accuracy`.
    Raises RuntimeError if a converted model's outputs differ from its masked model's.
    """
    start_time = time.perf_counter()
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    cfg = config or (QUICK if quick else FULL)
    torch.manual_seed(seed)
    np.random.seed(seed)
    threads = torch.get_num_threads()

    if data is None:
        split = load_digits_split(seed=seed)
        data_name = "sklearn digits (8x8, scaled to [0, 1])"
    else:
        parts = tuple(data)
        if len(parts) != 4:
            raise ValueError(f"data must be (x_train, y_train, x_test, y_test), got {len(parts)} items")
        x_tr, y_tr = as_tensors(parts[0], parts[1])
        x_te, y_te = as_tensors(parts[2], parts[3])
        split = DataSplit(x_tr, y_tr, x_te, y_te)
        data_name = "user data"
    x_tr, y_tr, x_te, y_te = split
    if x_tr.dim() != 2 or x_te.dim() != 2 or x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(
            f"data features must be 2-D with the same width, got {tuple(x_tr.shape)} and {tuple(x_te.shape)}"
        )

    steps = schedule(float(sparsity), cfg.rounds)
    seed_counter = [seed * 1000]
    stage_name = ["train dense"]

    def default_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float):
        seed_counter[0] += 1  # a different (but fixed) shuffle for every training stage
        return train(model, x, y, epochs=epochs, lr=lr, batch_size=cfg.batch_size, optimizer="adam",
                     seed=seed_counter[0], progress=progress, lr_schedule="cosine", desc=stage_name[0],
                     position=1, num_threads=cfg.train_threads)

    fit = train_fn or default_train
    acc = eval_fn or evaluate_accuracy

    def accuracy(model: nn.Module) -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(cfg.train_threads)  # small forward passes: see DemoConfig.train_threads
        try:
            value = float(acc(model, x_te, y_te))
        finally:
            torch.set_num_threads(previous)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"eval_fn must return an accuracy in [0, 1], got {value}")
        return value

    n_stages = 1 + 2 * cfg.rounds + 2 + len(METHODS) + 1 + len(TIMING_BATCH_SIZES)
    bar = tqdm(total=n_stages, desc="sparseprune demo", unit="stage", disable=not progress, position=0,
               leave=False)

    def stage(text: str) -> None:
        stage_name[0] = text
        bar.set_description(text)

    try:
        log(f"data: {data_name}, train {tuple(x_tr.shape)}, test {tuple(x_te.shape)}, seed {seed}")
        # ---------------------------------------------------------------- 1. dense training
        stage("train dense")
        dense = build_mlp(x_tr.shape[1], int(max(y_tr.max(), y_te.max())) + 1)
        dense_losses = fit(dense, x_tr, y_tr, epochs=cfg.dense_epochs, lr=cfg.dense_lr)
        dense.eval()
        dense_acc = accuracy(dense)
        bar.update()
        log(f"dense MLP {x_tr.shape[1]}-{HIDDEN}-{HIDDEN}-{dense[-1].out_features}: {cfg.dense_epochs} epochs, "
            f"test accuracy {100 * dense_acc:.1f}%")

        # ---------------------------------------------------------------- 2. pruning, four ways
        generator = torch.Generator().manual_seed(seed)
        pruned: Dict[str, nn.Module] = {}
        rounds_log: Dict[str, List[Dict[str, float]]] = {}
        for criterion in ("magnitude", "random"):
            name = f"{criterion}+finetune"
            model = copy.deepcopy(dense)
            rounds_log[name] = []
            for i, target in enumerate(steps, 1):
                stage(f"{name} round {i}/{len(steps)}")
                prune_to(model, target, criterion, generator)
                before = accuracy(model)
                fit(model, x_tr, y_tr, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr)
                model.eval()
                after = accuracy(model)
                rounds_log[name].append({"sparsity": measured_sparsity(model), "accuracy_pruned": before,
                                         "accuracy_finetuned": after})
                bar.update()
                log(f"{name} round {i}: sparsity {100 * measured_sparsity(model):.1f}%, accuracy "
                    f"{100 * before:.1f}% pruned -> {100 * after:.1f}% after {cfg.finetune_epochs} epochs")
            pruned[name] = model
        for criterion in ("magnitude", "random"):
            name = f"{criterion}-oneshot"
            stage(name)
            model = copy.deepcopy(dense)
            prune_to(model, float(sparsity), criterion, generator)
            pruned[name] = model
            bar.update()
            log(f"{name}: sparsity {100 * measured_sparsity(model):.1f}%, accuracy {100 * accuracy(model):.1f}%")

        # ---------------------------------------------------------------- 3. convert and check
        rows: Dict[str, MethodRow] = {}
        converted: Dict[str, nn.Module] = {}
        reports: Dict[str, Any] = {}
        for name in METHODS:
            stage(f"convert {name}")
            model = make_permanent(pruned[name])
            model.eval()
            conv = convert(model, policy="measure", batch_sizes=CONVERT_BATCH_SIZES, num_threads=threads)
            with torch.no_grad():
                ref = model(x_te)
                got = conv(x_te)
            diff = float((got - ref).abs().max())
            tol = OUTPUT_TOLERANCE * max(1.0, float(ref.abs().max()))
            if not diff <= tol:  # also catches nan
                raise RuntimeError(f"{name}: converted outputs differ from the masked model's by {diff:.3g} "
                                   f"(tolerance {tol:.3g})")
            kernels = [c.kernel for c in conv.sparseprune_report.layers]
            rows[name] = MethodRow(
                method=name,
                target_sparsity=float(sparsity),
                sparsity=measured_sparsity(model),
                accuracy=accuracy(model),
                accuracy_converted=accuracy(conv),
                max_abs_diff=diff,
                finetune_epochs=cfg.finetune_epochs * cfg.rounds if name.endswith("+finetune") else 0,
                kernels=",".join(kernels),
                rounds=rounds_log.get(name),
            )
            converted[name] = conv
            reports[name] = conv.sparseprune_report.to_dict()
            bar.update()
        worst = max(r.max_abs_diff for r in rows.values())
        log(f"converted {len(METHODS)} models; max |converted - masked| over the test logits: {worst:.2e}")
        bar.update()

        # ---------------------------------------------------------------- 4. latency
        models = {"dense": dense, **converted}
        latency: Dict[str, Dict[str, Dict[str, float]]] = {name: {} for name in models}
        for batch in TIMING_BATCH_SIZES:
            stage(f"time batch {batch}")
            x = _timing_input(x_te, batch)
            fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
            with torch.no_grad():
                times = time_interleaved(fns, warmup=cfg.timing_warmup, repeats=cfg.timing_repeats,
                                         min_time_s=cfg.timing_min_time_s)
            for name, t in times.items():
                latency[name][str(batch)] = {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "runs": t.runs}
            bar.update()
    finally:
        bar.close()

    def lat_pair(name: str) -> Dict[str, Dict[str, float]]:
        return {b: {"dense": latency["dense"][b]["median_ms"], "sparse": latency[name][b]["median_ms"]}
                for b in latency[name]}

    dense_row = MethodRow(
        method="dense", target_sparsity=0.0, sparsity=measured_sparsity(dense), accuracy=dense_acc,
        kernels=",".join("dense" for _ in linear_layers(dense)),
        latency_ms={b: {"dense": v["median_ms"], "sparse": None} for b, v in latency["dense"].items()},
    )
    for name, row in rows.items():
        row.latency_ms = lat_pair(name)
        row.speedup = {b: v["dense"] / v["sparse"] for b, v in row.latency_ms.items()}
    all_rows = [dense_row] + [rows[name] for name in METHODS]

    result: Dict[str, Any] = {
        "config": {"seed": seed, "sparsity": float(sparsity), "quick": bool(quick), "threads": threads,
                   "schedule": steps, "hidden": HIDDEN, "convert_batch_sizes": list(CONVERT_BATCH_SIZES),
                   "timing_batch_sizes": list(TIMING_BATCH_SIZES), **asdict(cfg),
                   "data": data_name, "n_train": int(x_tr.shape[0]), "n_test": int(x_te.shape[0]),
                   "pruning_backend": "sparseprune.prune" if _sp_prune is not None else "torch.nn.utils.prune",
                   "custom_train_fn": train_fn is not None, "custom_eval_fn": eval_fn is not None},
        "dense_accuracy": dense_acc,
        "dense_losses": [float(v) for v in dense_losses] if isinstance(dense_losses, (list, tuple)) else None,
        "methods": [asdict(r) for r in all_rows],
        "latency": latency,
        "conversion": reports,
        "metadata": _metadata(threads),
        "wall_time_s": None,
    }
    # p90 / median of each timed model: near 1 on a quiet machine; well above when another
    # process competed for the cores during the timing
    result["timing_spread"] = max(v["p90_ms"] / v["median_ms"] for per in latency.values() for v in per.values())
    result["wall_time_s"] = time.perf_counter() - start_time
    result["table"] = results_table(all_rows)
    result["main_report"] = converted[MAIN_METHOD].sparseprune_report.table()
    if out is not None:
        record = {k: v for k, v in result.items() if k not in ("table", "main_report")}
        result["files"] = list(write_outputs(out, record))
    return result


# ---------------------------------------------------------------------------------------- cli
def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options, added to `parser` (the `sparseprune demo` subparser, or your own)."""
    parser.description = (parser.description or "") + " " + (
        "Train an MLP on scikit-learn's digits, prune it to --sparsity by magnitude (iteratively with "
        "fine-tuning, and one-shot) and at random, convert each model with sparseprune.convert, check "
        "it against the masked model, and time dense vs converted at batch 1 and 256."
    )
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the split, weights and shuffles (default: 0)")
    parser.add_argument("--sparsity", type=_fraction, default=0.9,
                        help="fraction of each Linear weight pruned (default: 0.9)")
    parser.add_argument("--out", metavar="DIR", default=None, help="write demo.json and demo.csv to DIR")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds (~15 s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments, print the results; 0 on success, 1 on failure."""
    t0 = time.perf_counter()
    try:
        result = run_demo(seed=args.seed, sparsity=args.sparsity, quick=args.quick,
                          progress=getattr(args, "progress", True), out=args.out)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"sparseprune demo: error: {exc}", file=sys.stderr)
        return 1
    cfg = result["config"]
    print()
    print(f"results (test set of {cfg['n_test']}; latency = median of round-robin runs at {cfg['threads']} "
          f"thread(s), dense = the unpruned model run by torch):")
    print(result["table"])
    if result["timing_spread"] > NOISY_SPREAD:
        print(f"note: timings were noisy (p90 up to {result['timing_spread']:.1f}x the median): something else "
              "was using the CPU; rerun for stable speedups")
    print()
    print(f"conversion of {MAIN_METHOD} (policy measure, batch sizes {cfg['convert_batch_sizes']}):")
    print(result["main_report"])
    for path in result.get("files", []):
        print(f"wrote {path}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
