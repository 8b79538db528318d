"""The compare run: train each model dense, run every (method, schedule, level), deploy, measure.

Order of work for each model:
  1. train the dense model (seeded; one thread) and measure it, converted as it is (so the table
     shows what conversion alone buys before any pruning);
  2. for each selected method that applies to the model and each of its levels: seed everything
     from (seed, model, method, schedule, level), give the runner a private copy of the dense
     model, then measure the pruned model, deploy it (`deploy`), check the deployed outputs,
     and time dense vs deployed at batch 1 and 256 (`measure`).
A runner whose API is missing gives an "unavailable" row; any other failure an "error" row
(or, with strict=True, the exception). Seeds depend on the row, not on which other rows run,
so a subset of methods reproduces the same numbers as the full run.
"""
from __future__ import annotations

import random
import time
import zlib
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sparseprune.data import DataSplit, load_digits_split
from sparseprune.experiments.config import CompareConfig
from sparseprune.experiments.deploy import OUTPUT_RTOL, deploy
from sparseprune.experiments.measure import footprint, measure_executable, time_against_dense, torch_threads
from sparseprune.experiments.models import MODELS, count_weights
from sparseprune.experiments.registry import Job, Method, MethodUnavailable, Outcome
from sparseprune.experiments.results import ERROR, UNAVAILABLE, Row
from sparseprune.model_copy import deepcopy_model
from sparseprune.train import evaluate_accuracy, train

Log = Callable[[str], None]


def row_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for one row (crc32 of its name: the same in every Python process)."""
    text = "/".join(str(p) for p in (seed,) + parts)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def level_label(method: Method, level: Any) -> str:
    return f"{100 * float(level):g}%" if method.levels == "sparsity" else str(level)


class ModelRun:
    """One model's dense baseline and the shared machinery for its rows."""

    def __init__(self, name: str, data: DataSplit, config: CompareConfig, seed: int, threads: int):
        self.name = name
        self.spec = MODELS[name]
        self.data = self.spec.split(data)  # raises ValueError when the data does not fit the model
        self.n_classes = data.n_classes
        self.config = config
        self.seed = seed
        self.threads = threads
        self.dense: Optional[nn.Module] = None
        self.dense_acc: Optional[float] = None
        self.dense_print = None  # footprint of the dense model
        self.dense_weights = 0

    # -------------------------------------------------------------- training and evaluation
    def build(self) -> nn.Module:
        return self.spec.build(self.data.x_train[:1], self.n_classes)

    def fit_fn(self, seed: int) -> Callable[..., List[float]]:
        counter = [0]

        def fit(model: nn.Module, epochs: int, lr: float, on_step=None) -> List[float]:
            counter[0] += 1  # a different, fixed shuffle for every training stage of the row
            return train(model, self.data.x_train, self.data.y_train, epochs=int(epochs), lr=float(lr),
                         batch_size=self.config.batch_size, optimizer="adam", seed=seed + counter[0],
                         progress=False, lr_schedule="cosine", num_threads=self.config.train_threads,
                         on_step=on_step)

        return fit

    def accuracy(self, model: nn.Module) -> float:
        with torch_threads(self.config.train_threads):
            value = float(evaluate_accuracy(model, self.data.x_test, self.data.y_test))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {value}")
        return value

    # ------------------------------------------------------------------------ measuring
    def measure(self, row: Row, model: nn.Module, shrink: bool) -> None:
        """Fill `row` with the accuracies, deployment check, timing and size of pruned `model`."""
        cfg = self.config
        row.acc_dense = self.dense_acc
        row.acc_pruned = self.accuracy(model)
        nonzero, total = count_weights(model)
        row.mask_sparsity = 1.0 - nonzero / total if total else 0.0
        x_te = self.data.x_test
        dep = deploy(model, shrink=shrink, example=x_te[:1].contiguous(), x_check=x_te,
                     batch_sizes=cfg.convert_batch_sizes, num_threads=self.threads)
        row.max_abs_diff = dep.max_abs_diff
        row.outputs_match = True  # deploy() raised otherwise
        row.extra["output_tolerance"] = dep.tolerance
        row.deploy = dep.steps
        row.kernels = ",".join(dep.kernels)
        row.extra["conversion"] = dep.conversion
        if dep.shrink is not None:
            row.extra["shrink"] = dep.shrink
        row.acc_converted = self.accuracy(dep.model)
        fp = footprint(dep.model)
        row.params = fp.params
        row.bytes_on_disk = fp.bytes_on_disk()
        row.params_dense = self.dense_print.params
        row.bytes_dense = self.dense_print.bytes_on_disk()
        row.sparsity = 1.0 - fp.weights / self.dense_weights
        row.timing = time_against_dense(
            self.dense, dep.model, x_te, batch_sizes=cfg.timing_batch_sizes, threads=self.threads,
            warmup=cfg.timing_warmup, repeats=cfg.timing_repeats, min_time_s=cfg.timing_min_time_s)
        if cfg.executable:
            row.extra["executable"] = measure_executable(
                self.dense, dep.model, x_te, threads=self.threads, warmup=cfg.timing_warmup,
                repeats=cfg.timing_repeats, min_time_s=cfg.timing_min_time_s, rtol=OUTPUT_RTOL,
                labels=self.data.y_test)

    def fit_dense(self) -> nn.Module:
        """Train the dense model every row starts from (seeded by the run's seed and the model)."""
        seed_everything(row_seed(self.seed, self.name, "dense"))
        model = self.build()
        b = self.config.budget(self.name)
        self.fit_fn(row_seed(self.seed, self.name, "dense", "fit"))(model, b.dense_epochs, b.dense_lr)
        model.eval()
        self.dense = model
        self.dense_acc = self.accuracy(model)
        return model

    def train_dense(self) -> Row:
        model = self.fit_dense()
        self.dense_print = footprint(model)
        self.dense_weights = count_weights(model)[1]
        b = self.config.budget(self.name)
        row = Row(self.name, "dense", "-", 0.0, "-", notes=f"{b.dense_epochs} epochs; converted as is")
        self.measure(row, deepcopy_model(model), shrink=False)
        return row

    # ------------------------------------------------------------------------------ rows
    def prune(self, method: Method, level: Any) -> Tuple[Outcome, int]:
        """Run `method` at `level` on a private copy of the dense model: (its outcome, the epochs
        it trained after pruning). Seeded by the row alone."""
        seed = row_seed(self.seed, self.name, method.key, level)
        seed_everything(seed)

        def factory() -> nn.Module:
            torch.manual_seed(seed + 7)
            return self.build()

        fit = self.fit_fn(seed)
        spent = [0]

        def counted_fit(model: nn.Module, epochs: int, lr: float, on_step=None) -> List[float]:
            spent[0] += int(epochs)  # the table shows every row's training after pruning
            return fit(model, epochs, lr, on_step=on_step)

        job = Job(model_name=self.name, dense=deepcopy_model(self.dense), factory=factory, data=self.data,
                  level=level, config=self.config, seed=seed, fit=counted_fit, accuracy=self.accuracy)
        with torch_threads(self.config.train_threads):
            outcome = method.run(job)
        return outcome, spent[0]

    def run_method(self, method: Method, level: Any) -> Tuple[Row, Optional[Outcome]]:
        row = Row(self.name, method.name, method.schedule, level, level_label(method, level))
        outcome, row.epochs = self.prune(method, level)
        if outcome.label:
            row.target = outcome.label
        row.notes = "; ".join(outcome.notes)
        row.extra.update(outcome.extra)
        self.measure(row, outcome.model, outcome.shrink)
        return row, outcome


