"""benchmark(): prune a model, convert it once, check it, then time dense vs sparse honestly.

Honest here means: the dense baseline is the same (pruned) model run by torch eager under
inference_mode, both sides run at the same thread count in the same round-robin loop on the same
input, the converted model's output is checked against dense on that input before it is timed,
and the record says which build, CPU, library versions and git revision produced the numbers.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseprune.model_copy import deepcopy_model
from sparseprune.bench.metadata import run_metadata, summary_line
from sparseprune.convert import ConversionReport, LayerChoice, convert
from sparseprune.timing import time_interleaved

# Converted and dense outputs may differ by float32 summation order only. The allowed max abs
# error is this times max(1, max |dense output|): a BERT-sized layer (K = 3072) differs by ~1e-6
# relative, so 1e-3 passes every reordering and still catches a wrong index or a dropped bias.
DEFAULT_TOLERANCE = 1e-3


@dataclass
class BenchmarkRow:
    threads: int
    batch: int
    dense_median_ms: float
    dense_p90_ms: float
    sparse_median_ms: float
    sparse_p90_ms: float
    dense_throughput: float  # samples/s = batch / median
    sparse_throughput: float
    speedup: float  # dense median / sparse median, same run, same threads
    runs: int  # timed calls of each side
    max_abs_error: float  # converted vs dense on the timed input


@dataclass
class BenchmarkResult:
    rows: List[BenchmarkRow]
    metadata: Dict[str, Any]
    conversion: Dict[str, Any]  # ConversionReport.to_dict()
    accuracy: Optional[Dict[str, float]] = None  # accuracy_fn on "unpruned", "dense", "sparse"
    max_abs_error: float = 0.0  # worst over the correctness checks
    model_summary: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "metadata": self.metadata,
            "conversion": self.conversion,
            "accuracy": self.accuracy,
            "max_abs_error": self.max_abs_error,
            "model_summary": self.model_summary,
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BenchmarkResult":
        names = {f.name for f in fields(BenchmarkRow)}
        rows = [BenchmarkRow(**{k: v for k, v in r.items() if k in names}) for r in data["rows"]]
        return cls(
            rows=rows,
            metadata=data["metadata"],
            conversion=data["conversion"],
            accuracy=data.get("accuracy"),
            max_abs_error=data.get("max_abs_error", 0.0),
            model_summary=data.get("model_summary", {}),
        )

    @classmethod
    def from_json(cls, text: str) -> "BenchmarkResult":
        return cls.from_dict(json.loads(text))

    def row(self, threads: int, batch: int) -> BenchmarkRow:
        for r in self.rows:
            if r.threads == threads and r.batch == batch:
                return r
        raise KeyError(f"no row for threads={threads}, batch={batch}")

    def table(self) -> str:
        """Aligned text table, one line per (threads, batch)."""
        head = (
            f"{'threads':>7} {'batch':>6} {'dense ms':>10} {'p90':>9} {'sparse ms':>10} {'p90':>9} "
            f"{'dense smp/s':>12} {'sparse smp/s':>12} {'speedup':>8} {'runs':>5} {'max err':>9}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.threads:>7} {r.batch:>6} {r.dense_median_ms:>10.4f} {r.dense_p90_ms:>9.4f} "
                f"{r.sparse_median_ms:>10.4f} {r.sparse_p90_ms:>9.4f} {r.dense_throughput:>12.1f} "
                f"{r.sparse_throughput:>12.1f} {r.speedup:>7.2f}x {r.runs:>5} {r.max_abs_error:>9.2e}"
            )
        if self.accuracy:
            parts = ", ".join(f"{k} {v:.4f}" for k, v in self.accuracy.items())
            lines.append(f"accuracy: {parts}")
        return "\n".join(lines)

    def conversion_table(self) -> str:
        """The conversion report as ConversionReport.table() prints it."""
        return _report_from_dict(self.conversion).table()

    def summary(self) -> str:
        """The build/CPU/git line for the console."""
        return summary_line(self.metadata)

    def __str__(self) -> str:
        return self.table()


def _report_from_dict(data: Dict[str, Any]) -> ConversionReport:
    names = {f.name for f in fields(LayerChoice)}
    report = ConversionReport(policy=data.get("policy", "?"), num_threads=data.get("num_threads", 0))
    for layer in data.get("layers", []):
        kw = {k: v for k, v in layer.items() if k in names}
        kw["shape"] = tuple(kw.get("shape", ()))
        for key in ("dense_ms", "chosen_ms"):
            kw[key] = {int(b): t for b, t in (kw.get(key) or {}).items()}
        report.add(LayerChoice(**kw))
    return report


def _positive_ints(value: Sequence[int], name: str, unique: bool = True) -> Tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    if unique and len(set(items)) != len(items):
        raise ValueError(f"{name} has duplicates: {value!r}")
    return items


def prune_linear_layers(model: nn.Module, sparsity: float) -> int:
    """Per-layer L1 magnitude pruning of every nn.Linear and nn.Conv2d weight, and of every
    nn.MultiheadAttention's packed q/k/v projection, to `sparsity`, made permanent
    (torch.nn.utils.prune then prune.remove). Returns how many weights were pruned."""
    count = 0
    for module in model.modules():
        names = []
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            names = ["weight"]
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            names = ["in_proj_weight"]  # out_proj is an nn.Linear, pruned on its own
        for name in names:
            torch_prune.l1_unstructured(module, name, amount=float(sparsity))
            torch_prune.remove(module, name)
            count += 1
    return count


def _model_summary(model: nn.Module) -> Dict[str, Any]:
    linear_params = linear_zeros = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach()
            linear_params += w.numel()
            linear_zeros += w.numel() - int(torch.count_nonzero(w))
    return {
        "type": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "linear_weights": linear_params,
        "linear_sparsity": linear_zeros / linear_params if linear_params else 0.0,
    }


def _check(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, tolerance: float, where: str) -> float:
    ref = dense(x)
    out = sparse(x)
    if out.shape != ref.shape:
        raise RuntimeError(f"converted model output shape {tuple(out.shape)} != dense {tuple(ref.shape)} ({where})")
    err = float((out - ref).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    if not err <= tolerance * scale:  # also catches NaN
        raise RuntimeError(
            f"converted model disagrees with dense ({where}): max abs error {err:.3g} > "
            f"tolerance {tolerance:g} x scale {scale:.3g}; refusing to time a wrong kernel"
        )
    return err


ENGINES = ("convert", "compile")


class _ExecutableModule(nn.Module):
    """A compiled Executable behind a torch call (tensor in, tensor out; zero-copy both ways), so
    it is checked and timed exactly like a converted model."""

    def __init__(self, executable):
        super().__init__()
        self.executable = executable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.executable.run(x.numpy()))


def _compile_report(executable, policy: str, num_threads: int) -> ConversionReport:
    """compile()'s per-layer choices in the shape of a conversion report (for the same tables)."""
    report = ConversionReport(policy=policy, num_threads=num_threads)
    for layer in executable.metadata.get("layers", []):
        report.add(LayerChoice(path=layer["name"], layer_type=layer["op"], shape=(), sparsity=layer["sparsity"],
                               kernel=layer["kernel"], reason=layer.get("reason", "")))
    return report


