"""Measuring sparseprune honestly: built-in models and a dense-vs-converted benchmark runner.

`sparseprune.bench.benchmark` is the function (it shadows the submodule of the same name;
import the module's other names from here).
"""
from sparseprune.bench.benchmark import (
    DEFAULT_TOLERANCE,
    BenchmarkResult,
    BenchmarkRow,
    benchmark,
    prune_linear_layers,
)
from sparseprune.bench.metadata import git_revision, run_metadata, summary_line
from sparseprune.bench.models import available_models, build_model, describe_model, register_model

__all__ = [
    "DEFAULT_TOLERANCE",
    "BenchmarkResult",
    "BenchmarkRow",
    "available_models",
    "benchmark",
    "build_model",
    "describe_model",
    "git_revision",
    "prune_linear_layers",
    "register_model",
    "run_metadata",
    "summary_line",
]