def failed_row(model: str, method: Method, level: Any, status: str, message: str) -> Row:
    return Row(model, method.name, method.schedule, level, level_label(method, level), status=status,
               message=message)


def plan(methods: Sequence[Method], config: CompareConfig) -> List[Tuple[str, Method, Any]]:
    """Every (model, method, level) to run, in order."""
    return [(model, m, level) for model in config.models for m in methods if model in m.models
            for level in m.levels_for(config)]


def run_rows(data: DataSplit, methods: Sequence[Method], config: CompareConfig, *, seed: int, strict: bool,
             progress: bool, log: Log) -> List[Row]:
    threads = torch.get_num_threads()
    jobs = plan(methods, config)
    rows: List[Row] = []
    bar = tqdm(total=len(config.models) + len(jobs), desc="sparseprune compare", unit="row",
               disable=not progress, leave=False)
    try:
        for model_name in config.models:
            try:
                run = ModelRun(model_name, data, config, seed, threads)
            except ValueError as exc:  # e.g. the CNN on data that are not images
                if strict:
                    raise
                log(f"{model_name}: unavailable ({exc})")
                rows += [failed_row(model_name, m, lvl, UNAVAILABLE, str(exc)) for mn, m, lvl in jobs if mn == model_name]
                bar.update(1 + sum(1 for mn, _, _ in jobs if mn == model_name))
                continue
            bar.set_description(f"{model_name}: dense")
            t0 = time.perf_counter()
            dense_row = run.train_dense()
            dense_row.seconds = time.perf_counter() - t0
            rows.append(dense_row)
            bar.update()
            log(f"{model_name}: dense test accuracy {100 * run.dense_acc:.1f}%")
            for mn, method, level in jobs:
                if mn != model_name:
                    continue
                bar.set_description(f"{model_name}: {method.key} {level_label(method, level)}")
                t0 = time.perf_counter()
                try:
                    row, _ = run.run_method(method, level)
                except MethodUnavailable as exc:
                    if strict:
                        raise
                    row = failed_row(model_name, method, level, UNAVAILABLE, str(exc))
                except Exception as exc:  # noqa: BLE001 - every failure becomes a visible row
                    if strict:
                        raise
                    row = failed_row(model_name, method, level, ERROR, f"{type(exc).__name__}: {exc}")
                    log(f"{model_name} {method.key} {row.target}: error: {type(exc).__name__}: {exc}")
                row.seconds = time.perf_counter() - t0
                rows.append(row)
                bar.update()
    finally:
        bar.close()
    return rows


def load_data(seed: int, data: Optional[Sequence[Any]] = None) -> Tuple[DataSplit, str]:
    if data is None:
        return load_digits_split(seed=seed), "sklearn digits (8x8, scaled to [0, 1])"
    if isinstance(data, DataSplit):
        return data, "user data"
    parts = tuple(data)
    if len(parts) != 4:
        raise ValueError(f"data must be (x_train, y_train, x_test, y_test), got {len(parts)} items")
    from sparseprune.data import as_tensors

    x_tr, y_tr = as_tensors(parts[0], parts[1])
    x_te, y_te = as_tensors(parts[2], parts[3])
    if tuple(x_tr.shape[1:]) != tuple(x_te.shape[1:]):
        raise ValueError(f"train and test features differ in shape: {tuple(x_tr.shape)} vs {tuple(x_te.shape)}")
    return DataSplit(x_tr, y_tr, x_te, y_te), "user data"