def benchmark(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    engine: str = "convert",
    sparsity: Optional[float] = None,
    batch_sizes: Sequence[int] = (1, 8, 64),
    threads: Sequence[int] = (1, 2),
    warmup: int = 5,
    repeats: int = 30,
    convert_kwargs: Optional[Dict[str, Any]] = None,
    accuracy_fn: Optional[Callable[[nn.Module], float]] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    name: Optional[str] = None,
) -> BenchmarkResult:
    """Time `model` dense (torch eager) against its sparseprune-converted version.

    engine="convert" (default) times sparseprune.convert's model (torch modules with native
    sparse layers); engine="compile" times sparseprune.compile's whole-model Executable, called
    through a thin torch wrapper (numpy views both ways), at torch's thread count.

    `model` is not modified. With `sparsity`, every nn.Linear is first magnitude-pruned per layer
    to that fraction (torch.nn.utils.prune.l1_unstructured, made permanent); without it the
    model's weights are used as they are (already pruned, say). The model is converted once with
    sparseprune.convert (policy "measure" at the first thread count, over `batch_sizes`, unless
    `convert_kwargs` says otherwise; a `num_threads` there only sets the count conversion
    measures at, the converted layers always follow torch's thread count so that every thread
    setting is compared fairly). Before anything is timed, the converted output is compared with
    dense; a max abs error above `tolerance` x max(1, max |output|) raises RuntimeError.

    For each thread count (torch.set_num_threads, restored afterwards) and batch size, dense and
    sparse run round-robin (sparseprune.timing.time_interleaved) on the same input under
    torch.inference_mode(). `accuracy_fn(model) -> float`, if given, is evaluated on the
    unpruned, pruned dense and converted models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    input_shape = _positive_ints(input_shape, "input_shape", unique=False)
    batch_sizes = _positive_ints(batch_sizes, "batch_sizes")
    threads = _positive_ints(threads, "threads")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a float in [0, 1] or None, got {sparsity!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if accuracy_fn is not None and not callable(accuracy_fn):
        raise TypeError(f"accuracy_fn must be callable, got {type(accuracy_fn).__name__}")
    kwargs = dict(convert_kwargs or {})
    for forbidden in ("inplace",):
        if forbidden in kwargs:
            raise ValueError(f"convert_kwargs may not set {forbidden!r}")
    kwargs.setdefault("policy", "measure")
    kwargs.setdefault("batch_sizes", batch_sizes)
    convert_threads = kwargs.pop("num_threads", None)
    if convert_threads is None:
        convert_threads = threads[0]
    else:
        convert_threads = _positive_ints((convert_threads,), "convert_kwargs['num_threads']")[0]

    original = model
    dense = deepcopy_model(model).eval()
    if sparsity is not None:
        prune_linear_layers(dense, sparsity)

    previous_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(seed)
    rows: List[BenchmarkRow] = []
    worst = 0.0
    try:
        torch.set_num_threads(convert_threads)
        # num_threads=None: the converted layers read torch's count at each call.
        # Convolutions are timed at the size they really see.
        kwargs.setdefault("example_inputs", (torch.randn(1, *input_shape, generator=gen),))
        if engine == "convert":
            sparse = convert(dense, inplace=False, num_threads=None, **kwargs)
            report = sparse.sparseprune_report
        else:
            from sparseprune.compile import compile as compile_model

            compile_kwargs = {k: v for k, v in kwargs.items() if k != "batch_sizes"}
            # kernels timed at the smallest and largest batch benchmarked: the layers that lose at
            # one of them switch kernels by the batch (see compile)
            executable = compile_model(dense, compile_kwargs.pop("example_inputs"), num_threads=convert_threads,
                                       batch_sizes=tuple(sorted({min(batch_sizes), max(batch_sizes)})),
                                       **compile_kwargs)
            executable.n_threads = None  # then follow torch's count, like the dense side
            sparse = _ExecutableModule(executable)
            report = _compile_report(executable, kwargs["policy"], convert_threads)
        with torch.inference_mode():
            x = torch.randn(max(batch_sizes), *input_shape, generator=gen)
            worst = _check(dense, sparse, x, tolerance, f"random batch of {x.shape[0]}, {convert_threads} threads")
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for batch in batch_sizes:
                    x = torch.randn(batch, *input_shape, generator=gen)
                    err = _check(dense, sparse, x, tolerance, f"batch {batch}, {n_threads} threads")
                    worst = max(worst, err)
                    times = time_interleaved(
                        {"dense": lambda: dense(x), "sparse": lambda: sparse(x)},
                        warmup=warmup,
                        repeats=repeats,
                    )
                    d, s = times["dense"], times["sparse"]
                    rows.append(
                        BenchmarkRow(
                            threads=n_threads,
                            batch=batch,
                            dense_median_ms=d.median_ms,
                            dense_p90_ms=d.p90_ms,
                            sparse_median_ms=s.median_ms,
                            sparse_p90_ms=s.p90_ms,
                            dense_throughput=batch / d.median_s,
                            sparse_throughput=batch / s.median_s,
                            speedup=d.median_s / s.median_s,
                            runs=min(d.runs, s.runs),
                            max_abs_error=err,
                        )
                    )
    finally:
        torch.set_num_threads(previous_threads)

    accuracy = None
    if accuracy_fn is not None:
        # no_grad: converted layers are inference-only, and a dense layer left in front of one
        # would hand it an output that requires grad.
        with torch.no_grad():
            accuracy = {}
            if sparsity is not None:
                accuracy["unpruned"] = float(accuracy_fn(original))
            accuracy["dense"] = float(accuracy_fn(dense))
            accuracy["sparse"] = float(accuracy_fn(sparse))

    metadata = run_metadata(threads)
    metadata.update(
        {
            "model": name if name is not None else type(model).__name__,
            "input_shape": list(input_shape),
            "sparsity": sparsity,
            "batch_sizes": list(batch_sizes),
            "warmup": warmup,
            "repeats": repeats,
            "seed": seed,
            "tolerance": tolerance,
            "engine": engine,
            "convert_kwargs": kwargs,
            "convert_threads": convert_threads,
            "dense_baseline": "torch eager, same pruned weights, torch.inference_mode()",
        }
    )
    # Through JSON once so that to_dict() equals json.loads(to_json()) (int keys become str,
    # tuples lists, anything exotic in convert_kwargs its str()).
    metadata = json.loads(json.dumps(metadata, default=str))
    conversion = json.loads(json.dumps(report.to_dict(), default=str))
    return BenchmarkResult(
        rows=rows,
        metadata=metadata,
        conversion=conversion,
        accuracy=accuracy,
        max_abs_error=worst,
        model_summary=_model_summary(dense),
    )
